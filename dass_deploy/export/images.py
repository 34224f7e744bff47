"""Images for calibration, parity and validation: files, synthetic photo-like inputs, Cityscapes-layout val pairs."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from dass_deploy.errors import DeployError
from dass_deploy.export.graph import INPUT_NAME

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted)."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_image(path: Path, height: int, width: int) -> np.ndarray:
    """Image file -> float32 ``[3,H,W]`` RGB 0..255 resized (bilinear) to the export size."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DeployError(f"cannot read image {path}")
    rgb = cv2.cvtColor(cv2.resize(bgr, (width, height), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)


def synthetic_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``n`` smooth random RGB images float32 ``[n,3,H,W]`` 0..255: coarse colour blobs plus mild noise, closer to
    photos than white noise (which drives every logit to the same class)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, height, width), dtype=np.float32)
    for i in range(n):
        coarse = rng.uniform(0, 255, size=(max(2, height // 16), max(2, width // 16), 3)).astype(np.float32)
        smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
        out[i] = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).transpose(2, 0, 1)
    return out


class ImageFolderReader:
    """ONNX Runtime ``CalibrationDataReader``: one ``{"image": [1,3,H,W]}`` per calibration image."""

    def __init__(self, paths: Sequence[Path], height: int, width: int) -> None:
        self.paths, self.height, self.width = list(paths), height, width
        self._iter: Iterator[Path] = iter(self.paths)

    def get_next(self) -> dict | None:
        path = next(self._iter, None)
        return None if path is None else {INPUT_NAME: load_image(path, self.height, self.width)[None]}

    def rewind(self) -> None:
        self._iter = iter(self.paths)


def find_val_pairs(root: Path) -> list[tuple[Path, Path]]:
    """Cityscapes layout ``leftImg8bit/val/<city>/*_leftImg8bit.png`` + ``gtFine/val/<city>/*_gtFine_label*.png``."""
    images_root = root / "leftImg8bit" / "val" if (root / "leftImg8bit" / "val").is_dir() else root / "leftImg8bit"
    if not images_root.is_dir():
        raise DeployError(f"--int8-val {root}: no leftImg8bit/ folder (Cityscapes layout expected)")
    pairs = []
    for image in sorted(images_root.rglob("*_leftImg8bit.png")):
        rel = image.relative_to(root / "leftImg8bit")
        base = root / "gtFine" / rel.parent / image.name.replace("_leftImg8bit.png", "_gtFine_")
        for suffix in ("labelTrainIds.png", "labelIds.png"):
            label = Path(str(base) + suffix)
            if label.is_file():
                pairs.append((image, label))
                break
    if not pairs:
        raise DeployError(f"--int8-val {root}: no image/label pairs found under leftImg8bit/ and gtFine/")
    return pairs


def load_train_ids(path: Path, height: int, width: int) -> np.ndarray:
    from dass_train.labels import label_ids_to_train_ids

    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise DeployError(f"cannot read label {path}")
    if label.ndim == 3:
        label = label[..., 0]
    if path.name.endswith("_labelIds.png"):
        label = label_ids_to_train_ids(label)
    return cv2.resize(label.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
