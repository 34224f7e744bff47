"""Does each BiDA term do what the paper says it does? Feature-space measurements on target val.

Section 3.2 claims FCL and BCL "minimize intra-class variations and maximize inter-class variations" and align the
domains class by class; section 3.3 that calibration makes dynamic labels more reliable. mIoU alone cannot say which
mechanism works, so at the end of adaptation we measure, with target-val ground truth (measurement only):

- ``own_sim``: cosine of each target pixel feature to the *source* prototype of its true class (what FCL pulls up);
- ``margin``: ``own_sim`` minus the best cosine to another class's source prototype (> 0: a nearest-prototype
  classifier with source prototypes gets the pixel right; what dynamic labels, Eq. 8-9, rely on);
- ``spread``: within-class spread of target features, mean of 1 - cos(f, mu_T(c)) around the target class mean
  (what the contrastive terms should shrink);
- ``proto_cos``: cosine between the source and target prototypes of the same class (class-wise domain alignment);
- ``memory_proto_cos``: the same for the EMA prototypes of Eq. 4-5 (what calibration, Eq. 6-7, corrects by).

Prototypes are masked averages of features (Eq. 1) over up to ``max_images`` images of each domain, source with its
labels, target val with its ground truth. Everything is reduced per class with scatter-adds: no loops over classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dass_train.config import Config
from dass_train.data.domains import eval_dataset, source_dataset
from dass_train.data.transforms import EvalTransform, TransformConfig
from dass_train.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES

METRICS = ("own_sim", "margin", "spread", "proto_cos")


def class_sums(features: Tensor, labels: Tensor, num_classes: int = NUM_CLASSES) -> tuple[Tensor, Tensor]:
    """Per-class feature sums [K,C] and pixel counts [K] of features [N,C,h,w] with labels [N,h,w] (255 ignored)."""
    n, c = features.shape[:2]
    f = features.float().permute(0, 2, 3, 1).reshape(-1, c)
    lab = labels.reshape(-1).to(f.device)
    keep = (lab >= 0) & (lab < num_classes)
    f, lab = f[keep], lab[keep]
    sums = f.new_zeros(num_classes, c).index_add_(0, lab, f)
    counts = torch.bincount(lab, minlength=num_classes).to(f.dtype)
    return sums, counts


def pixel_statistics(features: Tensor, labels: Tensor, proto_s: Tensor, present_s: Tensor, proto_t: Tensor) -> dict:
    """Per-class sums of own_sim, margin and (1 - cos to the target mean) for one batch, plus pixel counts.

    features [N,C,h,w], labels [N,h,w], proto_s / proto_t [K,C], present_s [K] -> {name: [K] sums, "pixels": [K]}.
    """
    k, c = proto_s.shape
    f = F.normalize(features.float().permute(0, 2, 3, 1).reshape(-1, c), dim=1)
    lab = labels.reshape(-1).to(f.device)
    keep = (lab >= 0) & (lab < k) & present_s.to(f.device)[lab.clamp(0, k - 1)]
    f, lab = f[keep], lab[keep]
    sim = f @ F.normalize(proto_s.float(), dim=1).t()  # [P,K]
    sim = sim.masked_fill(~present_s.to(f.device)[None], -2.0)
    own = sim.gather(1, lab[:, None])[:, 0]
    other = sim.scatter(1, lab[:, None], -2.0).max(1).values
    spread = 1.0 - (f * F.normalize(proto_t.float(), dim=1)[lab]).sum(1)
    out = {}
    for name, value in (("own_sim", own), ("margin", own - other), ("spread", spread)):
        out[name] = f.new_zeros(k).index_add_(0, lab, value)
    out["pixels"] = torch.bincount(lab, minlength=k).to(f.dtype)
    return out


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=1)


@torch.no_grad()
def _features(model: nn.Module, images: Tensor, own_statistics: bool) -> Tensor:
    """Features of a batch; ``own_statistics`` normalises trainable BN with the batch's own statistics (a source
    batch under domain BN, as in training) without touching the running statistics."""
    from dass_train.engine import bn_statistics_frozen

    if not own_statistics:
        model.eval()
        return model(images, return_features=True)[1]
    model.train()
    with bn_statistics_frozen(model):
        out = model(images, return_features=True)[1]
    model.eval()
    return out


def _batches(dataset, max_images: int, batch: int):
    n = min(len(dataset), max_images)
    for i in range(0, n, batch):
        items = [dataset[j] for j in range(i, min(n, i + batch))]
        yield torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items])


def _labels_at(labels: Tensor, size) -> Tensor:
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


@torch.no_grad()
def feature_diagnostics(
    model: nn.Module,
    cfg: Config,
    normalization: dict,
    device: torch.device,
    memory=None,
    max_images: int = 200,
    batch: int = 1,
    log: Callable[[str], None] | None = None,
) -> dict:
    """The measurements above for ``model`` -> plain dict: per-class lists (NaN where a class is missing) and means.

    ``batch`` > 1 needs labels of one size (source images of a real data set vary slightly: keep 1 there).
    """
    was = model.training
    domain_bn = cfg.model.domain_bn and not cfg.model.freeze_bn
    tf = EvalTransform(TransformConfig(eval_size=tuple(cfg.data.eval_size)), normalization)
    src = source_dataset(cfg, tf, cfg.run.seed)
    tgt = eval_dataset(cfg, normalization)

    def prototypes(dataset, own_statistics: bool) -> tuple[Tensor, Tensor]:
        sums = counts = None
        for images, labels in _batches(dataset, max_images, batch):
            f = _features(model, images.to(device), own_statistics)
            s, c = class_sums(f, _labels_at(labels, f.shape[2:]).to(device))
            sums, counts = (s, c) if sums is None else (sums + s, counts + c)
        return sums / counts.clamp_min(1)[:, None], counts

    proto_s, count_s = prototypes(src, own_statistics=domain_bn)
    proto_t, count_t = prototypes(tgt, own_statistics=False)
    present_s = count_s > 0
    totals: dict[str, Tensor] = {}
    for images, labels in _batches(tgt, max_images, batch):
        f = _features(model, images.to(device), own_statistics=False)
        stats = pixel_statistics(f, _labels_at(labels, f.shape[2:]).to(device), proto_s, present_s, proto_t)
        totals = stats if not totals else {k: totals[k] + v for k, v in stats.items()}
    model.train(was)

    pixels = totals["pixels"]
    both = present_s & (count_t > 0)
    per_class = {name: torch.where(pixels > 0, totals[name] / pixels.clamp_min(1), torch.nan) for name in METRICS[:3]}
    per_class["proto_cos"] = torch.where(both, _cos(proto_s, proto_t), torch.nan)
    if memory is not None:
        seen = (memory.seen_src & memory.seen_tgt).to(proto_s.device)
        per_class["memory_proto_cos"] = torch.where(
            seen, _cos(memory.mu_src, memory.mu_tgt).to(proto_s.device), torch.nan
        )
    report: dict = {
        "classes": list(CLASS_NAMES),
        "images": {"source": min(len(src), max_images), "target_val": min(len(tgt), max_images)},
    }
    for name, values in per_class.items():
        vals = [float(v) for v in values.cpu()]
        finite = [v for v in vals if not math.isnan(v)]
        report[name] = {"per_class": vals, "mean": sum(finite) / len(finite) if finite else float("nan")}
    # pixel-weighted means: what an average target pixel sees
    for name in METRICS[:3]:
        report[name]["pixel_mean"] = float(totals[name].sum() / pixels.sum().clamp_min(1))
    report["ignore_index"] = IGNORE_INDEX
    if log:
        log(
            "feature diagnostics (target val): own-class cosine to source prototypes {:.3f}, margin {:.3f}, "
            "within-class spread {:.3f}, source/target prototype cosine {:.3f}".format(
                *(report[m]["mean"] for m in METRICS)
            )
        )
    return report


__all__ = ["METRICS", "class_sums", "feature_diagnostics", "pixel_statistics"]
