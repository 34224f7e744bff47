"""OpenVINO IR (``1/model.xml`` + ``1/model.bin``) converted from the shipped ONNX graph, for faster compiles.

OpenVINO runs the ONNX file directly too; the IR only saves its ONNX front end at every start (0.71 s instead of
1.98 s to compile DeepLab-V2 ResNet-101 at 512x1024, ``benchmarks/results/runtime_openvino.md``). Weights keep the graph's precision
(no fp16 compression), so the IR computes what the ONNX graph computes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from dass_deploy.backends.openvino import IR_FILE, OPENVINO_EXTRA
from dass_deploy.errors import DeployError

__all__ = ["IR_FILE", "require_openvino", "write_openvino_ir"]


def require_openvino() -> None:
    """``DeployError`` when the ``openvino`` package is missing (checked before the slow part of an export)."""
    if importlib.util.find_spec("openvino") is None:
        raise DeployError(f"--openvino needs the 'openvino' package; install it with {OPENVINO_EXTRA}")


def write_openvino_ir(onnx_path: Path, xml_path: Path) -> dict:
    """Convert ``onnx_path`` to IR at ``xml_path`` (the ``.bin`` lands beside it); returns the meta.json record."""
    require_openvino()
    import openvino as ov

    try:
        model = ov.convert_model(str(onnx_path))
        ov.save_model(model, str(xml_path), compress_to_fp16=False)
    except Exception as exc:
        raise DeployError(f"OpenVINO cannot convert {onnx_path.name}: {str(exc).strip().splitlines()[0]}") from exc
    return {"openvino": ov.get_version(), "ir": xml_path.name, "weights": xml_path.with_suffix(".bin").name}
