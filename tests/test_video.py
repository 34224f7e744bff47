"""Video through the threaded pipeline: real clips made with OpenCV, real backends, Ctrl-C in a subprocess."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SAMPLES, subprocess_env

from dass_deploy.cli import segment_main

W, H, FPS = 256, 128, 30.0


def make_clip(path: Path, frames: int, fourcc: str = "mp4v") -> Path:
    """Pan and zoom over the real street sample -> ``frames`` frames of 256x128 at 30 fps."""
    street = cv2.imread(str(SAMPLES / "street_1024x512.png"))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, (W, H))
    for t in range(frames):
        zoom = 1.0 + 0.5 * (t % 40) / 40  # crop shrinks -> zoom in
        cw, ch = int(1024 / zoom / 1.5), int(512 / zoom / 1.5)
        x0 = int((1024 - cw) * (t % 50) / 50)
        crop = street[(512 - ch) // 2 : (512 - ch) // 2 + ch, x0 : x0 + cw]
        writer.write(cv2.resize(crop, (W, H), interpolation=cv2.INTER_AREA))
    writer.release()
    return path


def probe(path: Path) -> tuple[int, float, int, int]:
    """(decoded frames, fps, width, height): frames are counted by decoding, not from the header."""
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), f"{path} does not open"
    fps, w, h = (
        cap.get(cv2.CAP_PROP_FPS),
        int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
        int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
    )
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n, fps, w, h


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clip") / "drive.mp4", 36)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_video_keeps_frames_fps_size(model_dir, clip, tmp_path, backend, capsys):  # noqa: F811
    out = tmp_path / "out"
    rc = segment_main([str(clip), "--model", str(model_dir), "--backend", backend, "--out", str(out), "--legend"])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "audio, if any, is not copied" in text.out and "1 video (36 frames)" in text.out
    n, fps, w, h = probe(out / "drive_overlay.mp4")
    assert (n, w, h) == (36, W, H) and fps == pytest.approx(FPS)
    # the overlay really carries the segmentation: it differs from the input frame
    first_in = cv2.VideoCapture(str(clip)).read()[1]
    first_out = cv2.VideoCapture(str(out / "drive_overlay.mp4")).read()[1]
    assert np.abs(first_in.astype(int) - first_out.astype(int)).mean() > 10


def test_avi_in_avi_out(model_dir, tmp_path, capsys):  # noqa: F811
    clip = make_clip(tmp_path / "cam.avi", 12, fourcc="MJPG")
    rc = segment_main([str(clip), "--model", str(model_dir), "--out", str(tmp_path / "o"), "--batch", "4", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert probe(tmp_path / "o" / "cam_overlay.avi")[0] == 12


def test_pipeline_keeps_every_frame_in_order(model_dir, clip, tmp_path):  # noqa: F811
    """The three threads deliver every frame once, in decode order, into a playable file (no speed asserted: the
    pipeline/model rate is measured by ``benchmarks/bench_video.py``)."""
    from dass_deploy.pipeline import run_video
    from dass_deploy.segmenter import Segmenter
    from dass_deploy.sinks import Renderer, VideoSink
    from dass_deploy.sources import VideoItem, open_video

    seg = Segmenter(model_dir)
    capture, info = open_video(VideoItem(str(clip), "drive", "video"))
    sink = VideoSink(tmp_path / "e2e.mp4", info.fps, info.width, info.height)
    render = Renderer(seg.class_names, seg.palette, alpha=0.3)
    stats = run_video(seg, capture, sink, render, total=info.frames, batch=4, queue_size=2, progress=False)
    assert stats.frames == 36 and not stats.interrupted and stats.seconds > 0

    def frames(path: Path) -> np.ndarray:
        cap = cv2.VideoCapture(str(path))
        out = []
        while (item := cap.read())[0]:
            out.append(item[1].astype(np.float32))
        cap.release()
        return np.stack(out)

    inputs, outputs = frames(clip), frames(tmp_path / "e2e.mp4")
    assert len(outputs) == len(inputs) == 36
    # each output frame is closest to the input frame of the same index: none lost, repeated or swapped
    distance = np.abs(outputs[:, None] - inputs[None]).mean(axis=(2, 3, 4))
    np.testing.assert_array_equal(distance.argmin(axis=1), np.arange(36))


def test_sigint_closes_the_file_cleanly(model_dir, tmp_path):  # noqa: F811
    """Ctrl-C mid-video: the decoder stops, the frames in flight are written, the file plays."""
    frames_in_clip = 2400
    clip = make_clip(tmp_path / "long.mp4", frames_in_clip)
    out = tmp_path / "out"
    # `python -m dass_deploy`, with Ctrl-C delivered as in a terminal: a shell that starts this suite in the
    # background (`cmd &`) makes its children ignore SIGINT, and Python then installs no KeyboardInterrupt handler
    as_in_a_terminal = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv[0] = 'dass-segment'; runpy.run_module('dass_deploy', run_name='__main__')"
    )
    cmd = [
        sys.executable,
        "-c",
        as_in_a_terminal,
        str(clip),
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    target = out / "long_overlay.mp4"
    # Interrupt once the progress bar shows frames written (not on a file size: the writer buffers, and on an idle
    # machine the whole clip could be done before the file grew)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.time() + 60
    done = 0
    while time.time() < deadline and done < 20 and proc.poll() is None:
        time.sleep(0.05)
        counts = re.findall(rf"(\d+)/{frames_in_clip}", "".join(err[-400:]))
        done = int(counts[-1]) if counts else 0
    assert proc.poll() is None and done < frames_in_clip // 2, f"not interrupted mid-video ({done} frames done)"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)  # stdout holds a few lines only: its pipe cannot fill up
    stdout = proc.stdout.read()
    reader.join(timeout=10)
    stderr = "".join(err)
    assert "Traceback" not in stderr, stderr
    assert proc.returncode == 130 and "interrupted" in stdout + stderr
    frames = probe(target)[0]
    assert 0 < frames < frames_in_clip
    assert f"({frames} frames)" in stdout
