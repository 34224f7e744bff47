"""BatchNorm running statistics re-estimated on unlabelled images (AdaBN, Li et al. 2016), two ways.

``cumulative_bn_statistics`` is one pass in train mode with ``momentum=None``: PyTorch then keeps a cumulative
average, in which every batch weighs the same whatever its position. ``running_mean`` becomes the average of the
batch means and ``running_var`` the average of the batch (unbiased) variances. Domain BN during adaptation
(``engine.target_bn_statistics``) and ``dass-train eval --target-bn`` use it, on batches of training size.

``population_bn_statistics`` is what deployment's ``--adapt-bn`` (``dass_deploy.adapt_bn``) uses, one frame at a
time: the mean and variance of each layer's input pooled over every pixel of every frame, as eval mode meets them.
An average of per-frame variances misses the spread of the frame means, and a layer fed frames each normalised by
its own statistics sees other inputs than at inference: with one frame per batch both errors are at their largest
(benchmarks/results/adapt_bn.md measured the first estimator there, docs/ADAPT_BN.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(model: nn.Module, include_frozen: bool = False) -> dict[str, _BatchNorm]:
    """The model's BatchNorm layers by name: those that train in ``model.train()``, or all with ``include_frozen``.

    A frozen layer (``DeepLabV2(freeze_bn=True)`` keeps BN in eval mode even in ``train()``) keeps its statistics
    during training; deployment re-estimates it anyway when asked to, so it is left out only by default.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    if include_frozen:
        return layers
    was = model.training
    model.train()
    trainable = {name: m for name, m in layers.items() if m.training}
    model.train(was)
    return trainable


@torch.no_grad()
def cumulative_bn_statistics(
    model: nn.Module,
    batches: Iterable[Tensor],
    layers: Sequence[_BatchNorm],
    forward: Callable[[Tensor], object] | None = None,
) -> int:
    """Set the running statistics of ``layers`` to their cumulative average over ``batches``; returns the images seen.

    Only ``layers`` run in train mode during the pass (everything else in eval mode, so dropout stays off); every
    module's mode and every layer's momentum are restored afterwards. ``forward`` (default: ``model``) is what runs
    on each batch, for a wrapper that normalises the input first, such as the export graph.
    """
    run = forward or model
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch weighs the same
        m.train()
    seen = 0
    try:
        for batch in batches:
            run(batch)
            seen += int(batch.shape[0])
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        for m, training in modes.items():
            m.training = training
    return seen


class _InputMoments:
    """Accumulates, in float64, the count, sum and sum of squares per channel of what enters one BatchNorm layer.

    Each batch's moments are taken around the batch's own mean (``var_mean``) and only then combined, so the pooled
    variance loses nothing to cancellation where a channel's mean is large next to its spread.
    """

    def __init__(self) -> None:
        self.count = 0
        self.sum: Tensor | None = None
        self.sum_sq: Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0]
        dims = [d for d in range(x.dim()) if d != 1]  # every axis but the channel
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        n = x.numel() // x.shape[1]
        mean, var = mean.double(), var.double()
        if self.sum is None or self.sum_sq is None:
            self.sum, self.sum_sq = torch.zeros_like(mean), torch.zeros_like(mean)
        self.count += n
        self.sum += n * mean
        self.sum_sq += n * (var + mean * mean)

    def statistics(self) -> tuple[Tensor, Tensor]:
        """The mean and the unbiased variance over every value seen (``float64 [C]``)."""
        if self.sum is None or self.sum_sq is None or self.count < 2:
            raise ValueError("no batch reached the BatchNorm layer")
        mean = self.sum / self.count
        var = (self.sum_sq / self.count - mean * mean).clamp_min(0) * (self.count / (self.count - 1))
        return mean, var


