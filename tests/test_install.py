"""The runtime install, as a user gets it: ``python -m build``, then the wheel without extras in a fresh venv.

From a folder outside the clone: no torch, no onnx; ``dass-segment`` segments an image and a short video with the
bundled default model and benchmarks ONNX Runtime; ``dass-export``, ``dass-train`` and ``dass-demo`` print the one
line naming their extra and exit 1. Then the demo extra is added and ``dass-demo`` serves the bundled model. The
wheel's content and the build's warnings are checked too. Installs from the package index (what ``make setup`` also
needs); the sizes the README quotes come from ``benchmarks/install_size.py``, which builds and installs the same way.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO, SAMPLES, stop_server

pytestmark = pytest.mark.slow

spec = importlib.util.spec_from_file_location("install_size", REPO / "benchmarks" / "install_size.py")
install_size = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install_size)

DEFAULT_MODEL = (REPO / "models" / "DEFAULT").read_text().strip()
TRAIN_HINT = "pip install 'dass[train]'"


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> tuple[Path, Path, str]:
    return install_size.build(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def runtime(dist, tmp_path_factory) -> Path:
    """``bin/`` of a fresh venv holding the wheel and its base dependencies only."""
    return install_size.make_venv(tmp_path_factory.mktemp("venv") / "runtime", str(dist[0]))


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A working folder outside the clone with a street image in it; nothing of the clone is importable there."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copy(SAMPLES / "street_1024x512.png", work / "street.png")
    return work


def run(bin_dir: Path, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "DASS_", "VIRTUAL_ENV"))}
    clean["PATH"] = f"{bin_dir}{os.pathsep}{clean.get('PATH', '')}"
    return subprocess.run(
        [str(bin_dir / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True, env={**clean, **(env or {})},
        timeout=300,
    )  # fmt: skip


#: Source folder -> the package name it installs under (pyproject's package-dir: the demo's app/ is ``dass_demo``).
INSTALLED_AS = {"app": "dass_demo", "dass_deploy": "dass_deploy", "dass_train": "dass_train"}


def source_packages() -> set[str]:
    """Every package of the source tree, by its installed name: folders with ``__init__.py`` under the three tops."""
    return {
        ".".join((INSTALLED_AS[top], *init.parent.relative_to(REPO / top).parts))
        for top in INSTALLED_AS
        for init in (REPO / top).rglob("__init__.py")
    }


def test_build_makes_a_wheel_and_an_sdist_without_deprecations(dist):
    wheel, sdist, log = dist
    assert wheel.name == "dass-0.1.0-py3-none-any.whl" and sdist.name == "dass-0.1.0.tar.gz"
    assert "deprecat" not in log.lower(), [line for line in log.splitlines() if "eprecat" in line]
    assert "absent from the `packages` configuration" not in log


def test_wheel_holds_packages_presets_examples_and_the_default_model(dist):
    names = set(zipfile.ZipFile(dist[0]).namelist())
    packaged = {str(Path(n).parent).replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert source_packages() <= packaged, f"missing from pyproject's packages: {source_packages() - packaged}"
    presets = {p.name for p in (REPO / "dass_train" / "presets").glob("*.yaml")}
    assert {f"dass_train/presets/{p}" for p in presets} <= names
    assert {f"dass_demo/examples/{p.name}" for p in (REPO / "app" / "examples").glob("*.png")} <= names
    tops = {n.split("/")[0] for n in names}  # nothing with a generic name (app, models, ...) lands in site-packages
    assert tops == {*INSTALLED_AS.values(), "dass-0.1.0.dist-info"}, tops
    bundled = f"dass_deploy/bundled/{DEFAULT_MODEL}"
    assert {f"{bundled}/meta.json", f"{bundled}/config.pbtxt", f"{bundled}/1/model.onnx"} <= names
    assert zipfile.ZipFile(dist[0]).read("dass_deploy/bundled/DEFAULT").decode().strip() == DEFAULT_MODEL
    assert not [n for n in names if n.startswith(("tests/", "runs/", "benchmarks/", "models/", "docs/"))]
    assert not [
        n for n in names if n.startswith("dass_deploy/bundled/") and DEFAULT_MODEL not in n and "DEFAULT" not in n
    ]
    meta = zipfile.ZipFile(dist[0]).read("dass-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta and "dass-0.1.0.dist-info/licenses/LICENSE" in names
    base = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert base and not [line for line in base if any(pkg in line for pkg in ("torch", "onnx>", "onnxscript"))]
    assert "Project-URL:" in meta and "Classifier:" in meta


def test_runtime_install_has_no_torch(runtime, elsewhere):
    for module in ("torch", "onnx", "gradio"):
        proc = run(runtime, "python", "-c", f"import {module}", cwd=elsewhere)
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, module


def test_runtime_segments_an_image_with_the_bundled_model(runtime, elsewhere):
    proc = run(runtime, "dass-segment", "street.png", "--quiet", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert f"model {DEFAULT_MODEL} on onnxruntime" in proc.stdout
    overlay = cv2.imread(str(elsewhere / "runs" / "segment" / "exp1" / "street_overlay.jpg"))
    assert overlay is not None and overlay.shape[:2] == (512, 1024)


def test_runtime_segments_a_video(runtime, elsewhere):
    writer = cv2.VideoWriter(str(elsewhere / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (256, 128))
    for t in range(6):
        writer.write(np.full((128, 256, 3), 40 * t, np.uint8))
    writer.release()
    proc = run(runtime, "dass-segment", "clip.mp4", "--out", "out", "--quiet", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    capture = cv2.VideoCapture(str(elsewhere / "out" / "clip_overlay.mp4"))
    frames = 0
    while capture.read()[0]:
        frames += 1
    assert frames == 6


def test_runtime_benchmark_gives_onnx_runtime_rows(runtime, elsewhere):
    proc = run(runtime, "dass-segment", "--benchmark", "--sizes", "128x256", "--repeats", "2", "--quiet", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == (
        "saved runs/benchmark/exp1/segment_cpu.md and runs/benchmark/exp1/segment_cpu.json"
    )
    assert not (elsewhere / "benchmarks").exists()
    rows = json.loads((elsewhere / "runs" / "benchmark" / "exp1" / "segment_cpu.json").read_text())["rows"]
    assert rows and {r["backend"] for r in rows} == {"onnxruntime"} and rows[0]["size"] == "128x256"
    assert "p50_ms" in rows[0]


@pytest.mark.parametrize(
    "command, line",
    [
        (["dass-export", "model.pt"], f"dass-export needs PyTorch: {TRAIN_HINT}"),
        (["dass-train", "synth2real"], f"dass-train needs PyTorch: {TRAIN_HINT}"),
        (["dass-segment", "street.png", "--checkpoint", "model.pt"], f"dass-segment --checkpoint needs PyTorch: {TRAIN_HINT}"),
        (["dass-segment", "street.png", "--backend", "openvino"], "dass-segment --backend openvino needs OpenVINO: pip install 'dass[openvino]'"),
        (["dass-demo"], "dass-demo needs Gradio: pip install 'dass[demo]'"),
    ],
)  # fmt: skip
def test_commands_without_their_extra_name_it_in_one_line(runtime, elsewhere, command, line):
    (elsewhere / "model.pt").write_bytes(b"not a checkpoint")
    proc = run(runtime, *command, cwd=elsewhere)
    assert (proc.returncode, proc.stderr.strip(), proc.stdout) == (1, line, "")


def test_model_names_are_found_in_the_user_folder_then_the_bundled_one(runtime, elsewhere):
    bundled = runtime.parent / "lib"
    (source,) = bundled.glob(f"python3*/site-packages/dass_deploy/bundled/{DEFAULT_MODEL}")
    mine = elsewhere / "models" / "mine"
    shutil.copytree(source, mine)
    meta = json.loads((mine / "meta.json").read_text())
    (mine / "meta.json").write_text(json.dumps({**meta, "name": "mine"}))
    (elsewhere / "models" / "DEFAULT").write_text("mine\n")
    for args, expected in [((), "mine"), (("--model", DEFAULT_MODEL), DEFAULT_MODEL), (("--model", "mine"), "mine")]:
        proc = run(runtime, "dass-segment", "street.png", "--out", f"out-{expected}", "--overwrite", "--quiet", *args,
                   cwd=elsewhere)  # fmt: skip
        assert proc.returncode == 0 and f"model {expected} on" in proc.stdout, (args, proc.stderr)
    moved = elsewhere / "moved"
    (elsewhere / "models").rename(moved)
    proc = run(runtime, "dass-segment", "street.png", "--model", "mine", "--quiet", cwd=elsewhere)
    assert proc.returncode == 2 and "Invalid value for '--model': model 'mine' not found" in proc.stderr
    proc = run(runtime, "dass-segment", "street.png", "--model", "mine", "--quiet", cwd=elsewhere,
               env={"DASS_MODELS": str(moved)})  # fmt: skip
    assert proc.returncode == 0 and "model mine on" in proc.stdout, proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_extra_serves_the_bundled_model(runtime, dist, elsewhere):
    """Last in this file: it adds the demo extra to the runtime venv."""
    subprocess.run([str(runtime / "python"), "-m", "pip", "install", "-q", f"{dist[0]}[demo]"], check=True)
    port = _free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "DASS_", "GRADIO_"))}
    clean["GRADIO_ANALYTICS_ENABLED"] = "False"
    server = subprocess.Popen([str(runtime / "dass-demo"), "--port", str(port)], cwd=elsewhere, env=clean,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    config = ""
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as response:
                    config = response.read().decode()
                break
            except OSError:
                time.sleep(1)
    finally:
        output, _ = stop_server(server)
    assert DEFAULT_MODEL in config, output[-3000:]
