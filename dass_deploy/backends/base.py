"""The one small protocol every runtime implements, and helpers they share (numpy only)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Backend(Protocol):
    """A runtime that turns RGB 0..255 float batches into class maps.

    ``input_size`` is the model's (H, W); ``dynamic`` says whether other sizes are accepted too
    (``input_size`` is then only the preferred size, or ``None`` when there is none, e.g. a raw checkpoint).
    """

    name: str
    input_size: tuple[int, int] | None
    dynamic: bool
    meta: dict[str, Any]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """``float32 [N,3,H,W]`` RGB 0..255 -> ``uint8 [N,H,W]`` trainIds."""
        ...


def to_labels(output: np.ndarray, kind: str) -> np.ndarray:
    """Graph output -> ``uint8 [N,H,W]``: class maps pass through, full-resolution logits ``[N,K,H,W]`` get argmax."""
    if kind == "logits" or output.ndim == 4:
        return output.argmax(axis=1).astype(np.uint8)
    return output.astype(np.uint8, copy=False)


def check_batch(batch: np.ndarray) -> np.ndarray:
    """Make the input contiguous float32 ``[N,3,H,W]`` (the graphs' contract)."""
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected a float32 [N,3,H,W] batch, got shape {batch.shape}")
    return np.ascontiguousarray(batch, dtype=np.float32)
