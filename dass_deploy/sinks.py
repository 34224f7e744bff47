"""Outputs: per-image PNG/JPEG files in a mirrored folder structure, and overlay videos (OpenCV, no torch)."""

from __future__ import annotations

import os
import shutil
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
    """An OpenCV writer that keeps the input's fps and size; takes RGB frames.

    It writes to ``<stem>.partial<suffix>`` beside the target and renames on ``close``, so an interrupted or failed
    run never leaves a half-written file under the real name (a rerun is not blocked by it). ``VideoWriter.write``
    reports nothing, so a full disk is caught by watching the file grow and the free space, and ``close`` checks
    that the file opens again with the frames written.
    """

    #: how often (in frames) the file size and free space are looked at
    CHECK_EVERY = 16
    #: below this much free space, a file that stopped growing means the disk is full
    MIN_FREE_BYTES = 1 << 20

    def __init__(self, path: Path, fps: float, width: int, height: int):
        self.path = Path(path)
        self.partial = self.path.with_name(f"{self.path.stem}.partial{self.path.suffix}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial.unlink(missing_ok=True)  # left by a run that was killed; ours to replace
        self.writer = cv2.VideoWriter(
            str(self.partial), cv2.VideoWriter_fourcc(*fourcc_for(self.path)), fps, (width, height)
        )
        if not self.writer.isOpened():
            self.partial.unlink(missing_ok=True)
            raise DeployError(f"{self.path}: cannot open a video writer ({fourcc_for(self.path)})")
        self.frames = 0
        self._last_size = -1
        self._closed = False

    def write(self, rgb: np.ndarray) -> None:
        self.writer.write(_bgr(rgb))
        self.frames += 1
        if self.frames % self.CHECK_EVERY == 0:
            self._check_space()

    def _check_space(self) -> None:
        size = self.partial.stat().st_size if self.partial.exists() else 0
        free = shutil.disk_usage(self.partial.parent).free
        if size <= self._last_size and free < self.MIN_FREE_BYTES:
            raise DeployError(f"{self.path}: disk full after {self.frames} frames ({free} bytes free)")
        self._last_size = size

    def close(self, keep: bool = True) -> None:
        """Finish the file and move it to its real name (``keep=False``: delete it); a file that does not open
        again, or holds fewer frames than written, is deleted and reported."""
        if self._closed:
            return
        self._closed = True
        self.writer.release()
        if not keep or self.frames == 0:
            self.partial.unlink(missing_ok=True)
            return
        cap = cv2.VideoCapture(str(self.partial))
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
        cap.release()
        if count < self.frames:
            free = shutil.disk_usage(self.partial.parent).free
            self.partial.unlink(missing_ok=True)
            raise DeployError(
                f"{self.path}: the video could not be written completely ({count} of {self.frames} frames readable, "
                f"{free} bytes free on the disk)"
            )
        os.replace(self.partial, self.path)
