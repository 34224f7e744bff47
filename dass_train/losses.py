"""One BiDA training step's objective (Eq. 11-12), composed from the equations in ``bida.py``.

Read top to bottom next to section 3 of the paper: prototypes (Eq. 1), calibrated dynamic labels (Eq. 6-9), hybrid
labels (Eq. 10), the EMA memory (Eq. 4-5), FCL / BCL (Eq. 2-3) and the base terms (Eq. 11). The function returns
its intermediate labels and prototypes as well as the losses, so tests can check the wiring (which domain feeds
which term), not only each equation on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from dass_train import bida
from dass_train.config import LossConfig, MethodConfig
from dass_train.labels import NUM_CLASSES


@dataclass
class BidaStep:
    """What one step computed. Labels are at feature resolution [N,h,w]; prototypes [K,C] (or [N,K,C] per pair)."""

    losses: dict[str, Tensor]
    y_s: Tensor
    y_f: Tensor  # static labels (CBST)
    y_d: Tensor | None  # the dynamic labels used (None with dynamic_labels=off)
    y_t: Tensor  # hybrid labels (Eq. 10), or the static ones without dynamic labels
    rho_s: Tensor
    pres_s: Tensor
    rho_t: Tensor
    pres_t: Tensor
    counts: dict[str, Tensor] = field(default_factory=dict)  # Table 4: {name: (labelled, correct, valid)}


def bida_step(
    logit_s: Tensor,
    logit_t: Tensor,
    f_s: Tensor,
    f_t: Tensor,
    label_s: Tensor,
    static_t: Tensor,
    memory: bida.PrototypeMemory,
    method: MethodConfig,
    weights: LossConfig,
    distributed: bool = False,
    target_gt: Tensor | None = None,
    align_corners: bool = False,
) -> BidaStep:
    """The weighted terms of Eq. 12 for one (source, target) batch.

    logits [N,K,h,w], features [N,C,h,w] (1/8 resolution), source labels and static target labels [N,H,W] at crop
    resolution. Updates ``memory`` (Eq. 4-5) after using it, so the bias of Eq. 6 comes from earlier batches.
    ``method.prototypes="pair"`` pools prototypes per (source i, target i) pair for the contrastive terms and the
    dynamic labels; the memory always takes the batch prototypes. ``target_gt`` (measurement only, never a loss)
    adds Table 4 counts.
    """
    logit_s, logit_t, f_s, f_t = logit_s.float(), logit_t.float(), f_s.float(), f_t.float()
    size = f_s.shape[2:]
    y_s = bida.downsample_labels(label_s, size)
    y_f = bida.downsample_labels(static_t, size)  # static labels y_F (CBST)
    per_pair = method.prototypes == "pair"

    def prototypes(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(batch prototypes for the memory, their presence, the prototypes the losses use, their presence)."""
        rho, pres = bida.class_prototypes(features, labels, NUM_CLASSES, distributed=distributed)  # Eq. 1
        if weights.detach_prototypes:
            rho = rho.detach()
        if not per_pair:
            return rho, pres, rho, pres
        rho_pair, pres_pair = bida.pair_prototypes(features, labels, NUM_CLASSES)  # Eq. 1, per pair
        return rho, pres, (rho_pair.detach() if weights.detach_prototypes else rho_pair), pres_pair

    rho_s_batch, pres_s_batch, rho_s, pres_s = prototypes(f_s, y_s)

    def dynamic(rho: Tensor) -> Tensor:  # Eq. 8-9
        return bida.dynamic_pseudo_labels(
            f_t, rho, pres_s, method.dynamic_threshold, score=method.dynamic_score, tau=weights.tau
        )

    need_all = target_gt is not None
    dyn_raw = dynamic(rho_s.detach()) if method.dynamic_labels == "uncalibrated" or need_all else None
    dyn_cal = None
    if method.dynamic_labels == "calibrated" or need_all:
        dyn_cal = dynamic(memory.calibrate(rho_s.detach()))  # Eq. 6-7 on the source side, then Eq. 8-9
    y_d = {"off": None, "uncalibrated": dyn_raw, "calibrated": dyn_cal}[method.dynamic_labels]
    y_t = y_f if y_d is None else bida.hybrid_pseudo_labels(y_d, y_f)  # Eq. 10
    rho_t_batch, pres_t_batch, rho_t, pres_t = prototypes(f_t, y_t)
    memory.update(rho_s_batch, pres_s_batch, rho_t_batch, pres_t_batch)  # Eq. 4-5

    losses = {  # Eq. 11
        "seg_s": weights.seg_source * bida.segmentation_loss(logit_s, label_s, align_corners=align_corners),
        "seg_t": weights.seg_target * bida.segmentation_loss(logit_t, static_t, align_corners=align_corners),
        "ent_s": weights.ent_source * bida.entropy_loss(logit_s, weights.entropy),
        "ent_t": weights.ent_target * bida.entropy_loss(logit_t, weights.entropy),
    }

    def contrast(features: Tensor, labels: Tensor, rho: Tensor, present: Tensor) -> Tensor:
        return bida.contrastive_loss(features, labels, rho, present, weights.tau, mean=weights.contrastive_mean)

    if method.use_fcl:  # Eq. 2: target pixels against source prototypes
        losses["fcl"] = weights.fcl * contrast(f_t, y_t, rho_s, pres_s)
    if method.use_bcl:  # Eq. 3: source pixels against target prototypes
        losses["bcl"] = weights.bcl * contrast(f_s, y_s, rho_t, pres_t)

    counts: dict[str, Tensor] = {}
    if target_gt is not None:
        gt = bida.downsample_labels(target_gt, size)
        labels = {
            "static": y_f,
            "dyn_raw": dyn_raw,
            "dyn_cal": dyn_cal,
            "hybrid": bida.hybrid_pseudo_labels(dyn_cal, y_f),
        }
        for key, lab in labels.items():
            counts[key] = torch.tensor(bida.pseudo_label_counts(lab, gt), dtype=torch.float64)
    return BidaStep(losses, y_s, y_f, y_d, y_t, rho_s, pres_s, rho_t, pres_t, counts)


def bida_losses(*args, **kwargs) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``bida_step`` reduced to (losses, Table 4 counts), the trainer's view of one step."""
    step = bida_step(*args, **kwargs)
    return step.losses, step.counts


__all__ = ["BidaStep", "bida_losses", "bida_step"]
