"""The BiDA method (Lee et al., ECCV 2022, section 3) as small pure functions.

Read with the paper open; each function names its equation. One training step of the final model (Eq. 12) is::

    f_S, f_T                     features [N,C,h,w] of source / target images (ASPP branches concatenated, 1/8 res.)
    y_S  = downsample_labels(source ground truth, (h, w))
    rho_S, pres_S = class_prototypes(f_S, y_S, K)                           Eq. 1
    y_D  = dynamic_pseudo_labels(f_T, memory.calibrate(rho_S), pres_S, T)   Eq. 6-9 (batch rho_S, not mu_S: Fig. 7)
    y_T  = hybrid_pseudo_labels(y_D, downsample_labels(static labels, (h, w)))   Eq. 10
    rho_T, pres_T = class_prototypes(f_T, y_T, K)                           Eq. 1
    memory.update(rho_S, pres_S, rho_T, pres_T)                             Eq. 4-5
    L_FC = contrastive_loss(f_T, y_T, rho_S, pres_S, tau)                   Eq. 2
    L_BC = contrastive_loss(f_S, y_S, rho_T, pres_T, tau)                   Eq. 3
    L_base = segmentation_loss(...) and entropy_loss(...) terms             Eq. 11

Conventions: features ``[N,C,H,W]``, labels ``[N,H,W]`` int64 with ``ignore_index`` (255) for "no label", prototypes
``[K,C]``, ``present`` ``[K]`` bool. Any label outside ``[0, K)`` counts as ignored. Similarities, normalisation and
losses are computed in at least float32 with autocast switched off, so the functions are safe under AMP. Nothing
here loops over classes, pixels or images, and nothing calls ``.cuda()``: tensors stay on the device they come on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dass_train.labels import IGNORE_INDEX

__all__ = [
    "ClassBalancedThresholds",
    "PrototypeMemory",
    "all_reduce_prototypes",
    "class_prototypes",
    "pair_prototypes",
    "upsample_logits",
    "contrastive_loss",
    "downsample_labels",
    "dynamic_pseudo_labels",
    "entropy_loss",
    "hybrid_pseudo_labels",
    "pseudo_label_counts",
    "pseudo_label_stats",
    "segmentation_loss",
    "image_confidence_cut",
    "static_pseudo_labels",
    "threshold_static_labels",
]


# ----------------------------------------------------------------------------------------------------------- helpers
def _wide(x: Tensor) -> Tensor:
    """Half / bfloat16 -> float32; float32 and float64 are kept (float64 matters for gradcheck)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _no_autocast(x: Tensor) -> torch.autocast:
    """Autocast would silently run our fp32 matmuls in half precision; cosine similarities / tau need fp32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _check_pair(features: Tensor, labels: Tensor) -> None:
    if features.dim() != 4 or labels.dim() != 3:
        raise ValueError(
            f"expected features [N,C,H,W] and labels [N,H,W], got {tuple(features.shape)} and {tuple(labels.shape)}"
        )
    if features.shape[0] != labels.shape[0] or features.shape[2:] != labels.shape[1:]:
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match features {tuple(features.shape)}: "
            "resize labels to the feature size first (downsample_labels)"
        )


def _valid_labels(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Same shape, bool: the label is a real class (ignore_index and anything outside [0, K) are not)."""
    return (labels >= 0) & (labels < num_classes) & (labels != ignore_index)


def _cosine_logits(features: Tensor, prototypes: Tensor, present: Tensor, tau: float = 1.0) -> Tensor:
    """features [N,C,H,W] x prototypes [K,C] (or per-image [N,K,C]) -> [N,K,H*W] cosine similarity / tau, >= fp32.

    Works in the channels-first layout (one batched matmul, no [N*H*W, C] copy of the features) and normalises the
    [N,K,HW] result instead of the C-channel features. ``present`` is [K] (or [N,K] with per-image prototypes).
    Absent classes get the dtype's lowest finite value rather than -inf: exp() of it is exactly 0 (the class is out
    of the softmax denominator), yet nothing turns into NaN even when no class is present.
    """
    n, c = features.shape[:2]
    with _no_autocast(features):
        pixels = _wide(features).reshape(n, c, -1)  # a view for contiguous NCHW
        protos = F.normalize(_wide(prototypes).to(device=pixels.device, dtype=pixels.dtype), dim=-1) / tau
        norms = torch.linalg.vector_norm(pixels, dim=1, keepdim=True).clamp_min(1e-12)  # [N,1,HW], as F.normalize
        sim = torch.matmul(protos, pixels) / norms  # [K,C] or [N,K,C] @ [N,C,HW] -> [N,K,HW]
    mask = present.to(sim.device)
    mask = mask[None, :, None] if mask.dim() == 1 else mask[:, :, None]
    return sim.masked_fill(~mask, torch.finfo(sim.dtype).min)


