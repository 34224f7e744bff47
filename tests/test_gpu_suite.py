"""benchmarks/gpu_suite.sh on a machine without a CUDA GPU, in a venv holding only what the GPU machine's image holds
(PyTorch, onnx, onnxruntime, opencv-python-headless, click) plus the wheels ``make gpu-wheels`` downloads, installed by
the suite itself with ``--no-index``: CPU-side preparation, the runtimes recorded as unavailable, the test suite
collected, a clear message, exit 0.

Small sizes through the script's environment variables keep it fast; everything it writes is real (generated
images in the GTA5 / Cityscapes layouts, a checkpoint, an ONNX export run here in ONNX Runtime). Builds a venv from
the package index (here torch is the CPU build; the GPU machine's has CUDA).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_suite.sh"
#: What the GPU machine's image holds (their dependencies come with them); torch pinned to the CPU build here.
IMAGE_PACKAGES = ("torch==2.13.0", "onnx", "onnxruntime", "opencv-python-headless", "click")
#: What may be carried to that machine in all.
CARRY_LIMIT_MB = 60


@pytest.fixture(scope="module")
def image_python(tmp_path_factory) -> Path:
    """A venv with the image's packages only (no dass, no pytest, no yaml): the GPU machine without its wheels."""
    path = tmp_path_factory.mktemp("gpu_image") / "venv"
    venv.EnvBuilder(with_pip=True).create(path)
    python = path / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", IMAGE_PACKAGES[0]], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *IMAGE_PACKAGES[1:]], check=True)
    return python


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    """``make gpu-wheels`` for this Python (the GPU machine's is 3.12; the binary wheels differ, the list does not)."""
    out = tmp_path_factory.mktemp("whl")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    cmd = [
        "make",
        "-s",
        "-C",
        str(REPO),
        "gpu-wheels",
        f"PYTHON={sys.executable}",
        f"GPU_PYTHON={version}",
        f"WHL={out}",
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_gpu_suite_without_gpu_in_the_image_venv(tmp_path, image_python, wheels):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the no-GPU path is not what would run")
    assert sum(f.stat().st_size for f in wheels.glob("*.whl")) < CARRY_LIMIT_MB * 2**20
    no_yaml = subprocess.run([str(image_python), "-c", "import yaml"], capture_output=True)
    assert no_yaml.returncode != 0  # the image alone could not run the suite
    out, work = tmp_path / "out", tmp_path / "work"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))},
        "PYTHON": str(image_python),
        "GPU_SUITE_WHEELS": str(wheels),
        "GPU_SUITE_OUT": str(out),
        "GPU_SUITE_WORK": str(work),
        "GPU_SUITE_SOURCE_SIZE": "96x64",
        "GPU_SUITE_TARGET_SIZE": "128x64",
        "GPU_SUITE_IMAGES": "2",
        "GPU_SUITE_EXPORT_SIZE": "64x128",
        "GPU_SUITE_BACKBONE": "resnet18",
    }
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA GPU" in proc.stderr
    summary = (out / "summary.md").read_text()
    assert "no CUDA GPU here" in summary and "prepare (data, checkpoint, ONNX export): ok" in summary
    assert f"installed the wheels of {wheels}" in summary and "test collection: ok" in summary
    assert "tensorrt: unavailable: the 'tensorrt' package is not installed" in summary
    assert "onnxruntime-cuda: unavailable: onnxruntime" in summary and "has no CUDAExecutionProvider" in summary
    runtimes = json.loads((out / "runtimes.json").read_text())
    assert set(runtimes) == {"tensorrt", "onnxruntime-cuda"} and "FAILED" not in summary

    machine = json.loads((out / "machine.json").read_text())
    assert machine["cpu_model"] and "avx2" in machine["isa"] and machine["key"]

    prep = json.loads((work / "prepare.json").read_text())
    gta = sorted(Path(prep["source_root"], "images").glob("*.png"))
    gta_labels = sorted(Path(prep["source_root"], "labels").glob("*.png"))
    city = sorted(Path(prep["target_root"], "leftImg8bit", "train").rglob("*_leftImg8bit.png"))
    city_val = sorted(Path(prep["target_root"], "gtFine", "val").rglob("*_gtFine_labelIds.png"))
    assert len(gta) == len(gta_labels) == 2 and len(city) == 2 and len(city_val) == 1
    assert cv2.imread(str(gta[0])).shape[:2] == (64, 96)  # H, W of the requested source size
    assert cv2.imread(str(city[0])).shape[:2] == (64, 128)

    onnx_path = Path(prep["model_dir"]) / "1" / "model.onnx"
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    labels = session.run(None, {"image": np.zeros((1, 3, 64, 128), np.float32)})[0]
    assert labels.shape == (1, 64, 128) and labels.dtype == np.uint8
    assert Path(prep["checkpoint"]).is_file()
    assert not (out / "train_speed.json").exists()  # nothing GPU-side pretended to run
    assert os.access(SCRIPT, os.X_OK)
