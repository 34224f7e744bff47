"""Inputs: images, folders, globs, video files, cameras and streams, resolved into work items (no torch).

Each SOURCE argument becomes image items (with the relative path the outputs mirror) or one frame source; a
SOURCE that cannot be used becomes a one-line failure instead of an exception.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from dass_deploy.errors import DeployError

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
VIDEO_EXTS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg"})
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")


@dataclass(frozen=True)
class ImageItem:
    """An image file and the path its outputs mirror under ``--out`` (relative, without suffix)."""

    path: Path
    rel: Path


@dataclass(frozen=True)
class VideoItem:
    """A video file, camera index or stream URL; ``name`` is the output stem."""

    source: str | int
    name: str
    kind: str  # "video" | "camera" | "stream"


@dataclass
class Sources:
    images: list[ImageItem] = field(default_factory=list)
    videos: list[VideoItem] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # one line each: "<source>: <why>"


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _glob_base(pattern: str) -> Path:
    """The folder a glob's outputs are mirrored from: its leading components without wildcards."""
    fixed = []
    for part in Path(pattern).parts:
        if _is_glob(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _stream_name(url: str) -> str:
    tail = url.split("://", 1)[1].split("?", 1)[0].rstrip("/")
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in tail.rsplit("/", 1)[-1] or tail)
    return f"stream_{name or 'live'}"


def collect_sources(specs: list[str]) -> Sources:
    """Resolve SOURCE arguments: image, folder (recursive), glob, video, camera index (digits) or stream URL."""
    found = Sources()
    for spec in specs:
        if spec.isdigit():
            found.videos.append(VideoItem(int(spec), f"camera{spec}", "camera"))
            continue
        if spec.lower().startswith(STREAM_SCHEMES):
            found.videos.append(VideoItem(spec, _stream_name(spec), "stream"))
            continue
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS | VIDEO_EXTS)
            if not files:
                found.failures.append(f"{spec}: folder has no images or videos")
            for file in files:
                _add_file(found, file, file.relative_to(path).with_suffix(""))
        elif path.is_file():
            _add_file(found, path, Path(path.stem), explicit=True)
        elif _is_glob(spec):
            base = _glob_base(spec)
            files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not files:
                found.failures.append(f"{spec}: no files match")
            for file in files:
                rel = file.relative_to(base) if file.is_relative_to(base) else Path(file.name)
                _add_file(found, file, rel.with_suffix(""))
        else:
            found.failures.append(f"{spec}: not found")
    return found


def _add_file(found: Sources, file: Path, rel: Path, explicit: bool = False) -> None:
    ext = file.suffix.lower()
    if ext in IMAGE_EXTS:
        found.images.append(ImageItem(file, rel))
    elif ext in VIDEO_EXTS:
        found.videos.append(VideoItem(str(file), str(rel), "video"))
    elif explicit:
        found.failures.append(
            f"{file}: unknown format {ext or '(no extension)'} (images: png/jpg/..., videos: mp4/avi/mov/mkv)"
        )


def read_image(path: str | Path) -> np.ndarray:
    """An image file -> RGB ``uint8 [H,W,3]``; unreadable files raise a one-line ``DeployError`` naming them.

    Pillow rather than OpenCV: it raises on truncated files instead of printing libpng noise and returning None, and
    it refuses decompression bombs (a header claiming e.g. 30000x30000) before allocating anything.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # between Pillow's warning and error limits the user asked for a big image: decode it without noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise DeployError(f"{path}: not found") from None
    except IsADirectoryError:
        raise DeployError(f"{path}: is a folder, not an image") from None
    except Image.DecompressionBombError as exc:
        match = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(match.group(1)) / 1e6:.0f} megapixels" if match else "too many pixels"
        limit = f"{2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f}"
        raise DeployError(f"{path}: image too large ({pixels}, limit {limit} megapixels); not decoded") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DeployError(
            f"{path}: cannot read image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None


@dataclass
class VideoInfo:
    fps: float
    width: int
    height: int
    frames: int | None  # None: unknown (camera, stream)


def open_video(item: VideoItem) -> tuple[cv2.VideoCapture, VideoInfo]:
    """Open a video / camera / stream; unknown length (cameras, streams) is ``frames=None``."""
    cap = cv2.VideoCapture(item.source)
    if not cap.isOpened():
        raise DeployError(f"{item.source}: cannot open {item.kind}")
    fps = cap.get(cv2.CAP_PROP_FPS)
    width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if item.kind == "video" else 0
    if width <= 0 or height <= 0:
        cap.release()
        raise DeployError(f"{item.source}: no video stream")
    info = VideoInfo(
        fps=fps if fps and np.isfinite(fps) and fps > 0 else 30.0,
        width=width,
        height=height,
        frames=count if count > 0 else None,
    )
    return cap, info
