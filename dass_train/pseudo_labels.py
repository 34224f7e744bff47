"""The static-label pass over the target train set (CBST [58], as the baseline of Table 3 uses it).

One inference pass, not two: every image's confidence and argmax are cached (at the prediction size, uint16 +
uint8) while the class-balanced histograms accumulate; the thresholds are then applied to the cache. That keeps
label generation close to plain inference throughput. Labels are written as PNGs at the image's full size, so the
training transforms treat them exactly like ground truth.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from dass_train import bida
from dass_train.distributed import DistInfo, all_reduce_sum, barrier
from dass_train.labels import IGNORE_INDEX


@dataclass
class StaticLabelResult:
    directory: Path
    thresholds: list[float]
    images: int
    seconds: float
    density: float  # labelled / all pixels


def _quantize(p: torch.Tensor) -> torch.Tensor:
    """Probabilities in [0, 1] -> integers on a 1/65535 grid (floor), the cache's 2-byte confidence format."""
    return (p.double() * 65535).floor().clamp(0, 65535).to(torch.int32)


def label_path(directory: Path, name: str) -> Path:
    """Where the pseudo label of target image ``name`` (its path relative to the split) lives."""
    return directory / (str(Path(name).with_suffix("")) + "_pseudo.png")


@torch.no_grad()
def generate_static_labels(
    model: nn.Module,
    dataset,
    out_dir: Path,
    *,
    num_classes: int,
    portion: float,
    image_portion: float,
    excluded_classes: tuple[int, ...] = (),
    device: torch.device,
    dist_info: DistInfo | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    align_corners: bool = False,
) -> StaticLabelResult:
    """Predict every target-train image once, fix CBST thresholds globally, write labels to ``out_dir``.

    ``dataset`` yields eval-transformed samples (``image`` at the prediction size, ``label`` full size or absent,
    ``name``); under DDP each rank takes every world_size-th image and histograms are summed over ranks.
    """
    dist_info = dist_info or DistInfo(device=device)
    out_dir = Path(out_dir)
    cache_dir = out_dir / ".cache"
    if dist_info.is_main:
        if out_dir.exists():
            shutil.rmtree(out_dir)
        cache_dir.mkdir(parents=True)
    barrier()
    was_training = model.training
    model.eval()
    cbst = bida.ClassBalancedThresholds(num_classes, portion, device=device)
    mine = range(dist_info.rank, len(dataset), dist_info.world_size)
    start = time.perf_counter()
    records: list[tuple[str, Path, float, tuple[int, int]]] = []
    bar = tqdm(mine, desc="static labels", unit="img", disable=not (progress and dist_info.is_main), leave=False)
    for i in bar:
        sample = dataset[i]
        x = sample["image"][None].to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        probs = bida.upsample_logits(logits.float(), x.shape[2:], align_corners).softmax(1)
        cbst.update(probs)
        conf, cls = probs.max(1)  # [1,H,W]
        cut = float(bida.image_confidence_cut(conf, image_portion)[0])
        cache = cache_dir / f"{i:07d}.npz"
        np.savez(cache, conf=_quantize(conf[0]).cpu().numpy(), cls=cls[0].to(torch.uint8).cpu().numpy())
        full = sample.get("full_size")
        size = tuple(full) if full is not None else tuple(sample["raw_size"])
        records.append((sample["name"], cache, cut, size))
    cbst.all_reduce()
    thresholds = cbst.thresholds().cpu()
    labelled = total = 0
    for name, cache, cut, (w, h) in records:
        data = np.load(cache)
        conf = torch.from_numpy(data["conf"].astype(np.int64))[None]
        cls = torch.from_numpy(data["cls"].astype(np.int64))[None]
        # compared on the cache's 1/65535 grid: thresholds and cut are quantised the same way as the confidences
        label = (
            bida.threshold_static_labels(
                conf, cls, _quantize(thresholds), _quantize(torch.tensor([cut])), IGNORE_INDEX, excluded_classes
            )[0]
            .numpy()
            .astype(np.uint8)
        )
        if (label.shape[1], label.shape[0]) != (w, h):
            label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
        path = label_path(out_dir, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(label).save(path)
        labelled += int((label != IGNORE_INDEX).sum())
        total += label.size
        cache.unlink()
    counts = all_reduce_sum(torch.tensor([labelled, total], dtype=torch.float64))
    barrier()
    seconds = time.perf_counter() - start
    if dist_info.is_main:
        shutil.rmtree(cache_dir, ignore_errors=True)
        (out_dir / "thresholds.json").write_text(
            json.dumps({"thresholds": [round(float(t), 6) for t in thresholds], "seconds": seconds}, indent=1)
        )
    model.train(was_training)
    n = len(dataset)
    return StaticLabelResult(
        directory=out_dir,
        thresholds=[float(t) for t in thresholds],
        images=n,
        seconds=seconds,
        density=float(counts[0] / counts[1].clamp_min(1)),
    )
