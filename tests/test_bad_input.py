"""Bad input: one line naming the file, the rest still done, nothing already written lost.

Real files throughout: a PNG whose header claims 30000x30000, truncated and empty files, broken meta.json files,
SIGTERM and SIGINT delivered to real ``dass-segment`` processes, and a real full file system (a tiny tmpfs).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import cv2
import pytest
from conftest import SAMPLES, subprocess_env
from test_video import make_clip, probe

from dass_deploy.cli import segment_main
from dass_deploy.errors import DeployError
from dass_deploy.repository import list_models, load_model_dir

FRANKFURT = "frankfurt_000000_000294_leftImg8bit.png"


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG with a valid signature and IHDR claiming ``width x height`` but almost no pixel data (as a bomb
    would start): Pillow reads the size from the header before anything is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    return path


def _warning_lines(err: str, name: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:") and name in line]


def test_unreadable_images_are_skipped_and_the_rest_is_segmented(model_dir, tmp_path, capsys):
    street = tmp_path / "street.png"
    shutil.copy(SAMPLES / "street_1024x512.png", street)
    bomb = png_header_only(tmp_path / "bomb.png", 30000, 30000)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(street.read_bytes()[:5000])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is a text file, not a picture\n")
    out = tmp_path / "out"
    argv = [str(p) for p in (bomb, street, truncated, empty, text)] + ["--model", str(model_dir), "--out", str(out)]
    assert segment_main(argv + ["--quiet"]) == 1
    stdout, err = capsys.readouterr()
    assert "Traceback" not in stdout + err
    for bad in (bomb, truncated, empty, text):
        (line,) = _warning_lines(err, str(bad))  # one line each, naming the file
    assert "image too large (900 megapixels" in _warning_lines(err, str(bomb))[0]
    assert "1 image in" in stdout and "4 failed" in stdout
    assert cv2.imread(str(out / "street_overlay.jpg")).shape == (512, 1024, 3)
    assert not list(out.glob("bomb*")) and not list(out.glob("empty*"))


def _broken_meta(model_dir: Path, root: Path, name: str, edit) -> Path:
    folder = root / name
    shutil.copytree(model_dir, folder)
    meta = json.loads((folder / "meta.json").read_text())
    edit(meta)
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


BROKEN_META = {
    "no_height": (lambda m: m["input"].pop("height"), "field 'input.height' is missing"),
    "height_text": (lambda m: m["input"].update(height="128"), "field 'input.height' must be a positive integer"),
    "dynamic_text": (lambda m: m["input"].update(dynamic="yes"), "field 'input.dynamic' must be true or false"),
    "no_input": (lambda m: m.pop("input"), "field 'input' is missing"),
    "names_short": (lambda m: m["class_names"].pop(), "has 18 names for num_classes 19"),
    "bad_palette": (lambda m: m["palette"][0].append(7), "field 'palette' must be a list of [r, g, b]"),
    "bad_kind": (lambda m: m["output"].update(kind="probabilities"), "field 'output.kind' must be one of"),
    "adapt_bn_text": (lambda m: m.update(adapt_bn="yes"), "field 'adapt_bn' must be an object or null"),
    "adapt_bn_frames": (lambda m: m.update(adapt_bn={"frames": 0}), "field 'adapt_bn.frames' must be a positive"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_META))
def test_broken_meta_json_is_one_line_naming_file_and_field(model_dir, tmp_path, capsys, case):
    edit, needle = BROKEN_META[case]
    folder = _broken_meta(model_dir, tmp_path, case, edit)
    with pytest.raises(DeployError, match=re.escape(needle)):
        load_model_dir(folder)
    image = str(SAMPLES / FRANKFURT)
    assert segment_main([image, "--model", str(folder), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(folder / "meta.json") in err and needle in err


def test_list_models_skips_broken_folders_with_a_warning(model_dir, tmp_path, capsys):
    root = tmp_path / "models"
    shutil.copytree(model_dir, root / "good")
    _broken_meta(model_dir, root, "no_height", BROKEN_META["no_height"][0])
    (root / "not_json").mkdir()
    (root / "not_json" / "meta.json").write_text("{")
    (root / ".half-written").mkdir()  # hidden: an export in progress, skipped silently
    assert [m.path.name for m in list_models(root)] == ["good"]
    err = capsys.readouterr().err
    assert len(_warning_lines(err, "no_height")) == 1 and "input.height" in err
    assert len(_warning_lines(err, "not_json")) == 1 and "half-written" not in err


def _start(args: list[str], env_extra: dict[str, str] | None = None) -> tuple[subprocess.Popen, list[str]]:
    """``python -m dass_deploy ARGS`` with stderr read in a thread; SIGINT is delivered as in a terminal (a suite
    started in the background would otherwise make the child ignore it)."""
    as_in_a_terminal = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv[0] = 'dass-segment'; runpy.run_module('dass_deploy', run_name='__main__')"
    )
    env = subprocess_env() | (env_extra or {})
    proc = subprocess.Popen(
        [sys.executable, "-c", as_in_a_terminal, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True).start()
    return proc, err


def _wait_for(condition, proc: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None and not condition():
        time.sleep(0.05)
    assert proc.poll() is None and condition(), "the run ended (or never started) before it could be interrupted"


def test_sigterm_mid_video_keeps_a_playable_file(model_dir, tmp_path):
    frames_in_clip = 2400
    clip = make_clip(tmp_path / "drive.mp4", frames_in_clip)
    out = tmp_path / "out"
    proc, err = _start([str(clip), "--model", str(model_dir), "--out", str(out), "--threads", "1"])

    def frames_done() -> int:
        counts = re.findall(rf"(\d+)/{frames_in_clip}", "".join(err[-400:]))
        return int(counts[-1]) if counts else 0

    _wait_for(lambda: frames_done() >= 20, proc)
    assert not (out / "drive_overlay.mp4").exists()  # still under its .partial name
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    stdout = proc.stdout.read()
    time.sleep(0.2)
    stderr = "".join(err)
    assert "Traceback" not in stderr, stderr
    assert proc.returncode == 143 and "interrupted" in stdout
    frames = probe(out / "drive_overlay.mp4")[0]  # decodes with OpenCV
    assert 0 < frames < frames_in_clip and f"({frames} frames)" in stdout
    assert not list(out.glob("*.partial.*"))


def test_ctrl_c_in_an_image_folder_prints_a_summary(model_dir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(300):
        shutil.copy(SAMPLES / FRANKFURT, folder / f"{i:03d}.png")
    out = tmp_path / "out"
    proc, err = _start([str(folder), "--model", str(model_dir), "--out", str(out), "--threads", "1", "--quiet"])
    _wait_for(lambda: out.is_dir() and len(list(out.glob("*_color.png"))) >= 3, proc)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    stdout = proc.stdout.read()
    time.sleep(0.2)
    stderr = "".join(err)
    assert "Traceback" not in stderr and proc.returncode == 130, stderr
    done = int(stdout.split(" image")[0].splitlines()[-1])
    assert 3 <= done < 300 and "(interrupted)" in stdout and f"results in {out}" in stdout
    # every image reported done has all its outputs, and no image has only some of them (a rerun would stop there)
    colors = {p.name.removesuffix("_color.png") for p in out.glob("*_color.png")}
    overlays = {p.name.removesuffix("_overlay.jpg") for p in out.glob("*_overlay.jpg")}
    assert colors == overlays and len(colors) == done


def test_rerun_is_not_blocked_by_a_killed_run(model_dir, tmp_path, capsys):
    """A run killed hard (SIGKILL, power loss) leaves only ``<name>.partial.mp4``; the rerun replaces it."""
    clip = make_clip(tmp_path / "drive.mp4", 6)
    out = tmp_path / "out"
    out.mkdir()
    (out / "drive_overlay.partial.mp4").write_bytes(b"\0" * 1000)  # what a killed writer leaves
    assert segment_main([str(clip), "--model", str(model_dir), "--out", str(out), "--quiet"]) == 0
    assert probe(out / "drive_overlay.mp4")[0] == 6 and not (out / "drive_overlay.partial.mp4").exists()
    capsys.readouterr()
    # the finished file is protected like any output
    assert segment_main([str(clip), "--model", str(model_dir), "--out", str(out), "--quiet"]) == 1
    assert "exists (use --overwrite" in capsys.readouterr().err


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 300 KB file system (tmpfs); skipped where mounting is not permitted (not root, no CAP_SYS_ADMIN)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip() or done.returncode}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_while_writing_video_is_one_line(model_dir, tmp_path, tiny_disk, capsys):
    clip = make_clip(tmp_path / "drive.mp4", 120)
    image = tmp_path / "street.png"
    shutil.copy(SAMPLES / FRANKFURT, image)
    argv = [str(image), str(clip), "--model", str(model_dir), "--out", str(tiny_disk), "--save", "labels", "--quiet"]
    assert segment_main(argv) == 1
    stdout, err = capsys.readouterr()
    assert "Traceback" not in stdout + err
    (line,) = _warning_lines(err, str(tiny_disk / "drive_overlay.mp4"))
    assert "disk full" in line or "could not be written completely" in line
    assert "1 image, 0 videos" in stdout and "1 failed" in stdout
    assert cv2.imread(str(tiny_disk / "street_labels.png"), cv2.IMREAD_UNCHANGED).shape == (128, 256)  # kept
    assert not list(tiny_disk.glob("*.mp4"))  # no broken video left behind
