"""Training / evaluation transforms of the paper, on numpy uint8 with OpenCV, then normalisation to tensors.

Randomness comes only from the ``np.random.Generator`` passed in (datasets derive it from seed, draw and index), so
an augmented sample can be reproduced exactly after a resume and no global RNG state is involved.

Sizes are ``(W, H)`` like OpenCV. Images are resized bilinearly, labels with nearest neighbour (a label is a class
map: interpolating ids would invent classes at boundaries).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from dass_train.labels import IGNORE_INDEX

__all__ = [
    "CAFFE_BGR",
    "IMAGENET_RGB",
    "DEFAULT_NORMALIZATION",
    "NORMALIZATIONS",
    "TransformConfig",
    "TrainTransform",
    "EvalTransform",
    "normalize",
    "resize_image",
    "resize_label",
]

#: DeepLab / Caffe lineage (the authors' code and the AdaptSegNet-family checkpoints): BGR, mean only.
CAFFE_BGR: dict = {"color": "BGR", "mean": [104.008, 116.669, 122.679], "std": [1.0, 1.0, 1.0]}
#: torchvision ImageNet initialisation.
IMAGENET_RGB: dict = {"color": "RGB", "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
#: The paper's setting (see docs/ARCHITECTURE.md, ``meta["normalization"]``).
DEFAULT_NORMALIZATION: dict = CAFFE_BGR
#: Names used by ``--model.normalization``.
NORMALIZATIONS: dict[str, dict] = {"caffe": CAFFE_BGR, "imagenet": IMAGENET_RGB}


@dataclass
class TransformConfig:
    """Augmentation sizes; the defaults are the authors' adaptation recipe (warm-up used 720 / (0.5,1.5) / 600).

    ``crop`` and ``eval_size`` are ``(W, H)``; ``None`` disables that step.
    """

    resize_short: int | None = 850
    scale: tuple[float, float] | None = (0.8, 1.2)
    crop: tuple[int, int] | None = (730, 730)
    flip: bool = True
    eval_size: tuple[int, int] | None = (1024, 512)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``[H,W,3]`` uint8 to ``size=(W,H)``."""
    if (image.shape[1], image.shape[0]) == tuple(size):
        return image
    return cv2.resize(image, tuple(int(s) for s in size), interpolation=cv2.INTER_LINEAR)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a class map ``[H,W]`` to ``size=(W,H)``."""
    if (label.shape[1], label.shape[0]) == tuple(size):
        return label
    return cv2.resize(label, tuple(int(s) for s in size), interpolation=cv2.INTER_NEAREST)


def normalize(rgb: np.ndarray, normalization: Mapping = DEFAULT_NORMALIZATION) -> torch.Tensor:
    """RGB uint8 ``[H,W,3]`` -> float32 ``[3,H,W]``: optional swap to BGR, then ``(x - mean) / std`` on 0..255."""
    x = np.asarray(rgb, dtype=np.float32)
    if str(normalization.get("color", "RGB")).upper() == "BGR":
        x = x[..., ::-1]
    mean = np.asarray(normalization["mean"], dtype=np.float32)
    std = np.asarray(normalization.get("std", (1.0, 1.0, 1.0)), dtype=np.float32)
    x = (x - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def _label_tensor(label: np.ndarray | None) -> torch.Tensor | None:
    return None if label is None else torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))


class _Transform:
    """Common output: ``{"image": float32 [3,H,W], "label": int64 [H,W] | None, "raw": uint8 [H,W,3]}``."""

    def __init__(self, cfg: TransformConfig | None = None, normalization: Mapping | None = None) -> None:
        self.cfg = cfg if cfg is not None else TransformConfig()
        self.normalization = dict(normalization if normalization is not None else DEFAULT_NORMALIZATION)

    def augment(
        self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def __call__(
        self, image: np.ndarray, label: np.ndarray | None = None, rng: np.random.Generator | None = None
    ) -> dict:
        raw, label = self.augment(image, label, rng)
        return {"image": normalize(raw, self.normalization), "label": _label_tensor(label), "raw": raw}


class TrainTransform(_Transform):
    """Resize shorter side to S, random scale, random crop (padded when too small), horizontal flip."""

    def augment(
        self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if rng is None:
            raise ValueError("TrainTransform needs an explicit np.random.Generator (reproducible augmentation)")
        cfg = self.cfg
        h, w = image.shape[:2]
        # One resize for "shorter side to S" and the random scale: fewer interpolations, same geometry.
        factor = cfg.resize_short / min(h, w) if cfg.resize_short else 1.0
        if cfg.scale is not None:
            factor *= float(rng.uniform(cfg.scale[0], cfg.scale[1]))
        if factor != 1.0:
            size = (max(1, round(w * factor)), max(1, round(h * factor)))
            image = resize_image(image, size)
            label = None if label is None else resize_label(label, size)
        if cfg.crop is not None:
            image, label = self._random_crop(image, label, cfg.crop, rng)
        if cfg.flip and rng.random() < 0.5:
            image = image[:, ::-1]
            label = None if label is None else label[:, ::-1]
        return np.ascontiguousarray(image), None if label is None else np.ascontiguousarray(label)

    @staticmethod
    def _random_crop(
        image: np.ndarray, label: np.ndarray | None, crop: tuple[int, int], rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        cw, ch = int(crop[0]), int(crop[1])
        h, w = image.shape[:2]
        pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
        if pad_h or pad_w:
            # Pad bottom/right: zeros for the image, ignore for the label so padding never counts as a class.
            image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0)
            if label is not None:
                label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
            h, w = image.shape[:2]
        y = int(rng.integers(0, h - ch + 1))
        x = int(rng.integers(0, w - cw + 1))
        image = image[y : y + ch, x : x + cw]
        label = None if label is None else label[y : y + ch, x : x + cw]
        return image, label


class EvalTransform(_Transform):
    """Resize the image to ``cfg.eval_size`` and keep the label at full resolution (the standard protocol:
    predict at 1024x512, upsample the logits to the label's 2048x1024)."""

    def augment(
        self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if self.cfg.eval_size is not None:
            image = resize_image(image, self.cfg.eval_size)
        return image, label