@torch.no_grad()
def pooled_bn_pass(
    model: nn.Module,
    batches: Iterable[Tensor],
    layers: Sequence[_BatchNorm],
    forward: Callable[[Tensor], object] | None = None,
    first: bool = False,
) -> None:
    """One pass of ``population_bn_statistics``: set each layer's running statistics to the mean and variance of
    its input pooled over every value of every batch. ``first``: ``layers`` run in train mode, each batch normalised
    by its own statistics (AdaBN); otherwise the whole model runs in eval mode with the statistics it holds."""
    run = forward or model
    modes = {m: m.training for m in model.modules()}
    moments = [_InputMoments() for _ in layers]
    handles = [m.register_forward_pre_hook(acc) for m, acc in zip(layers, moments, strict=True)]
    model.eval()
    for m in layers:
        m.train(first)
    try:
        for batch in batches:
            run(batch)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    for m, acc in zip(layers, moments, strict=True):  # the running buffers change only after a complete pass
        mean, var = acc.statistics()
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))


def population_bn_statistics(
    model: nn.Module,
    batches: Callable[[], Iterable[Tensor]],
    layers: Sequence[_BatchNorm],
    forward: Callable[[Tensor], object] | None = None,
    passes: int = 1,
) -> list[float]:
    """Set the running statistics of ``layers`` to the mean and variance of their input over every pixel of every
    batch, as the model in eval mode meets them; returns how far each pass after the first moved them
    (``statistics_movement``).

    Inference normalises every frame with one pair of statistics per layer, so those are what a layer should hold:
    the pooled mean and variance of its input (which keeps the spread of the frame means that an average of
    per-frame variances loses), with the layers before it already normalised that way. A layer's input depends on
    the statistics of the layers before it, so the estimate is made in passes over the same frames (``batches()``
    is called once per pass): pass 1 runs ``layers`` in train mode, each batch normalised by its own statistics
    (AdaBN), every further pass runs the model in eval mode with the last pass's statistics. After ``p`` passes the
    first ``p`` layers of the chain are exact, and a pass more than the chain is deep changes nothing. No pass
    depends on the order of the batches, and from pass 2 on none depends on how frames are grouped into batches.

    ``passes=0`` (``EXACT``) runs until a pass changes nothing (``converged``): the chain is then exact, after at
    most one pass per layer and one more. The passes in between are not a better approximation than pass 1: a layer
    whose predecessors changed meets inputs its statistics were not measured on, and deep layers can be far off
    (benchmarks/results/adapt_bn_passes.md).
    """
    if passes < 0:
        raise ValueError("passes must be at least 1, or 0 (EXACT)")
    movement, previous = [], None
    for index in range(passes or len(layers) + 1):
        pooled_bn_pass(model, batches(), layers, forward, first=index == 0)
        now = [(m.running_mean.double().clone(), m.running_var.double().clone()) for m in layers]
        if previous is not None:
            movement.append(statistics_movement(previous, now))
            if not passes and converged(previous, now):
                break
        previous = now
    return movement


#: ``population_bn_statistics(passes=EXACT)``: pass until nothing changes.
EXACT = 0


def converged(before: Sequence[tuple[Tensor, Tensor]], after: Sequence[tuple[Tensor, Tensor]]) -> bool:
    """No channel's mean moved by more than 1e-5 of its sd, and no variance by more than 1e-5 of itself: float
    rounding, not a change."""
    for b, a in zip(before, after, strict=True):
        sd = a[1].clamp_min(1e-12).sqrt()
        if ((a[0] - b[0]).abs() / sd).max() > 1e-5 or ((a[1] - b[1]).abs() / a[1].clamp_min(1e-12)).max() > 1e-5:
            return False
    return True


def statistics_movement(before: Sequence[tuple[Tensor, Tensor]], after: Sequence[tuple[Tensor, Tensor]]) -> float:
    """How far a pass moved the statistics: the median over all channels of ``|mean change| / new std``."""
    shift = [(a[0] - b[0]).abs() / a[1].clamp_min(1e-12).sqrt() for b, a in zip(before, after, strict=True)]
    return float(torch.cat(shift).median())
