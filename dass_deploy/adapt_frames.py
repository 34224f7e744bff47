"""The frames ``--adapt-bn SOURCE`` re-estimates BatchNorm statistics on: up to N frames of one SOURCE (no torch).

SOURCE is anything ``dass-segment`` reads (``sources.collect_sources``): an image, a folder, a glob, a video, a
camera index or a stream. Where the length is known (images, video files) the N frames are spread evenly over all
of them, so a folder of drives or a long video is not represented by its first minute; a camera or stream gives its
next N frames. Everything that can be checked before the slow part is checked when the source is opened, and every
problem is a one-line ``DeployError`` naming the option and the source.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np

from dass_deploy.errors import DeployError
from dass_deploy.sources import ImageItem, VideoItem, collect_sources, open_video, read_image

#: Fewer frames are refused. 16 is the smallest count the new-camera benchmark measures (issue 20: N = 16, 64, 256):
#: below it no figure says what the statistics of a handful of scenes do to a model. docs/ADAPT_BN.md.
MIN_ADAPT_FRAMES = 16
#: The count behind the only measured gain: ``dass-train eval --target-bn`` re-estimated on 256 target images
#: (17.71 -> 29.94 mIoU over three seeds, benchmarks/results/table3_seeds.json). docs/ADAPT_BN.md.
DEFAULT_ADAPT_FRAMES = 256
#: Passes of the population estimate (``dass_train.bn_statistics.population_bn_statistics``; 0: exact, until a pass
#: changes nothing). One: on the selection models the passes in between fell far below it, and exact costs about
#: one pass per BatchNorm layer (benchmarks/results/adapt_bn_passes.md, docs/ADAPT_BN.md).
DEFAULT_ADAPT_PASSES = 1
#: Skipped inputs listed by name in meta.json (the count is always there).
MAX_LISTED_SKIPS = 10


def evenly_spaced(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (the middle of each of ``count`` equal parts); all of
    them when there are no more than ``count``."""
    if total <= count:
        return list(range(total))
    return [int((i + 0.5) * total / count) for i in range(count)]


@dataclass
class _Part:
    """One file of the source (an image is one frame, a video ``frames``) or the whole live source."""

    item: ImageItem | VideoItem
    frames: int | None  # None: a camera or stream, length unknown
    offset: int = 0  # index of its first frame among all frames of the source
    capture: cv2.VideoCapture | None = None  # a live source, opened when planned (so a bad camera fails early)


@dataclass
class AdaptFrames:
    """Up to ``limit`` RGB ``uint8 [H,W,3]`` frames of ``spec``, read lazily (iterate once).

    ``planned`` is how many the plan expects (an image may not decode, a video may end early); ``skipped`` names
    what could not be decoded.
    """

    spec: str
    limit: int
    kind: str  # images | video | videos | mixed | camera | stream
    parts: list[_Part]
    available: int | None  # frames in the whole source; None for a camera or stream
    skipped: list[str] = field(default_factory=list)

    @property
    def live(self) -> bool:
        return self.available is None

    @property
    def planned(self) -> int:
        return self.limit if self.available is None else min(self.limit, self.available)

    @property
    def selection(self) -> str:
        if self.live:
            return f"the first {self.limit} frames of the {self.kind}"
        if self.available is not None and self.available <= self.limit:
            return f"all {self.available} frames"
        return f"{self.limit} frames spread evenly over {self.available}"

    def __iter__(self) -> Iterator[np.ndarray]:
        chosen = None if self.live else evenly_spaced(self.available or 0, self.limit)
        for part in self.parts:
            if chosen is None:
                wanted = list(range(self.limit))
            else:
                end = part.offset + (part.frames or 0)
                wanted = [i - part.offset for i in chosen if part.offset <= i < end]
            if not wanted:
                continue
            yield from _frames_of(part, wanted, self.skipped)

    def record(self) -> dict:
        """What meta.json says about the source (``adapt_bn.source``)."""
        return {
            "spec": self.spec,
            "kind": self.kind,
            "files": None if self.live else len(self.parts),
            "available_frames": self.available,
            "requested_frames": self.limit,
            "selection": self.selection,
            "skipped": len(self.skipped),
            "skipped_inputs": self.skipped[:MAX_LISTED_SKIPS],
        }


