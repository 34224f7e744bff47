"""The standard evaluation protocol (official-code-facts: "Evaluation") on any device, with optional TTA.

Predict at the eval size (1024x512 for Cityscapes), upsample the logits bilinearly to the label's full resolution
(2048x1024), argmax, and accumulate one confusion matrix over the split; scores come from ``metrics.scores`` so they
match cityscapesscripts. SYNTHIA numbers are the same 19-class IoUs averaged over 16 and 13 classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dass_train.bida import upsample_logits
from dass_train.labels import IGNORE_INDEX, NUM_CLASSES, SYNTHIA_13, SYNTHIA_16
from dass_train.metrics import scores

__all__ = ["ConfusionMatrix", "predict_logits", "evaluate", "DEFAULT_SUBSETS"]

#: Extra mIoUs reported by ``evaluate`` for 19-class models (SYNTHIA -> Cityscapes protocol).
DEFAULT_SUBSETS: dict[str, tuple[int, ...]] = {"miou16": SYNTHIA_16, "miou13": SYNTHIA_13}


class ConfusionMatrix:
    """int64 ``[K,K]`` confusion (rows = ground truth) accumulated on the device, one bincount per batch."""

    def __init__(self, num_classes: int = NUM_CLASSES, device: str | torch.device = "cpu") -> None:
        self.num_classes = int(num_classes)
        self.mat = torch.zeros(self.num_classes * self.num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, gt: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> None:
        """``pred`` / ``gt``: trainIds ``[N,H,W]`` (any int dtype); pixels with ``gt == ignore_index`` are skipped."""
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from ground truth {tuple(gt.shape)}")
        k = self.num_classes
        gt = gt.to(self.mat.device, torch.int64).reshape(-1)
        pred = pred.to(self.mat.device, torch.int64).reshape(-1)
        valid = gt != ignore_index
        gt, pred = gt[valid], pred[valid]
        if gt.numel() and bool(((gt < 0) | (gt >= k) | (pred < 0) | (pred >= k)).any()):
            raise ValueError(f"values outside [0, {k}) in ground truth (other than {ignore_index}) or prediction")
        self.mat += torch.bincount(gt * k + pred, minlength=k * k)

    def all_reduce(self) -> None:
        """Sum the matrices of all DDP ranks (no-op outside torch.distributed)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.mat, op=torch.distributed.ReduceOp.SUM)

    def compute(self) -> np.ndarray:
        return self.mat.reshape(self.num_classes, self.num_classes).cpu().numpy().astype(np.int64)


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.float()


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    out_size: tuple[int, int],
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    align_corners: bool = False,
) -> torch.Tensor:
    """Class scores ``[N,K,H,W]`` at ``out_size=(H,W)`` for normalised ``images [N,3,h,w]``.

    Without TTA: the model's logits upsampled bilinearly. With flip and/or several scales (relative to ``h,w``):
    log of the softmax probabilities averaged over all views, so ``softmax`` of the result is the averaged
    probability and ``argmax`` is the TTA prediction; pseudo-label generation can use either the same way.
    ``align_corners`` is the model's logit upsampling (``bida.upsample_logits``; True for the authors' lineage).
    """
    out_h, out_w = int(out_size[0]), int(out_size[1])
    h, w = images.shape[-2:]
    scales = tuple(scales)
    if not flip and scales == (1.0,):
        return upsample_logits(_forward(model, images), (out_h, out_w), align_corners)
    prob_sum = None
    views = 0
    for s in scales:
        x = images if s == 1.0 else F.interpolate(images, size=(round(h * s), round(w * s)), mode="bilinear")
        batches = [(x, False), (x.flip(-1), True)] if flip else [(x, False)]
        for view, flipped in batches:
            logits = _forward(model, view)
            if flipped:
                logits = logits.flip(-1)
            prob = upsample_logits(logits, (out_h, out_w), align_corners).softmax(dim=1)
            prob_sum = prob if prob_sum is None else prob_sum + prob
            views += 1
    return (prob_sum / views).clamp_min(1e-12).log()


def _batch_images_labels(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, Mapping):
        if "label" not in batch:
            raise ValueError("evaluation needs labelled batches (a 'label' key)")
        return batch["image"], batch["label"]
    return batch[0], batch[1]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    num_classes: int = NUM_CLASSES,
    device: str | torch.device = "cpu",
    eval_size: tuple[int, int] | None = (1024, 512),
    full_size: tuple[int, int] | None = None,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    amp: bool = False,
    progress: bool = True,
    class_subsets: Mapping[str, Sequence[int]] | None = None,
    align_corners: bool = False,
) -> dict:
    """Score ``model`` on ``loader`` (batches ``{"image" [N,3,h,w], "label" [N,H,W]}``, labels at full size).

    ``eval_size=(W,H)``: images of another size are resized to it first (None: use them as they come).
    ``full_size=(W,H)``: resolution the logits are upsampled to (None: the label's own size).
    ``class_subsets`` adds ``{name: mIoU over those trainIds}`` (default miou16 / miou13 for 19 classes).
    Returns ``scores(...)`` plus the subset mIoUs, ``"confusion"`` (int64 [K,K]) and ``"num_images"``;
    the model's train/eval mode is restored afterwards. Under DDP (each rank given its own shard of the split)
    every rank gets the global result.
    """
    device = torch.device(device)
    if class_subsets is None:
        class_subsets = DEFAULT_SUBSETS if num_classes == NUM_CLASSES else {}
    was_training = model.training
    model.eval()
    conf = ConfusionMatrix(num_classes, device)
    num_images = 0
    iterator = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc="evaluate", unit="batch", leave=False)
    autocast_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    try:
        for batch in iterator:
            images, labels = _batch_images_labels(batch)
            images = images.to(device, non_blocking=True).float()
            labels = labels.to(device, non_blocking=True)
            if eval_size is not None and tuple(images.shape[-2:]) != (eval_size[1], eval_size[0]):
                images = F.interpolate(images, size=(eval_size[1], eval_size[0]), mode="bilinear", align_corners=False)
            out_hw = labels.shape[-2:] if full_size is None else (full_size[1], full_size[0])
            with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=amp):
                logits = predict_logits(model, images, out_hw, flip=flip, scales=scales, align_corners=align_corners)
            pred = logits.argmax(dim=1)
            if pred.shape != labels.shape:
                labels = F.interpolate(labels[:, None].float(), size=pred.shape[-2:], mode="nearest")[:, 0].long()
            conf.update(pred, labels)
            num_images += images.shape[0]
    finally:
        model.train(was_training)
    conf.all_reduce()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        count = torch.tensor([num_images], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(count)
        num_images = int(count.item())
    matrix = conf.compute()
    result = scores(matrix)
    for name, subset in class_subsets.items():
        result[name] = scores(matrix, subset)["miou"]
    result["confusion"] = matrix
    result["num_images"] = num_images
    return result
