"""Confusion matrices and IoU scores (numpy only, so the torch-free runtime side can score predictions too).

The definitions follow ``cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling``: pixels whose ground truth is
ignored are dropped, IoU_c = TP / (TP + FP + FN) from the confusion matrix, a class with TP + FP + FN = 0 (absent
from both ground truth and prediction) gets IoU nan, and mIoU is the plain mean over the non-nan classes.
SYNTHIA results are reported as the mean over a subset of these 19-class IoUs (16 or 13 classes), as in the paper.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from dass_train.labels import CLASS_NAMES, IGNORE_INDEX

__all__ = ["confusion_matrix", "scores", "format_table"]


def confusion_matrix(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Count (ground truth, prediction) pairs -> int64 ``[K,K]``, rows = ground truth, columns = prediction.

    ``pred`` and ``gt`` are trainId maps of the same shape (any leading dims). Pixels with ``gt == ignore_index`` are
    dropped. Any other value outside ``[0, K)`` is refused: in ``gt`` it usually means labelIds were passed instead
    of trainIds; in ``pred`` (on a labelled pixel) it would be a miss that a ``[K,K]`` matrix cannot hold.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    k = int(num_classes)
    gt = gt.astype(np.int64, copy=False).ravel()
    pred = pred.astype(np.int64, copy=False).ravel()
    valid = gt != ignore_index
    gt, pred = gt[valid], pred[valid]
    if gt.size and (gt.min() < 0 or gt.max() >= k):
        raise ValueError(f"ground truth has values outside [0, {k}) other than {ignore_index}: pass trainIds")
    if pred.size and (pred.min() < 0 or pred.max() >= k):
        raise ValueError(f"prediction has values outside [0, {k}) on labelled pixels")
    return np.bincount(gt * k + pred, minlength=k * k).reshape(k, k).astype(np.int64)


def _nanmean(values: np.ndarray) -> float:
    """Mean over the finite entries; nan (without a RuntimeWarning) when there are none."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def scores(conf: np.ndarray, classes: Sequence[int] | None = None) -> dict:
    """IoU and accuracy from a confusion matrix ``[K,K]`` (rows = ground truth).

    Returns ``{"miou", "iou", "acc", "macc", "classes"}``: ``iou`` and ``class_acc`` list all K classes (nan where
    undefined) so they stay indexable by trainId; ``miou`` / ``macc`` average over ``classes`` (all K when None),
    skipping nan like cityscapesscripts; ``acc`` is the overall pixel accuracy over every labelled pixel.
    """
    conf = np.asarray(conf, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square [K,K], got {conf.shape}")
    k = conf.shape[0]
    subset = np.arange(k) if classes is None else np.asarray(list(classes), dtype=np.int64)
    tp = np.diag(conf)
    gt_count = conf.sum(axis=1)
    pred_count = conf.sum(axis=0)
    union = gt_count + pred_count - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        class_acc = np.where(gt_count > 0, tp / gt_count, np.nan)
    total = conf.sum()
    return {
        "miou": _nanmean(iou[subset]),
        "iou": [float(v) for v in iou],
        "acc": float(tp.sum() / total) if total > 0 else float("nan"),
        "macc": _nanmean(class_acc[subset]),
        "class_acc": [float(v) for v in class_acc],
        "classes": [int(c) for c in subset],
    }


def format_table(
    scores_dict: Mapping, class_names: Sequence[str] = CLASS_NAMES, classes: Sequence[int] | None = None
) -> str:
    """Per-class IoU table in percent, then every ``miou*`` entry of ``scores_dict`` (e.g. miou, miou16, miou13).

    ``classes`` limits the rows (default: ``scores_dict["classes"]`` if present, else all); nan prints as ``n/a``.
    """
    iou = list(scores_dict["iou"])
    rows = list(classes if classes is not None else scores_dict.get("classes", range(len(iou))))
    width = max([len(str(class_names[c])) for c in rows] + [len("mIoU"), 8])

    def pct(value: float) -> str:
        return "   n/a" if value is None or np.isnan(value) else f"{100.0 * value:6.2f}"

    lines = [f"{'class':<{width}}  IoU(%)", "-" * (width + 8)]
    lines += [f"{class_names[c]:<{width}}  {pct(iou[c])}" for c in rows]
    lines.append("-" * (width + 8))
    for key in sorted(k for k in scores_dict if str(k).startswith("miou")):
        label = "mIoU" + str(key)[4:]
        lines.append(f"{label:<{width}}  {pct(scores_dict[key])}")
    if "acc" in scores_dict:
        lines.append(f"{'pixel acc':<{width}}  {pct(scores_dict['acc'])}")
    return "\n".join(lines)
