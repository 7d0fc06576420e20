"""Weight averaging over epoch ends (SWA, Izmailov et al., UAI 2018): the mean of the weights a run passes
through at a constant, low learning rate lies in a flatter region than any one of them, which tends to
generalise better to people the model never saw.

Averaged weights need BatchNorm statistics of their own: the mean of each epoch's running statistics is not
the statistics of the averaged network. So after averaging, `reestimate_batchnorm` recomputes them on
training batches, for the BN layers that train; a frozen front keeps its ImageNet statistics."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm


class WeightAverage:
    """The running mean of a model's floating-point state (parameters and BN buffers), one update per epoch."""

    def __init__(self):
        self.mean: dict[str, torch.Tensor] | None = None
        self.count = 0

    def update(self, model: torch.nn.Module) -> None:
        state = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        self.count += 1
        if self.mean is None:
            self.mean = state
            return
        for key, value in state.items():
            self.mean[key] += (value - self.mean[key]) / self.count

    def copy_into(self, model: torch.nn.Module) -> None:
        """Load the averaged weights into `model` (integer buffers, e.g. BN's batch counters, stay as they are)."""
        if self.mean is None:
            raise ValueError("no weights were averaged")
        model.load_state_dict(self.mean, strict=False)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = state["mean"], state["count"]


def reestimate_batchnorm(model: torch.nn.Module, batches: Iterable[torch.Tensor], total: int) -> None:
    """Recompute the running statistics of `model`'s BN layers that are in training mode (after
    `model.train()`), as the plain mean over `batches`. Layers the model keeps in eval mode (a frozen
    front) keep theirs."""
    model.train()
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training]
    momenta = [m.momentum for m in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches rather than an exponential one
    with torch.no_grad():
        for images in tqdm(batches, total=total, desc="BN statistics of the averaged weights"):
            model(images)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    model.eval()