def upsample_logits(logits: Tensor, size: Sequence[int], align_corners: bool = False) -> Tensor:
    """Bilinear upsampling of [N,K,h,w] logits to ``size`` (H, W).

    ``align_corners`` is part of the model, like its input normalisation: the BiDA authors' DeepLab-V2 upsamples
    with ``align_corners=True`` and a checkpoint of that lineage only reproduces its predictions that way; models
    trained here default to False. Every consumer (losses, pseudo labels, evaluation, export) calls this.
    """
    if tuple(logits.shape[2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=align_corners)


def downsample_labels(labels: Tensor, size: int | Sequence[int]) -> Tensor:
    """[N,H,W] int labels -> [N,h,w] int64, nearest neighbour (ignore 255 stays 255, no class blending).

    PyTorch's "nearest" picks source pixel floor(i * H / h), i.e. the top-left-anchored pixel that a strided
    network's output position i is centred on, which is how the 1/8-resolution features line up with the image.
    """
    if labels.dim() != 3:
        raise ValueError(f"expected labels [N,H,W], got {tuple(labels.shape)}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(labels.shape[1:]) == size:
        return labels.long()
    small = F.interpolate(labels[:, None].float(), size=size, mode="nearest")
    return small[:, 0].long()


# ------------------------------------------------------------------------------------------------------------- Eq. 1
def _all_reduce_sum(x: Tensor) -> Tensor:
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x. Every rank's loss depends on every rank's x, so the gradient is summed too."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _all_reduce_sum(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _all_reduce_sum(grad.contiguous())


def all_reduce_prototypes(protos_sum: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Sum the per-rank MAP numerators ``[K,C]`` and pixel counts ``[K]`` over all ranks (no-op without DDP).

    Reducing sums and counts (not the per-rank means) gives every rank the prototypes of the global batch, so all
    ranks compute the same losses and keep identical EMA memories. If the sums carry gradient, the backward pass
    all-reduces the gradient as well, so each rank's features receive the gradient of every rank's loss through the
    shared prototypes (DDP then averages parameter gradients as usual). Every rank must call backward on a loss
    that uses these prototypes, as with any collective.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return protos_sum, counts
    protos_sum = _AllReduceSum.apply(protos_sum) if protos_sum.requires_grad else _all_reduce_sum(protos_sum)
    counts = counts.clone()
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return protos_sum, counts


def class_prototypes(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    distributed: bool = False,
) -> tuple[Tensor, Tensor]:
    """Masked average pooling (Eq. 1): mean feature of each class over all labelled pixels of the whole batch.

    features [N,C,H,W], labels [N,H,W] at the *feature* resolution (the caller resizes them with
    ``downsample_labels``) -> (prototypes [K,C] in >= fp32, present [K] bool). A class with no pixel gets a zero
    row and present=False. Gradient flows from the prototypes back to the features. With ``distributed=True`` and
    torch.distributed initialised, sums and counts are all-reduced before the division (``all_reduce_prototypes``).
    """
    _check_pair(features, labels)
    k = num_classes
    n, c = features.shape[:2]
    pixels = _wide(features).reshape(n, c, -1)  # [N,C,HW], a view
    lab = labels.reshape(n, 1, -1).to(pixels.device)  # [N,1,HW]
    # Ignored pixels go to an extra class K that is dropped: one scatter_add, no per-class masks.
    idx = torch.where(_valid_labels(lab, k, ignore_index), lab, torch.full_like(lab, k))
    with _no_autocast(pixels):
        sums = pixels.new_zeros(n, c, k + 1).scatter_add(2, idx.expand(n, c, -1), pixels)  # sums[n, :, label] += f
        sums = sums.sum(0).t()[:k]  # [K,C]
    counts = torch.bincount(idx.reshape(-1), minlength=k + 1)[:k].to(sums.dtype)
    if distributed:
        sums, counts = all_reduce_prototypes(sums, counts)
    present = counts > 0
    return sums / counts.clamp_min(1.0)[:, None], present


def pair_prototypes(
    features: Tensor, labels: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Eq. 1 per image: masked average pooling within each image of the batch (the authors' code pairs the i-th
    source image with the i-th target image and computes prototypes and losses per pair).

    features [N,C,H,W], labels [N,H,W] (feature resolution) -> (prototypes [N,K,C] in >= fp32, present [N,K] bool).
    Never all-reduced: a pair lives on one rank.
    """
    _check_pair(features, labels)
    k = num_classes
    n, c = features.shape[:2]
    pixels = _wide(features).reshape(n, c, -1)
    lab = labels.reshape(n, 1, -1).to(pixels.device)
    idx = torch.where(_valid_labels(lab, k, ignore_index), lab, torch.full_like(lab, k))
    with _no_autocast(pixels):
        sums = pixels.new_zeros(n, c, k + 1).scatter_add(2, idx.expand(n, c, -1), pixels)  # [N,C,K+1]
        sums = sums.transpose(1, 2)[:, :k]  # [N,K,C]
    counts = F.one_hot(idx[:, 0], k + 1).sum(1)[:, :k].to(sums.dtype)  # [N,K]
    return sums / counts.clamp_min(1.0)[..., None], counts > 0


# ------------------------------------------------------------------------------------------------------- Eq. 2 and 3
def contrastive_loss(
    features: Tensor,
    labels: Tensor,
    prototypes: Tensor,
    present: Tensor,
    tau: float = 0.1,
    ignore_index: int = IGNORE_INDEX,
    mean: str = "pixel",
) -> Tensor:
    """Pixel-to-prototype InfoNCE: FCL (Eq. 2) and BCL (Eq. 3) are the same function with the domains swapped.

    FCL: ``contrastive_loss(f_T, y_T hybrid, rho_S, present_S)``; BCL: ``contrastive_loss(f_S, y_S, rho_T, present_T)``.
    features [N,C,H,W], labels [N,H,W] (feature resolution), prototypes [K,C] with present [K] (batch prototypes),
    or [N,K,C] with [N,K] (per-pair prototypes, ``pair_prototypes``: image i is contrasted with pair i's) -> scalar.

    - s(.,.) is cosine similarity, divided by tau (the authors use 0.1).
    - The softmax runs over *present* classes only: a class without a prototype in this batch is neither a
      positive nor a negative (the authors' code instead gives it similarity -1, which keeps a spurious negative).
    - Eq. 2 sums over pixels; we average over the pixels whose label is a present class, so the loss weight does
      not depend on the crop size. Pixels labelled with an absent class cannot have a positive and are skipped.
    - ``mean="class"`` (not the paper) averages each class's pixels first, then the classes that have any, so every
      class weighs the same however many pixels it has: a check of whether road-heavy target labels (six in ten
      static labels in the paper regime, docs/RESULTS.md) are what turns the terms against adaptation.
    - No such pixel -> exactly 0, still connected to ``features`` (and ``prototypes``) so backward works.

    Gradient flows into the features and, if they require grad, into the prototypes. The paper computes the
    prototypes from the current batch (Eq. 1) and states no stop-gradient, so the literal reading keeps it; a trainer
    that wants fixed anchors (MoCo-style) passes ``prototypes.detach()`` (the trainer's ``detach_prototypes`` flag).
    """
    _check_pair(features, labels)
    if tau <= 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")
    k = prototypes.shape[-2]
    if present.shape != prototypes.shape[:-1]:
        raise ValueError(f"present must be {tuple(prototypes.shape[:-1])}, got {tuple(present.shape)}")
    logits = _cosine_logits(features, prototypes, present, tau)  # [N,K,HW]
    with _no_autocast(logits):
        log_prob = torch.log_softmax(logits, dim=1)
    lab = labels.reshape(labels.shape[0], 1, -1).to(logits.device)  # [N,1,HW]
    valid = _valid_labels(lab, k, ignore_index)
    safe = torch.where(valid, lab, torch.zeros_like(lab))
    pres = present.to(lab.device)
    valid = valid & (pres[safe] if pres.dim() == 1 else pres.gather(1, safe[:, 0])[:, None])
    nll = -log_prob.gather(1, safe)
    # torch.where (not multiplication) so that a masked -huge log-prob never becomes 0 * inf = NaN.
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    if mean == "pixel":
        return nll.sum() / valid.sum().clamp_min(1).to(nll.dtype)
    if mean != "class":
        raise ValueError(f"mean must be 'pixel' or 'class', got {mean!r}")
    # per-class sums and counts [K] (masked pixels add 0 to class 0), then the mean over classes with a pixel
    sums = nll.new_zeros(k).index_add_(0, safe.flatten(), nll.flatten())
    counts = nll.new_zeros(k).index_add_(0, safe.flatten(), valid.flatten().to(nll.dtype))
    return (sums / counts.clamp_min(1)).sum() / (counts > 0).sum().clamp_min(1).to(nll.dtype)


# --------------------------------------------------------------------------------------------------------- Eq. 4 - 7
class PrototypeMemory(nn.Module):
    """EMA prototypes of both domains (Eq. 4, 5), domain bias (Eq. 6) and calibrated source prototypes (Eq. 7).

    A module with buffers so it goes into ``state_dict`` and follows ``.to(device)``. Neither the paper nor the
    authors' code gives lambda; 0.99 (an effective window of ~100 iterations) keeps up with features that change
    during adaptation, where 0.999+ would lag for thousands of iterations. A class's first observation initialises
    its memory (no drift from a zero start); classes absent from a batch keep their memory unchanged.
    Under DDP pass globally reduced prototypes (``class_prototypes(..., distributed=True)``) so that all ranks
    hold the same memory.
    """

    mu_src: Tensor
    mu_tgt: Tensor
    seen_src: Tensor
    seen_tgt: Tensor

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.99) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.num_classes, self.dim, self.momentum = num_classes, dim, momentum
        self.register_buffer("mu_src", torch.zeros(num_classes, dim))
        self.register_buffer("mu_tgt", torch.zeros(num_classes, dim))
        self.register_buffer("seen_src", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("seen_tgt", torch.zeros(num_classes, dtype=torch.bool))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, momentum={self.momentum}"

    def _ema(self, mu: Tensor, seen: Tensor, protos: Tensor, present: Tensor) -> None:
        protos = protos.detach().to(mu)
        present = present.to(seen.device)
        mixed = self.momentum * mu + (1.0 - self.momentum) * protos
        new = torch.where(seen[:, None], mixed, protos)  # first observation initialises
        mu.copy_(torch.where(present[:, None], new, mu))  # absent classes unchanged
        seen |= present

    @torch.no_grad()
    def update(self, src_protos: Tensor, src_present: Tensor, tgt_protos: Tensor, tgt_present: Tensor) -> None:
        """Eq. 4 (source) and Eq. 5 (target) for the classes present in this batch; inputs [K,C] and [K] bool."""
        self._ema(self.mu_src, self.seen_src, src_protos, src_present)
        self._ema(self.mu_tgt, self.seen_tgt, tgt_protos, tgt_present)

    def bias(self) -> Tensor:
        """Eq. 6: xi = mu_T - mu_S, [K,C]; zero for classes not yet seen in both domains (nothing to compare)."""
        both = (self.seen_src & self.seen_tgt)[:, None]
        return torch.where(both, self.mu_tgt - self.mu_src, torch.zeros_like(self.mu_src))

    def calibrate(self, src_protos: Tensor) -> Tensor:
        """Eq. 7: rho_{S->T} = rho_S + xi, [K,C] -> [K,C] (no gradient through the memory)."""
        return src_protos + self.bias().to(device=src_protos.device, dtype=_wide(src_protos).dtype)


# --------------------------------------------------------------------------------------------------------- Eq. 8 - 10
@torch.no_grad()
def dynamic_pseudo_labels(
    features: Tensor,
    prototypes: Tensor,
    present: Tensor,
    threshold: float,
    ignore_index: int = IGNORE_INDEX,
    score: str = "cosine",
    tau: float = 0.1,
) -> Tensor:
    """Eq. 8-9: label each pixel with its most similar present prototype if the match score is > T.

    features [N,C,H,W] (target), prototypes [K,C] or per-pair [N,K,C] (calibrated source prototypes, Eq. 7),
    present [K] or [N,K] bool -> labels [N,H,W] int64 with ``ignore_index`` where the score is not above the
    threshold or no class is present.

    ``score="cosine"`` thresholds s(f_T(p), rho_{S->T}(c')) itself, as Eq. 8 is written. ``score="softmax"``
    thresholds the softmax over present classes of cosine / tau at c' instead, which is what the authors' code
    compares with its T = 0.8 (a different quantity: the same T selects different pixels). The argmax (Eq. 9) is
    the same for both. The authors' code also takes a max over the argmax map; that bug is not reproduced.
    """
    if features.dim() != 4:
        raise ValueError(f"expected features [N,C,H,W], got {tuple(features.shape)}")
    if score not in ("cosine", "softmax"):
        raise ValueError(f"score must be 'cosine' or 'softmax', got {score!r}")
    n, _, h, w = features.shape
    sim = _cosine_logits(features.detach(), prototypes.detach(), present)  # [N,K,HW]
    best, label = sim.max(dim=1)
    if score == "softmax":
        best = torch.softmax(sim / tau, dim=1).gather(1, label[:, None])[:, 0]
    any_present = present.to(label.device).reshape(present.shape[0] if present.dim() == 2 else 1, -1).any(-1)
    keep = (best > threshold) & any_present[:, None]
    label = torch.where(keep, label, torch.full_like(label, ignore_index))
    return label.view(n, h, w)


def hybrid_pseudo_labels(dynamic: Tensor, static: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Eq. 10: the dynamic label where it exists, else the static one, else ignore. [N,H,W] x [N,H,W] -> [N,H,W]."""
    if dynamic.shape != static.shape:
        raise ValueError(f"dynamic {tuple(dynamic.shape)} and static {tuple(static.shape)} labels differ in shape")
    return torch.where(dynamic != ignore_index, dynamic, static.to(dynamic))


# ------------------------------------------------------------------------------------------------------------ Eq. 11
def entropy_loss(logits: Tensor, variant: str = "paper") -> Tensor:
    """Mean per-pixel entropy -sum_k p_k log p_k of the prediction, in nats. logits [N,K,H,W] -> scalar.

    ``variant="paper"``: p = softmax(logits), applied once via log_softmax. ``variant="authors"``: the authors'
    code feeds softmax probabilities to a second softmax, p = softmax(softmax(logits)); with probabilities in [0, 1]
    the second softmax is nearly uniform, so the term is almost flat (its gradient is 28-132x smaller on random
    logits) and their weights 0.4 / 0.12 were tuned against that. Not divided by log K (that only rescales the
    weight).
    """
    if variant not in ("paper", "authors"):
        raise ValueError(f"entropy variant must be 'paper' or 'authors', got {variant!r}")
    with _no_autocast(logits):
        x = _wide(logits)
        if variant == "authors":
            x = torch.softmax(x, dim=1)
        log_p = torch.log_softmax(x, dim=1)
        return -(log_p.exp() * log_p).sum(dim=1).mean()


def segmentation_loss(
    logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, align_corners: bool = False
) -> Tensor:
    """Pixel-wise cross-entropy averaged over labelled pixels. logits [N,K,h,w], labels [N,H,W] -> scalar.

    Logits at a lower resolution than the labels (the network's 1/8 output) are upsampled bilinearly
    (``upsample_logits``, with the model's ``align_corners``) to the label size first, so the loss is taken at full label resolution; logits that
    already match are used as they are. All pixels ignored -> exactly 0, still connected to ``logits``.
    """
    if logits.dim() != 4 or labels.dim() != 3 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected logits [N,K,h,w] and labels [N,H,W], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    with _no_autocast(logits):
        logits = _wide(logits)
        logits = upsample_logits(logits, labels.shape[1:], align_corners)
        labels = labels.to(logits.device).long()
        total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
        count = (labels != ignore_index).sum().clamp_min(1)
        return total / count.to(total.dtype)


# ------------------------------------------------------------------------------------------- static labels (CBST [58])
class ClassBalancedThresholds:
    """CBST class-balanced confidence thresholds, accumulated in one streaming pass with fixed memory.

    For class c: among the pixels whose argmax is c, the confidence above which the top ``portion`` of them lie
    (the 1 - portion quantile). A [K, bins] histogram of max-probabilities over [0, 1] replaces sorting the whole
    target set; inside the crossing bin the value is linearly interpolated (pixels assumed uniform in the bin),
    which keeps the error well under 1/bins. Classes never predicted get threshold 1.0, i.e. (almost) no labels.
    Under DDP call ``all_reduce()`` once after the pass so every rank holds the global histogram.
    """

    def __init__(self, num_classes: int, portion: float = 0.1, bins: int = 10000, device: torch.device | str = "cpu"):
        if not 0.0 < portion <= 1.0:
            raise ValueError(f"portion must be in (0, 1], got {portion}")
        self.num_classes, self.portion, self.bins = num_classes, portion, bins
        self.hist = torch.zeros(num_classes, bins, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.hist.zero_()

    @torch.no_grad()
    def update(self, probs: Tensor) -> None:
        """Add a batch of softmax probabilities [N,K,H,W] (any resolution) to the per-class histograms."""
        if probs.dim() != 4 or probs.shape[1] != self.num_classes:
            raise ValueError(f"expected probs [N,{self.num_classes},H,W], got {tuple(probs.shape)}")
        conf, cls = _wide(probs).max(dim=1)
        b = (conf * self.bins).long().clamp_(0, self.bins - 1)  # conf == 1.0 falls into the last bin
        idx = (cls * self.bins + b).reshape(-1).to(self.hist.device)
        self.hist += torch.bincount(idx, minlength=self.num_classes * self.bins).view(self.num_classes, self.bins)

    def all_reduce(self) -> None:
        """Sum the histograms over all DDP ranks (no-op without torch.distributed)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.hist, op=dist.ReduceOp.SUM)

    def counts(self) -> Tensor:
        """[K] number of pixels predicted as each class so far."""
        return self.hist.sum(dim=1)

    def thresholds(self) -> Tensor:
        """[K] float32: per class, the confidence with a fraction ``portion`` of its pixels above it."""
        hist = self.hist.double()
        total = hist.sum(dim=1)  # [K]
        wanted = self.portion * total  # pixels that must lie above the threshold
        # above[c, b] = pixels of class c in bins b..end (non-increasing in b)
        above = hist.flip(1).cumsum(1).flip(1)
        crossing = ((above >= wanted[:, None]).sum(1) - 1).clamp(0, self.bins - 1)  # last bin reaching `wanted`
        above_next = torch.cat([above[:, 1:], above.new_zeros(self.num_classes, 1)], dim=1)
        in_bin = hist.gather(1, crossing[:, None])[:, 0]
        need = wanted - above_next.gather(1, crossing[:, None])[:, 0]  # pixels to take from the crossing bin
        frac = need / in_bin.clamp_min(1.0)
        value = (crossing.double() + 1.0 - frac) / self.bins
        return torch.where(total > 0, value, torch.ones_like(value)).clamp(0.0, 1.0).float()


def image_confidence_cut(conf: Tensor, image_portion: float) -> Tensor:
    """[N,H,W] confidences -> [N]: each image's k-th largest confidence, k = ceil(portion * H * W).

    The per-image half of the static labels: the top ``image_portion`` of every image is kept whatever its class
    threshold says. ``image_portion=0`` returns +inf (nothing kept this way).
    """
    flat = conf.flatten(1)  # [N,HW]
    if image_portion <= 0:
        return torch.full(flat.shape[:1], float("inf"), dtype=flat.dtype, device=flat.device)
    hw = flat.shape[1]
    top = min(hw, max(1, math.ceil(image_portion * hw - 1e-6)))  # -1e-6: 0.1 * 50 must give 5, not 6
    return flat.kthvalue(hw - top + 1, dim=1).values


def threshold_static_labels(
    conf: Tensor,
    cls: Tensor,
    thresholds: Tensor,
    image_cut: Tensor,
    ignore_index: int = IGNORE_INDEX,
    excluded_classes: Iterable[int] = (),
) -> Tensor:
    """The labelling rule of ``static_pseudo_labels`` on already reduced predictions.

    conf [N,H,W] max probability, cls [N,H,W] argmax, thresholds [K] per class, image_cut [N] per image
    (``image_confidence_cut``) -> labels [N,H,W] int64. Split out so a pass that caches (conf, cls) per image can
    apply the global thresholds afterwards without predicting twice.
    """
    keep = (conf >= thresholds.to(conf)[cls]) | (conf >= image_cut.to(conf)[:, None, None])
    excluded = list(excluded_classes)
    if excluded:
        banned = torch.zeros(thresholds.shape[0], dtype=torch.bool, device=cls.device)
        banned[torch.tensor(excluded, dtype=torch.long, device=cls.device)] = True
        keep &= ~banned[cls]
    return torch.where(keep, cls.long(), torch.full_like(cls, ignore_index, dtype=torch.long))


@torch.no_grad()
def static_pseudo_labels(
    probs: Tensor,
    thresholds: Tensor,
    image_portion: float = 0.1,
    ignore_index: int = IGNORE_INDEX,
    excluded_classes: Iterable[int] = (),
) -> Tensor:
    """Static pseudo labels y_F (CBST [58] as in the authors' code). probs [N,K,H,W], thresholds [K] -> [N,H,W] int64.

    A pixel gets its argmax class c if its confidence >= thresholds[c], OR if it is among the top ``image_portion``
    most confident pixels of its own image (confidence >= that image's k-th largest, k = ceil(portion * H * W));
    ``image_portion=0`` switches the per-image mask off. Classes in ``excluded_classes`` (for SYNTHIA: terrain 9,
    truck 14, train 16, which it has no examples of) never become labels.
    """
    if probs.dim() != 4 or thresholds.shape != (probs.shape[1],):
        raise ValueError(
            f"expected probs [N,K,H,W] and thresholds [K], got {tuple(probs.shape)} and {tuple(thresholds.shape)}"
        )
    conf, cls = _wide(probs).max(dim=1)  # [N,H,W]
    cut = image_confidence_cut(conf, image_portion)
    return threshold_static_labels(conf, cls, thresholds, cut, ignore_index, excluded_classes)


# ---------------------------------------------------------------------------------------------------------- Table 4
def pseudo_label_counts(
    pred_labels: Tensor, gt_labels: Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[int, int, int]:
    """(labelled, correct, valid) pixel counts among pixels with a valid ground truth; sum these over a dataset."""
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(
            f"pseudo labels {tuple(pred_labels.shape)} and ground truth {tuple(gt_labels.shape)} differ in shape"
        )
    gt_labels = gt_labels.to(pred_labels.device)
    valid = gt_labels != ignore_index
    labelled = valid & (pred_labels != ignore_index)
    correct = labelled & (pred_labels == gt_labels)
    return int(labelled.sum()), int(correct.sum()), int(valid.sum())


def pseudo_label_stats(pred_labels: Tensor, gt_labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[float, float]:
    """Table 4: density = labelled / valid-gt pixels, accuracy = correct / labelled (both among valid-gt pixels).

    Fractions in [0, 1]; density is 0 and accuracy NaN when there is nothing to measure.
    """
    labelled, correct, valid = pseudo_label_counts(pred_labels, gt_labels, ignore_index)
    density = labelled / valid if valid else 0.0
    accuracy = correct / labelled if labelled else float("nan")
    return density, accuracy
