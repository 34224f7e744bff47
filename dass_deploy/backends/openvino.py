"""OpenVINO backend (CPU): runs the exported graph through OpenVINO's CPU plugin; never imports torch.

It compiles ``1/model.xml`` (OpenVINO IR, written by ``dass-export --openvino``) when the folder has one, since
compiling IR skips the ONNX front end (0.71 s vs 1.98 s for DeepLab-V2 ResNet-101 at 512x1024 on a loaded 2-core
EPYC, same inference time and labels: ``benchmarks/results/runtime_openvino.md``),
and ``1/model.onnx`` otherwise, so every exported folder runs. Inference is the same graph either way.

Precision: the graph's own (fp32 weights run in f32, so labels match ONNX Runtime's) unless ``precision="bf16"``
asks OpenVINO to run f32 layers in bfloat16 on CPUs with AVX512_BF16 / AMX (faster, ~1 % of labels can change).
INT8 (QDQ) graphs run OpenVINO's int8 kernels (VNNI / AMX where the CPU has them).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dass_deploy.backends.base import check_batch, to_labels
from dass_deploy.errors import DeployError
from dass_deploy.repository import VERSION, ModelInfo

IR_FILE = "model.xml"
OPENVINO_EXTRA = "pip install 'dass[openvino]'"
#: ``precision`` -> OpenVINO ``INFERENCE_PRECISION_HINT`` for floating-point layers.
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}


class OpenVINOBackend:
    """Compiles a model folder's IR (or ONNX) for OpenVINO's CPU plugin, latency-oriented."""

    def __init__(self, info: ModelInfo, device: str = "cpu", threads: int | None = None, precision: str = "fp32"):
        try:
            import openvino as ov
        except ImportError:
            raise DeployError(f"the openvino backend needs the 'openvino' package ({OPENVINO_EXTRA})") from None
        if device != "cpu":
            raise DeployError(f"--backend openvino runs on --device cpu only, not {device!r}")
        if precision not in PRECISION_HINTS:
            raise DeployError(f"openvino precision {precision!r} is not one of {', '.join(PRECISION_HINTS)}")
        ir_path = info.path / VERSION / IR_FILE
        source = ir_path if ir_path.is_file() else info.onnx_path
        if source is None:
            raise DeployError(f"{info.path}: no {VERSION}/{IR_FILE} or ONNX model for OpenVINO")
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision],
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = ov.Core().compile_model(str(source), "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with multi-line messages
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = next((line for line in reversed(lines) if not line.startswith("Exception from")), lines[-1])
            raise DeployError(f"OpenVINO cannot compile {source}: {reason}") from exc
        self.request = self.compiled.create_infer_request()
        self.source = source
        self.version = ov.__version__ if hasattr(ov, "__version__") else ov.get_version()
        self.meta: dict[str, Any] = info.meta
        self.name = "openvino"
        self.precision = precision
        self.input_size, self.dynamic, self._kind = info.input_size, info.dynamic, info.output_kind

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """``float32 [N,3,H,W]`` RGB 0..255 -> ``uint8 [N,H,W]``."""
        self.request.infer({0: check_batch(batch)})
        return to_labels(self.request.get_output_tensor(0).data.copy(), self._kind)
