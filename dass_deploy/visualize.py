"""Colour masks, overlays and legends in the Cityscapes palette (numpy + OpenCV, no torch)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import cv2
import numpy as np

IGNORE_INDEX = 255


def _full_palette(palette: np.ndarray) -> np.ndarray:
    """Pad a ``[K,3]`` palette to 256 entries so any uint8 label (255 = ignore -> black) indexes it."""
    full = np.zeros((256, 3), dtype=np.uint8)
    full[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return full


def color_mask(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """trainIds ``[H,W]`` -> RGB ``[H,W,3]`` uint8; ignore (255) and out-of-palette ids are black."""
    return _full_palette(palette)[labels.astype(np.intp, copy=False)]


def overlay(rgb: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Alpha-blend the colour mask over the image ``[H,W,3]``; ignored pixels keep the image as is."""
    if rgb.shape[:2] != labels.shape:
        raise ValueError(f"image {rgb.shape[:2]} and labels {labels.shape} differ in size")
    colors = color_mask(labels, palette)
    blended = cv2.addWeighted(rgb, 1.0 - alpha, colors, alpha, 0.0)
    keep = labels == IGNORE_INDEX
    if keep.any():
        blended[keep] = rgb[keep]
    return blended


def class_shares(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Fraction of the (non-ignored) pixels per class -> ``[K]`` float64 summing to 1 (zeros if all ignored)."""
    counts = np.bincount(labels.ravel(), minlength=256)[:num_classes].astype(np.float64)
    total = counts.sum()
    return counts / total if total > 0 else counts


def legend(
    class_names: Sequence[str],
    palette: np.ndarray,
    present: Iterable[int] | np.ndarray | None = None,
    row_height: int = 20,
) -> np.ndarray:
    """A swatch + name per class -> RGB image ``[rows*row_height, width, 3]``.

    ``present`` restricts the rows to some classes: class ids, or a ``[K]`` bool mask (e.g. ``class_shares > 0``).
    """
    ids = list(range(len(class_names)))
    if present is not None:
        present = np.asarray(list(present) if not isinstance(present, np.ndarray) else present)
        ids = [int(i) for i in np.flatnonzero(present)] if present.dtype == bool else [int(i) for i in present]
        ids = [i for i in ids if 0 <= i < len(class_names)]
    font, scale, thick = cv2.FONT_HERSHEY_SIMPLEX, row_height / 40.0, 1
    text_w = max([cv2.getTextSize(class_names[i], font, scale, thick)[0][0] for i in ids] or [0])
    width = row_height + 8 + text_w + 6
    image = np.full((max(len(ids), 1) * row_height, width, 3), 255, dtype=np.uint8)
    for row, cls in enumerate(ids):
        y0 = row * row_height
        color = tuple(int(c) for c in palette[cls])
        cv2.rectangle(image, (2, y0 + 2), (row_height - 2, y0 + row_height - 3), color, thickness=-1)
        baseline_y = y0 + int(row_height * 0.72)
        cv2.putText(image, class_names[cls], (row_height + 4, baseline_y), font, scale, (0, 0, 0), thick, cv2.LINE_AA)
    return image


def paste_legend(image: np.ndarray, legend_rgb: np.ndarray, margin: int = 4) -> np.ndarray:
    """Paste a legend into the top-right corner, shrunk to fit; the image keeps its size (videos need that)."""
    h, w = image.shape[:2]
    lh, lw = legend_rgb.shape[:2]
    scale = min(1.0, (h - 2 * margin) / lh, (w // 2) / lw)
    if scale <= 0:
        return image
    if scale < 1.0:
        legend_rgb = cv2.resize(
            legend_rgb, (max(1, int(lw * scale)), max(1, int(lh * scale))), interpolation=cv2.INTER_AREA
        )
        lh, lw = legend_rgb.shape[:2]
    out = image.copy()
    out[margin : margin + lh, w - margin - lw : w - margin] = legend_rgb
    return out
