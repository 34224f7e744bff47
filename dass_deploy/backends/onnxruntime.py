"""ONNX Runtime backend: CPU, CUDA or TensorRT execution providers; never imports torch."""

from __future__ import annotations

from typing import Any

import numpy as np

from dass_deploy.backends.base import check_batch, to_labels
from dass_deploy.errors import DeployError
from dass_deploy.repository import ModelInfo

#: Execution providers tried, in order, for each device; CPU last so unsupported nodes still run.
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def session_options(threads: int | None = None):
    """All graph optimisations (conv+bn+relu fusion, constant folding, NCHWc layout on x86) and the intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = int(threads or 0)  # 0: one per physical core
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: the CLI speaks for itself
    return opts


def providers_for(device: str) -> list[str]:
    """The execution providers to ask for on ``device``, the first one required to be installed here."""
    import onnxruntime as ort

    if device not in PROVIDERS:
        raise DeployError(f"--device {device!r} is not one of {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    if PROVIDERS[device][0] not in available:
        raise DeployError(
            f"ONNX Runtime has no {PROVIDERS[device][0]} here (available: {', '.join(available)}); "
            "install onnxruntime-gpu and use a machine with an NVIDIA GPU, or use --device cpu"
        )
    return [p for p in PROVIDERS[device] if p in available]


class OnnxRuntimeBackend:
    """Runs ``1/model.onnx`` of a model directory; ``device`` is ``cpu``, ``cuda`` or ``tensorrt`` (ORT's TRT EP).
    ``model`` (serialised ONNX) runs instead of the file: the folder's model adapted in memory (``--adapt-bn``)."""

    def __init__(self, info: ModelInfo, device: str = "cpu", threads: int | None = None, model: bytes | None = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise DeployError(
                "the onnxruntime backend needs the 'onnxruntime' package (pip install onnxruntime)"
            ) from exc
        providers = providers_for(device)
        if info.onnx_path is None:
            raise DeployError(f"{info.path}: no ONNX model (1/model.onnx); try --backend tensorrt or torch")
        onnx_path = info.onnx_path
        try:
            self.session = ort.InferenceSession(
                model if model is not None else str(onnx_path),
                sess_options=session_options(threads),
                providers=providers,
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types for unreadable files
            raise DeployError(f"cannot load ONNX model {onnx_path}: {str(exc).splitlines()[0]}") from exc
        self.meta: dict[str, Any] = info.meta
        self.name = "onnxruntime" if device == "cpu" else f"onnxruntime-{device}"
        self.providers = self.session.get_providers()
        self.input_size, self.dynamic, self._kind = info.input_size, info.dynamic, info.output_kind
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """``float32 [N,3,H,W]`` RGB 0..255 -> ``uint8 [N,H,W]``."""
        (out,) = self.session.run([self._output], {self._input: check_batch(batch)})
        return to_labels(out, self._kind)
