"""The Triton model-repository folder: ``config.pbtxt``, ``meta.json`` and the provenance recorded in it."""

from __future__ import annotations

import platform as _platform

import numpy as np
import onnx
import onnxruntime as ort
import torch


def _versions() -> dict:
    import dass_deploy

    versions = {
        "dass": dass_deploy.__version__,
        "python": _platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
    }
    try:
        import onnxslim

        versions["onnxslim"] = onnxslim.__version__
    except Exception:
        pass
    return versions


def _class_table(meta: dict, num_classes: int) -> tuple[list[str], list[list[int]], list[int]]:
    """class names, palette and trainId -> Cityscapes labelId; the Cityscapes tables when the classes are those."""
    from dass_train.labels import CLASS_NAMES, PALETTE, TRAIN_ID_TO_LABEL_ID

    names = list(meta.get("class_names") or [])
    if not names and num_classes == len(CLASS_NAMES):
        names = list(CLASS_NAMES)
    if len(names) != num_classes:
        names = [f"class_{i}" for i in range(num_classes)]
    if names == list(CLASS_NAMES):
        return names, PALETTE.tolist(), TRAIN_ID_TO_LABEL_ID[:num_classes].tolist()
    rng = np.random.default_rng(num_classes)  # a fixed, distinct colour per class for foreign class sets
    palette = rng.integers(0, 256, size=(num_classes, 3)).tolist()
    return names, palette, list(range(num_classes))