def _frames_of(part: _Part, wanted: list[int], skipped: list[str]) -> Iterator[np.ndarray]:
    """The frames of one part; what cannot be decoded is named in ``skipped`` instead."""
    if isinstance(part.item, ImageItem):
        try:
            yield read_image(part.item.path)
        except DeployError as exc:
            skipped.append(str(exc))
        return
    yield from _video_frames(part, wanted, skipped)


def _video_frames(part: _Part, wanted: list[int], skipped: list[str]) -> Iterator[np.ndarray]:
    """The frames at the (sorted) indices ``wanted`` of a video, camera or stream, decoding straight through (no
    seeking: seeking to a frame index is inexact in many containers)."""
    item = part.item
    assert isinstance(item, VideoItem)
    try:
        capture = part.capture or open_video(item)[0]
    except DeployError as exc:
        skipped.append(str(exc))
        return
    try:
        position, got = 0, 0
        for index in wanted:
            while position < index and capture.grab():
                position += 1
            ok, bgr = capture.read() if position == index else (False, None)
            if not ok or bgr is None:
                break
            position += 1
            got += 1
            yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        if got < len(wanted):
            skipped.append(f"{item.source}: ended after {position} frames, {len(wanted) - got} planned frames missing")
    finally:
        capture.release()


def _video_length(item: VideoItem) -> int:
    """Frames of a video file: the container's count, or (when it gives none) the count of decodable frames."""
    capture, info = open_video(item)
    try:
        if info.frames:
            return info.frames
        count = 0
        while capture.grab():
            count += 1
        return count
    finally:
        capture.release()


def _kind(images: int, videos: list[VideoItem]) -> str:
    if not videos:
        return "images"
    if not images and len(videos) == 1:
        return videos[0].kind
    return "videos" if not images else "mixed"


def open_adapt_frames(spec: str, limit: int = DEFAULT_ADAPT_FRAMES) -> AdaptFrames:
    """Resolve ``--adapt-bn SOURCE`` and plan which frames to read; nothing is decoded but video headers (and the
    frames of a video whose container gives no frame count, to count them).

    Raises a one-line ``DeployError`` for a limit below ``MIN_ADAPT_FRAMES``, a source that does not exist or
    cannot be opened, and a source known to hold fewer than ``MIN_ADAPT_FRAMES`` frames.
    """
    if limit < MIN_ADAPT_FRAMES:
        raise DeployError(f"--adapt-frames {limit}: the minimum is {MIN_ADAPT_FRAMES} frames (docs/ADAPT_BN.md)")
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # broken files are reported on one line
    found = collect_sources([spec])
    if found.failures:
        raise DeployError(f"--adapt-bn {found.failures[0]}")
    live = [v for v in found.videos if v.kind in ("camera", "stream")]
    if live:  # a camera index or a URL is always the whole SOURCE
        try:
            capture, _ = open_video(live[0])
        except DeployError as exc:
            raise DeployError(f"--adapt-bn {exc}") from None
        return AdaptFrames(spec, limit, live[0].kind, [_Part(live[0], None, capture=capture)], available=None)
    parts: list[_Part] = [_Part(item, 1) for item in found.images]
    skipped: list[str] = []
    for video in found.videos:
        try:
            frames = _video_length(video)
        except DeployError as exc:
            skipped.append(str(exc))
            continue
        if frames:
            parts.append(_Part(video, frames))
        else:
            skipped.append(f"{video.source}: no decodable frame")
    if not parts:
        raise DeployError(f"--adapt-bn {skipped[0] if len(skipped) == 1 else f'{spec}: no decodable frame'}")
    offset = 0
    for part in parts:
        part.offset, offset = offset, offset + (part.frames or 0)
    if offset < MIN_ADAPT_FRAMES:
        raise DeployError(
            f"--adapt-bn {spec}: {offset} frame{'s' * (offset != 1)}, fewer than the minimum {MIN_ADAPT_FRAMES} "
            "(docs/ADAPT_BN.md)"
        )
    kind = _kind(len(found.images), [p.item for p in parts if isinstance(p.item, VideoItem)])
    return AdaptFrames(spec, limit, kind, parts, available=offset, skipped=skipped)
