"""BatchNorm running statistics re-estimated in one cumulative pass (AdaBN, Li et al. 2016).

One mechanism for three callers: domain BN during adaptation (``engine.target_bn_statistics``), ``dass-train eval
--target-bn``, and deployment's ``--adapt-bn`` (``dass_deploy.adapt_bn``), which adapts a model to the user's camera.

The pass resets the chosen layers and runs them in train mode with ``momentum=None``: PyTorch then keeps a
cumulative average, in which every batch weighs the same whatever its position, instead of an exponential one in
which the last batches dominate. ``running_mean`` becomes the average of the batch means and ``running_var`` the
average of the batch (unbiased) variances. Fed one frame per batch, as ``--adapt-bn`` does, neither depends on the
order of the frames; with larger batches they depend on which frames share a batch.
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
