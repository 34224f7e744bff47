"""Decode -> infer -> encode as three threads joined by bounded queues.

OpenCV's decoder/encoder and the runtimes release the GIL, so the three stages overlap and the model sets the pace.
Bounded queues keep memory flat when one stage is slower. Ctrl-C (and SIGTERM, which the CLI turns into one) stops
the decoder only; the frames already decoded are segmented and written, then the writer is closed and the file moved
to its real name, so it plays with every frame done.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from dass_deploy.segmenter import Segmenter
from dass_deploy.sinks import VideoSink

_END = object()  # sentinel that flows down the queues once


@dataclass
class VideoStats:
    frames: int
    seconds: float
    interrupted: bool

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def run_video(
    segmenter: Segmenter,
    capture: cv2.VideoCapture,
    sink: VideoSink,
    render: Callable[[np.ndarray, np.ndarray], np.ndarray],
    total: int | None = None,
    batch: int = 1,
    queue_size: int = 8,
    progress: bool = True,
    desc: str = "video",
    max_frames: int | None = None,
) -> VideoStats:
    """Segment every frame of ``capture`` into ``sink``; returns after the writer is closed (also on Ctrl-C)."""
    from tqdm import tqdm

    stop = threading.Event()
    finished = threading.Event()  # set by the encoder once the file is closed
    decoded: queue.Queue = queue.Queue(maxsize=queue_size)
    segmented: queue.Queue = queue.Queue(maxsize=queue_size)
    errors: list[BaseException] = []
    bar = tqdm(total=total, desc=desc, unit="frame", disable=not progress, dynamic_ncols=True, leave=True)

    def decode() -> None:
        try:
            n = 0
            while not stop.is_set() and (max_frames is None or n < max_frames):
                ok, bgr = capture.read()
                if not ok:
                    break
                decoded.put(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                n += 1
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)
        finally:
            capture.release()
            decoded.put(_END)

    def infer() -> None:
        done = False
        try:
            while not done:
                frames = []
                while len(frames) < batch:
                    item = decoded.get()
                    if item is _END:
                        done = True
                        break
                    frames.append(item)
                if frames:
                    for rgb, labels in zip(frames, segmenter.predict_batch(frames), strict=True):
                        segmented.put((rgb, labels))
        except BaseException as exc:
            errors.append(exc)
            stop.set()
            while decoded.get() is not _END:  # unblock the decoder
                pass
        finally:
            segmented.put(_END)

    def encode() -> None:
        try:
            while (item := segmented.get()) is not _END:
                sink.write(render(*item))
                bar.update(1)
        except BaseException as exc:
            errors.append(exc)
            stop.set()
            while segmented.get() is not _END:
                pass
        finally:
            try:  # a failed run leaves no file; an interrupted one keeps every frame written (see VideoSink)
                sink.close(keep=not errors)
            except BaseException as exc:
                errors.append(exc)
            finished.set()

    threads = [threading.Thread(target=f, name=f"dass-{f.__name__}", daemon=True) for f in (decode, infer, encode)]
    start = time.perf_counter()
    interrupted = False
    for t in threads:
        t.start()
    # Wait on a flag with sleep, not Thread.join: a join interrupted by Ctrl-C can report a live thread as finished
    # (CPython < 3.13), and the interpreter would then exit under a writer that has not written its trailer yet.
    while not finished.is_set():
        try:
            time.sleep(0.05)
        except KeyboardInterrupt:
            if not interrupted:
                bar.write(f"{desc}: interrupted; writing the frames in flight and closing the file")
            interrupted = True
            stop.set()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    bar.close()
    if errors:
        raise errors[0]
    return VideoStats(frames=sink.frames, seconds=seconds, interrupted=interrupted)
