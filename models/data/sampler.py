"""Identity-balanced P x K batches (torchreid's RandomIdentitySampler idea), shardable for DDP."""

from __future__ import annotations

from collections import defaultdict

import numpy as np


class PKBatchSampler:
    """Yields batches of P identities x K images. Identities with fewer than K images are sampled with
    replacement. One epoch uses every image about once (as many K-chunks per identity as it has
    images // K).

    Under DDP every process draws the same global batch list (same seed and epoch) and takes its own
    P / world_size identities of each batch, so N processes take the same steps over the same global
    batches as one process does."""

    def __init__(self, labels, p: int = 16, k: int = 4, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.p, self.k, self.seed = p, k, seed
        self.rank, self.world_size = rank, world_size
        self.by_label: dict[int, list[int]] = defaultdict(list)
        for index, label in enumerate(labels):
            self.by_label[int(label)].append(index)
        if len(self.by_label) < p:
            raise ValueError(f"P x K sampling needs at least P={p} identities, got {len(self.by_label)}")
        if p % world_size:
            raise ValueError(f"P={p} identities per batch cannot be shared evenly by {world_size} processes")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        chunks = []  # groups of K indices of one identity
        for label in sorted(self.by_label):
            indices = self.by_label[label]
            if len(indices) < self.k:
                chunks.append(rng.choice(indices, size=self.k, replace=True).tolist())
                continue
            picked = rng.permutation(indices)
            for start in range(0, len(picked) - self.k + 1, self.k):
                chunks.append(picked[start:start + self.k].tolist())
        order = rng.permutation(len(chunks))
        batches = [
            [i for c in order[start:start + self.p] for i in chunks[c]]
            for start in range(0, len(order) - self.p + 1, self.p)
        ]
        return batches

    def __iter__(self):
        share = self.p // self.world_size * self.k
        for batch in self._all_batches():
            yield batch[self.rank * share:(self.rank + 1) * share]

    def __len__(self) -> int:
        return len(self._all_batches())


class CameraBalancedSampler:
    """Batches of P pseudo-identities x K images for unsupervised training, K drawn across as many cameras
    as the identity spans (cluster-contrast's RandomMultipleGallerySampler idea: positives from other
    cameras teach view invariance). Labels change every epoch, so the sampler is rebuilt each epoch and
    yields a fixed number of batches."""

    def __init__(self, labels, cameras, p: int = 16, k: int = 4, batches: int = 100, seed: int = 0):
        self.p, self.k, self.batches = p, k, batches
        self.rng = np.random.default_rng(seed)
        self.by_label: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for index, (label, camera) in enumerate(zip(labels, cameras)):
            if label >= 0:  # outliers sit the epoch out
                self.by_label[int(label)][int(camera)].append(index)
        self.labels = sorted(self.by_label)
        if len(self.labels) < p:
            raise ValueError(f"P x K sampling needs at least P={p} pseudo-identities, got {len(self.labels)}")

    def _pick(self, label: int) -> list[int]:
        by_camera = [self.rng.permutation(v).tolist() for v in self.by_label[label].values()]
        self.rng.shuffle(by_camera)
        picked, round_ = [], 0
        while len(picked) < self.k and any(len(c) > round_ for c in by_camera):
            picked += [c[round_] for c in by_camera if len(c) > round_][: self.k - len(picked)]
            round_ += 1
        if len(picked) < self.k:  # fewer than K images: repeat some
            picked += self.rng.choice(picked, size=self.k - len(picked)).tolist()
        return picked

    def __iter__(self):
        for _ in range(self.batches):
            chosen = self.rng.choice(self.labels, size=self.p, replace=False)
            yield [i for label in chosen for i in self._pick(int(label))]

    def __len__(self) -> int:
        return self.batches
