"""``Segmenter``: RGB image(s) in, trainId maps of the same size out, whatever the backend.

Resizing is plain (no letterbox): the image is stretched to the model size, and the labels come back with nearest
neighbour so no class is invented at boundaries. Torch-free unless the torch backend is chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dass_deploy.backends import Backend, create_backend
from dass_deploy.errors import DeployError


def parse_size(text: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"512x1024"`` (HxW) -> ``(512, 1024)``; a one-line ``DeployError`` names the bad value."""
    if text is None or isinstance(text, tuple | list):
        return tuple(int(v) for v in text) if text is not None else None  # type: ignore[return-value]
    try:
        h, w = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise DeployError(f"--size {text!r}: expected HxW, e.g. 512x1024") from None
    if h <= 0 or w <= 0 or h % 8 or w % 8:
        raise DeployError(f"--size {text!r}: height and width must be positive multiples of 8")
    return h, w


def resize_to(rgb: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """``uint8 [H,W,3]`` stretched (bilinear) to ``size`` (H, W); unchanged when it has that size or ``size`` is
    None. What every model input goes through: inference here, BN adaptation (``adapt_bn``) alike."""
    if size is not None and rgb.shape[:2] != tuple(size):
        rgb = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return rgb


class Segmenter:
    """One inference path for the CLI, the demo and the benchmark.

    ``model``: a model directory, a checkpoint file, an already built ``Backend``, or None for the default model.
    ``size``: (H, W) to run at; only a dynamic model accepts a size other than its own. With neither (a bare
    checkpoint), each image runs at its own size.
    """

    def __init__(
        self,
        model: str | Path | Backend | None = None,
        backend: str = "auto",
        device: str = "cpu",
        size: tuple[int, int] | str | None = None,
        threads: int | None = None,
        precision: str = "fp32",
    ):
        if model is None:
            from dass_deploy.repository import default_model_dir

            model = default_model_dir()
        if isinstance(model, str | Path):
            self.backend: Backend = create_backend(
                model, backend=backend, device=device, threads=threads, precision=precision
            )
        else:
            self.backend = model
        size = parse_size(size)
        native = self.backend.input_size
        if size is not None and native is not None and size != tuple(native) and not self.backend.dynamic:
            raise DeployError(
                f"--size {size[0]}x{size[1]}: the model has a fixed input of {native[0]}x{native[1]} "
                "(export with --dynamic to run other sizes)"
            )
        self.size: tuple[int, int] | None = size or (tuple(native) if native else None)  # type: ignore[assignment]
        meta = self.backend.meta
        self.meta: dict[str, Any] = meta
        self.num_classes = int(meta.get("num_classes", len(meta.get("class_names", []))))
        self.class_names: list[str] = list(meta.get("class_names", [str(i) for i in range(self.num_classes)]))
        self.palette = np.asarray(meta.get("palette"), dtype=np.uint8)

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """``uint8 [H,W,3]`` -> ``float32 [3,h,w]`` RGB 0..255 at the run size (normalisation is the graph's job)."""
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise DeployError(f"expected an RGB image [H,W,3], got shape {rgb.shape}")
        return resize_to(rgb, self.size).transpose(2, 0, 1).astype(np.float32)

    @staticmethod
    def postprocess(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """``uint8 [h,w]`` at the run size -> ``uint8 [H,W]`` at the image size (nearest neighbour)."""
        if labels.shape != shape:
            labels = cv2.resize(labels, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
        return labels

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """``uint8 [H,W,3]`` RGB -> ``uint8 [H,W]`` trainIds."""
        return self.predict_batch([rgb])[0]

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """A list of RGB images (any sizes) -> their trainId maps; images that share the run size go in one batch."""
        inputs = [self.preprocess(img) for img in images]
        results: list[np.ndarray | None] = [None] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(inputs):
            groups.setdefault(x.shape, []).append(i)
        for idx in groups.values():
            labels = self.backend.predict(np.stack([inputs[i] for i in idx]))
            for j, i in enumerate(idx):
                results[i] = self.postprocess(labels[j], images[i].shape[:2])
        return results  # type: ignore[return-value]
