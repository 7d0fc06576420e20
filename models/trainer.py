"""The training loop of the three trainers (the supervised encoder, NFormer stage 2, GRACL), after
fast-reid's `TrainerBase`: a `Trainer` runs epochs of its subclass's `run_epoch` and calls a list of hooks
around them. What each trainer does every epoch besides training is a hook here:

- `Evaluation`: evaluate at the config's cadence (every `eval_every` epochs and after the last);
- `JsonlLog`: print the epoch's record and append it to a JSONL log (a run from epoch 0 starts a new log);
- `Checkpoint`: save the trainer's `state_dict()` atomically, so that a run resumes from its last epoch;
- `EpochCallback`: hand the record to the caller (progress reports).

Hooks run in list order; the trainers list them in the order above, so that an epoch is evaluated before
it is logged, and saved before it is reported. The steps themselves stay with each trainer: `run_steps`
drives its `run_step` over the epoch's batches under a progress bar and averages the losses it returns."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from index.files import atomic_write


@dataclass
class TrainerConfig:
    """The settings every trainer has; each trainer's config sets its own `epochs` and `eval_every`."""
    epochs: int
    eval_every: int  # epochs; 0 = only after the last epoch
    seed: int = 0
    threads: int = 2  # torch intra-op threads; 0 = leave torch's default

    def start_torch(self) -> None:
        """Threads and the global seed, before any model is built: initial weights draw from the seed."""
        if self.threads:
            torch.set_num_threads(self.threads)
        torch.manual_seed(self.seed)

    def evaluates_after(self, epoch: int) -> bool:
        """Whether (0-based) `epoch` ends with an evaluation."""
        return epoch + 1 == self.epochs or bool(self.eval_every and (epoch + 1) % self.eval_every == 0)


class Hook:
    """One of the things done around training; override the points it needs. `trainer` is set on registration."""
    trainer: Trainer

    def before_train(self) -> None:
        pass

    def before_epoch(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_epoch(self) -> None:
        pass

    def after_train(self) -> None:
        pass


class Trainer:
    """Runs epochs `start_epoch` .. `cfg.epochs - 1`. During an epoch, `epoch` is its 0-based number, `step`
    and `losses` the current step's; after it, `record` is its log record (`run_epoch` returns it, hooks
    add to it). `evaluation` is the latest evaluation, which `train` returns ({} when none ran)."""

    def __init__(self, cfg: TrainerConfig, start_epoch: int, hooks: list[Hook], show_progress: bool = True):
        self.cfg, self.start_epoch, self.hooks, self.show_progress = cfg, start_epoch, hooks, show_progress
        self.epoch, self.step = start_epoch, 0
        self.losses: dict[str, float] = {}
        self.record: dict = {}
        self.evaluation: dict = {}
        for hook in hooks:
            hook.trainer = self

    def train(self) -> dict:
        self._call("before_train")
        for self.epoch in range(self.start_epoch, self.cfg.epochs):
            self._call("before_epoch")
            self.record = self.run_epoch()
            self._call("after_epoch")
        self._call("after_train")
        return self.evaluation

    def run_epoch(self) -> dict:
        """Train one epoch (usually through `run_steps`); return its log record."""
        raise NotImplementedError

    def run_step(self, batch) -> dict[str, float]:
        """One optimiser step on `batch`; return its losses (and any other per-step figures, e.g. `acc`)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What `Checkpoint` saves after the current epoch."""
        raise NotImplementedError

    def run_steps(self, batches: Iterable, total: int, desc: str) -> dict[str, float]:
        """`run_step` on each of the `total` batches, under a progress bar; returns each figure's epoch mean."""
        sums: dict[str, float] = {}
        bar = tqdm(batches, total=total, desc=desc, disable=not self.show_progress)
        for self.step, batch in enumerate(bar):
            self.losses = self.run_step(batch)
            for key, value in self.losses.items():
                sums[key] = sums.get(key, 0.0) + value
            bar.set_postfix(**self.progress(self.losses))
            self._call("after_step")
        return {key: value / max(1, total) for key, value in sums.items()}

    def progress(self, losses: dict[str, float]) -> dict[str, str]:
        """The figures the progress bar shows after a step."""
        shown = {"loss": f"{losses['loss']:.3f}"}
        if "acc" in losses:
            shown["acc"] = f"{losses['acc']:.2f}"
        return shown

    def _call(self, point: str) -> None:
        for hook in self.hooks:
            getattr(hook, point)()


class Evaluation(Hook):
    """Runs `evaluate` after the epochs `cfg.evaluates_after` names; its result is the record's `eval`."""

    def __init__(self, evaluate: Callable[[], dict]):
        self.evaluate = evaluate

    def after_epoch(self) -> None:
        t = self.trainer
        if t.cfg.evaluates_after(t.epoch):
            t.evaluation = t.record["eval"] = self.evaluate()


class JsonlLog(Hook):
    """Prints each epoch's record (its `eval` as the lines `describe` gives) and appends it to `path`."""

    def __init__(self, path: str | Path, describe: Callable[[dict], Iterable[str]] | None = None):
        self.path, self.describe = Path(path), describe

    def before_train(self) -> None:
        if self.trainer.start_epoch == 0:  # a fresh run starts a fresh log; a resumed one continues it
            self.path.unlink(missing_ok=True)

    def after_epoch(self) -> None:
        record = self.trainer.record
        print(json.dumps({k: v for k, v in record.items() if k != "eval"}))
        if self.describe and "eval" in record:
            for line in self.describe(record["eval"]):
                print(line)
        with open(self.path, "a") as log:
            log.write(json.dumps(record) + "\n")


class Checkpoint(Hook):
    """Saves the trainer's `state_dict()` to `path` after every epoch. Atomically: a crash mid-save leaves
    the previous epoch's checkpoint, which `resume_state` then reads back."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def after_epoch(self) -> None:
        with atomic_write(self.path) as tmp:
            torch.save(self.trainer.state_dict(), tmp)


class EpochCallback(Hook):
    """Hands each finished epoch's record to `callback`."""

    def __init__(self, callback: Callable[[dict], None]):
        self.callback = callback

    def after_epoch(self) -> None:
        self.callback(self.trainer.record)


def resume_state(path: str | Path, resume: bool, map_location=None) -> dict | None:
    """The checkpoint a run resumes from, or None for a fresh start."""
    path = Path(path)
    if resume and path.exists():
        return torch.load(path, map_location=map_location, weights_only=False)
    return None
