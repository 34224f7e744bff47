"""Outputs: per-image PNG/JPEG files in a mirrored folder structure, and overlay videos (OpenCV, no torch)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from dass_deploy.errors import DeployError
from dass_deploy.sources import ImageItem
from dass_deploy.visualize import color_mask, legend, overlay, paste_legend

#: ``--save`` kinds -> file suffix; labels are lossless PNG, the overlay is for eyes only (JPEG).
SAVE_KINDS = {
    "overlay": "_overlay.jpg",
    "color": "_color.png",
    "labels": "_labels.png",
    "labelids": "_labelIds.png",
}


def parse_save(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip().lower() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in SAVE_KINDS]
    if unknown or not kinds:
        raise DeployError(f"--save {text!r}: choose from {','.join(SAVE_KINDS)}")
    return kinds


class Renderer:
    """Overlay (+ optional legend of the classes present) in the model's palette; shared by images and videos."""

    def __init__(self, class_names: list[str], palette: np.ndarray, alpha: float = 0.5, with_legend: bool = False):
        if not 0.0 <= alpha <= 1.0:
            raise DeployError(f"--alpha {alpha}: must be within 0..1")
        self.class_names, self.palette, self.alpha, self.with_legend = class_names, palette, alpha, with_legend

    def __call__(self, rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
        out = overlay(rgb, labels, self.palette, self.alpha)
        if self.with_legend:
            present = np.bincount(labels.ravel(), minlength=256)[: len(self.class_names)] > 0
            out = paste_legend(out, legend(self.class_names, self.palette, present))
        return out


def _bgr(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


class ImageSink:
    """Writes the ``--save`` kinds of one image under ``out_dir / item.rel``; never overwrites unless told to."""

    def __init__(self, out_dir: Path, save: tuple[str, ...], renderer: Renderer, overwrite: bool = False):
        self.out_dir, self.save, self.renderer, self.overwrite = Path(out_dir), save, renderer, overwrite

    def targets(self, item: ImageItem) -> dict[str, Path]:
        stem = self.out_dir / item.rel
        return {kind: stem.parent / (stem.name + SAVE_KINDS[kind]) for kind in self.save}

    def check(self, item: ImageItem) -> None:
        """Raise before any work if an output exists and ``--overwrite`` was not given."""
        if not self.overwrite:
            existing = [p for p in self.targets(item).values() if p.exists()]
            if existing:
                raise DeployError(f"{existing[0]} exists (use --overwrite to replace it)")

    def write(self, item: ImageItem, rgb: np.ndarray, labels: np.ndarray) -> list[Path]:
        from dass_train.labels import train_ids_to_label_ids

        paths = self.targets(item)
        next(iter(paths.values())).parent.mkdir(parents=True, exist_ok=True)
        images = {
            "overlay": lambda: _bgr(self.renderer(rgb, labels)),
            "color": lambda: _bgr(color_mask(labels, self.renderer.palette)),
            "labels": lambda: labels,
            "labelids": lambda: train_ids_to_label_ids(labels),
        }
        for kind, path in paths.items():
            if not cv2.imwrite(str(path), images[kind]()):
                raise DeployError(f"{path}: cannot write")
        return list(paths.values())


def fourcc_for(path: Path) -> str:
    """mp4v for .mp4 / .mov / .mkv, MJPG for .avi: both ship with every OpenCV build."""
    return "MJPG" if path.suffix.lower() == ".avi" else "mp4v"


class VideoSink:
    """An OpenCV writer that keeps the input's fps and size; takes RGB frames."""

    def __init__(self, path: Path, fps: float, width: int, height: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = cv2.VideoWriter(
            str(self.path), cv2.VideoWriter_fourcc(*fourcc_for(self.path)), fps, (width, height)
        )
        if not self.writer.isOpened():
            raise DeployError(f"{self.path}: cannot open a video writer ({fourcc_for(self.path)})")
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        self.writer.write(_bgr(rgb))
        self.frames += 1

    def close(self) -> None:
        self.writer.release()
