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
