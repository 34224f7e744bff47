"""benchmarks/gpu_suite.sh on a machine without a CUDA GPU: CPU-side preparation, a clear message, exit 0.

Small sizes through the script's environment variables keep it fast; everything it writes is real (generated
images in the GTA5 / Cityscapes layouts, a checkpoint, an ONNX export run here in ONNX Runtime).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from conftest import REPO, subprocess_env

SCRIPT = REPO / "benchmarks" / "gpu_suite.sh"


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_gpu_suite_without_gpu_prepares_and_exits_0(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the no-GPU path is not what would run")
    out, work = tmp_path / "out", tmp_path / "work"
    env = {
        **subprocess_env(),
        "PYTHON": sys.executable,
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
