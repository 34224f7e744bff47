"""The two domains of a run as datasets and endless sample streams: which folders, which transforms, which labels.

Shared by every stage: the source stream (labelled, rare-class sampled), the target stream (with static pseudo labels
or a teacher's, plus the ground truth for measurements only), and target val for evaluation.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dass_train.config import Config
from dass_train.data.datasets import CityscapesDataset, GTA5Dataset, SegmentationDataset, SynthiaDataset, read_index_png
from dass_train.data.transforms import EvalTransform, TrainTransform, TransformConfig, normalize
from dass_train.pseudo_labels import label_path

if TYPE_CHECKING:
    from dass_train.data.synthetic import SyntheticConfig


def source_dataset(cfg: Config, transforms, seed: int) -> SegmentationDataset:
    d = cfg.data
    if d.source == "gta5":
        return GTA5Dataset(d.source_root, transforms, seed=seed)
    if d.source == "synthia":
        return SynthiaDataset(d.source_root, transforms, seed=seed)
    return GTA5Dataset(Path(d.synthetic_root) / "gta5", transforms, seed=seed)


def target_root(cfg: Config) -> Path:
    return (
        Path(cfg.data.synthetic_root) / "cityscapes" if cfg.data.source == "synthetic" else Path(cfg.data.target_root)
    )


def target_dataset(cfg: Config, split: str, transforms, with_labels: bool, seed: int = 0) -> CityscapesDataset:
    return CityscapesDataset(target_root(cfg), split, transforms, with_labels=with_labels, seed=seed)


def eval_dataset(cfg: Config, normalization: dict) -> CityscapesDataset:
    tf = EvalTransform(TransformConfig(eval_size=tuple(cfg.data.eval_size)), normalization)
    return target_dataset(cfg, cfg.data.val_split, tf, with_labels=True)


def ensure_synthetic(cfg: Config, progress: bool | None = None) -> None:
    """The embedded benchmark is generated on first use (deterministic by seed, reused afterwards).
    ``progress`` defaults to the run's ``run.progress``."""
    if cfg.data.source != "synthetic":
        return
    from dass_train.data.synthetic import ensure_dataset

    show = cfg.run.progress if progress is None else progress
    ensure_dataset(cfg.data.synthetic_root, synthetic_settings(cfg), progress=show)


def synthetic_settings(cfg: Config) -> SyntheticConfig:
    """The generator settings a run's config asks for (the generator module, with OpenCV, is imported lazily)."""
    from dass_train.data.synthetic import SyntheticConfig

    w, h = cfg.data.synthetic_size
    n_src, n_tt, n_tv = cfg.data.synthetic_counts
    return SyntheticConfig(
        width=w,
        height=h,
        n_source=n_src,
        n_target_train=n_tt,
        n_target_val=n_tv,
        seed=cfg.run.seed,
        style_shift=cfg.data.synthetic_style_shift,
        class_shift=cfg.data.synthetic_class_shift,
        style=cfg.data.synthetic_style,
    )


class TargetWithLabels(Dataset):
    """Target images with a label read from ``label_dir`` (static pseudo labels, or a teacher's), plus the ground
    truth under the same augmentation when it exists (only for the Table 4 statistics, never for training)."""

    def __init__(self, base: CityscapesDataset, transform: TrainTransform, label_dir: Path | None, with_gt: bool):
        self.base, self.transform, self.label_dir = base, transform, label_dir
        self.with_gt = with_gt and base.has_labels

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, draw = int(key[0]), int(key[1])
        rng = np.random.default_rng([self.base.seed, draw, index])
        image = self.base.load_image(index)
        label = None
        if self.label_dir is not None:
            label = read_index_png(label_path(self.label_dir, self.base.names[index]), modes=("L",))
        raw, label = self.transform.augment(image, label, copy.deepcopy(rng))
        item: dict[str, Any] = {"image": normalize(raw, self.transform.normalization), "index": index}
        if label is not None:
            item["label"] = torch.from_numpy(label.astype(np.int64))
        if self.with_gt:
            _, gt = self.transform.augment(image, self.base.load_label(index), rng)
            item["gt"] = torch.from_numpy(gt.astype(np.int64))
        return item


class Stream:
    """An endless iterator over a DataLoader driven by a resumable (index, draw) sampler."""

    def __init__(self, dataset: Dataset, sampler, batch: int, workers: int, device: torch.device):
        self.dataset, self.sampler, self.batch, self.workers, self.device = dataset, sampler, batch, workers, device
        self._it = None

    def _loader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch,
            sampler=self.sampler,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=False,
        )

    def restart(self, consumed: int) -> None:
        """Continue the stream at this rank's ``consumed``-th sample (after a resume or a label refresh)."""
        self.sampler.load_state_dict(self.sampler.state_dict(consumed=consumed))
        self._it = iter(self._loader())

    def next(self) -> dict:
        if self._it is None:
            self._it = iter(self._loader())
        batch = next(self._it)
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class SizedTarget(Dataset):
    """Eval-transformed target images plus the full size the pseudo label must have (the image's own)."""

    def __init__(self, base: CityscapesDataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        with Image.open(self.base.image_files[i]) as im:
            item["full_size"] = im.size
        return item
