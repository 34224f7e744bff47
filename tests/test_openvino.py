"""OpenVINO backend and IR export: real exports, real OpenVINO and ONNX Runtime sessions, real sample images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import EXPORT_SIZE, SAMPLES, subprocess_env

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'dass[openvino]')")

from dass_deploy.backends import AUTO_CPU_ORDER, auto_backend, create_backend  # noqa: E402
from dass_deploy.errors import DeployError  # noqa: E402

SAMPLE_IMAGES = [SAMPLES / "frankfurt_000000_000294_leftImg8bit.png", SAMPLES / "street_1024x512.png"]


def _batch(path: Path, size: tuple[int, int]) -> np.ndarray:
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    rgb = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1)[None], dtype=np.float32)


@pytest.fixture(scope="module")
def ir_model_dir(checkpoint, tmp_path_factory) -> Path:
    """The conftest checkpoint exported with ``openvino=True``: ONNX and IR side by side."""
    from dass_deploy.export import export_model

    out = tmp_path_factory.mktemp("ov_models")
    result = export_model(
        checkpoint, out=out, name="r18-ov", height=EXPORT_SIZE[0], width=EXPORT_SIZE[1], openvino=True,
        parity_samples=1, progress=False,
    )  # fmt: skip
    assert any("OpenVINO" in line and "model.xml" in line for line in result.summary)
    return Path(result.model_dir)


def test_openvino_labels_match_onnxruntime(model_dir):
    """fp32 graph from ONNX, compiled by OpenVINO at f32: same labels as ONNX Runtime on the real samples."""
    ov_backend = create_backend(model_dir, backend="openvino")
    ort_backend = create_backend(model_dir, backend="onnxruntime")
    assert ov_backend.name == "openvino" and ov_backend.source.name == "model.onnx"
    for path in SAMPLE_IMAGES:
        x = _batch(path, EXPORT_SIZE)
        a, b = ov_backend.predict(x), ort_backend.predict(x)
        assert a.shape == b.shape == (1, *EXPORT_SIZE) and a.dtype == np.uint8
        assert len(np.unique(b)) > 1  # several classes: a wrong graph would show
        assert (a == b).mean() >= 0.999, f"{path.name}: agreement {(a == b).mean():.4f}"


def test_ir_export_runs_from_ir_and_matches(ir_model_dir, model_dir):
    meta = json.loads((ir_model_dir / "meta.json").read_text())
    assert meta["export"]["openvino"]["ir"] == "model.xml"
    assert (ir_model_dir / "1" / "model.xml").is_file() and (ir_model_dir / "1" / "model.bin").is_file()
    assert (ir_model_dir / "1" / "model.onnx").is_file()  # Triton and ONNX Runtime keep working
    ov_ir = create_backend(ir_model_dir, backend="openvino")
    assert ov_ir.source.name == "model.xml"
    ort_backend = create_backend(ir_model_dir, backend="onnxruntime")
    x = _batch(SAMPLE_IMAGES[1], EXPORT_SIZE)
    assert (ov_ir.predict(x) == ort_backend.predict(x)).mean() >= 0.999


def test_bf16_precision_runs(model_dir):
    x = _batch(SAMPLE_IMAGES[0], EXPORT_SIZE)
    bf16 = create_backend(model_dir, backend="openvino", precision="bf16")
    ref = create_backend(model_dir, backend="onnxruntime").predict(x)
    out = bf16.predict(x)
    assert out.shape == ref.shape and (out == ref).mean() > 0.9  # reduced precision: close, not exact


def test_int8_model_runs_on_openvino_by_default(checkpoint, tmp_path, samples):
    """An INT8 (QDQ) export: ``auto`` picks OpenVINO (the faster INT8 runtime measured), whose int8 kernels give
    nearly the labels ONNX Runtime's do on the same graph (both round, differently)."""
    from dass_deploy.export import export_model

    calib = tmp_path / "calib"
    calib.mkdir()
    for path in SAMPLE_IMAGES:
        (calib / path.name).write_bytes(path.read_bytes())
    result = export_model(
        checkpoint, out=tmp_path / "models", name="r18-int8", height=EXPORT_SIZE[0], width=EXPORT_SIZE[1], int8=True,
        calib=calib, parity_samples=1, progress=False,
    )  # fmt: skip
    auto = create_backend(result.model_dir)
    assert auto.name == "openvino"
    ort_backend = create_backend(result.model_dir, backend="onnxruntime")
    x = _batch(SAMPLE_IMAGES[1], EXPORT_SIZE)
    a, b = auto.predict(x), ort_backend.predict(x)
    assert a.shape == b.shape and (a == b).mean() > 0.9


def test_auto_rule():
    for precision, order in AUTO_CPU_ORDER.items():
        assert auto_backend("cpu", precision, has_onnx=True, has_plan=False) == order[0]
    assert auto_backend("cpu", "fp32", has_onnx=False, has_plan=False) == "torch"
    assert auto_backend("cuda", "int8", has_onnx=True, has_plan=False) == "onnxruntime"


def test_openvino_errors(model_dir, tmp_path):
    with pytest.raises(DeployError, match="--device cpu only"):
        create_backend(model_dir, backend="openvino", device="cuda")
    broken = tmp_path / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "meta.json").write_text((model_dir / "meta.json").read_text())
    (broken / "1" / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(DeployError, match="OpenVINO cannot compile") as err:
        create_backend(broken, backend="openvino")
    assert "\n" not in str(err.value)  # one line for the CLI


def test_openvino_never_imports_torch(model_dir):
    code = (
        "import sys, numpy as np\n"
        "from dass_deploy.backends import create_backend\n"
        f"b = create_backend({str(model_dir)!r}, backend='openvino')\n"
        f"out = b.predict(np.zeros((1, 3, {EXPORT_SIZE[0]}, {EXPORT_SIZE[1]}), np.float32))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok', b.name, out.shape)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "ok openvino" in proc.stdout
