"""Runtime backends behind one protocol (``base.Backend``); ``create_backend`` picks and builds one.

Importing this package imports neither torch nor onnxruntime / openvino / tensorrt: each backend module imports its
runtime when it is built, and only ``torch_backend`` touches torch.

``auto`` on CPU picks, by the exported graph's precision, the first installed runtime of ``AUTO_CPU_ORDER``; the
order is what the benchmarks measured with every runtime timed round-robin in one run (figures keyed by machine):
fp32 graphs run as fast or faster on ONNX Runtime (ResNet-101 512x1024: 7.13 s vs OpenVINO f32 7.05 s, equal,
``benchmarks/results/runtime_cpu.md``; ResNet-18 128x256: 84 vs 125 ms, ``int8.md``; fp16 graphs follow fp32, not
measured separately), INT8 (QDQ) graphs on OpenVINO, whose VNNI int8 kernels ran 2-2.7x faster than ONNX
Runtime's (22-25 vs 44-64 ms, ``int8.md``). OpenVINO's bf16 mode is faster still for fp32 graphs on CPUs with bf16
kernels (3.80 s at 512x1024) but changes labels, so ``auto`` never picks it; ``--backend openvino`` with precision
``bf16`` asks for it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from dass_deploy.backends.base import Backend
from dass_deploy.errors import DeployError

BACKENDS = ("auto", "torch", "onnxruntime", "openvino", "tensorrt")
#: exported precision -> CPU runtimes in order of measured speed (see the module docstring).
AUTO_CPU_ORDER = {
    "fp32": ("onnxruntime", "openvino"),
    "fp16": ("onnxruntime", "openvino"),
    "int8": ("openvino", "onnxruntime"),
}
#: import name of each runtime, to tell whether it is installed without importing it.
RUNTIME_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}
DEVICES = ("cpu", "cuda")

__all__ = ["AUTO_CPU_ORDER", "BACKENDS", "DEVICES", "Backend", "auto_backend", "create_backend", "source_checkpoint"]


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def source_checkpoint(model_dir: str | Path, meta: dict[str, Any]) -> Path:
    """The training checkpoint a model directory was exported from (absolute, or relative to the directory)."""
    recorded = (meta.get("source_checkpoint") or {}).get("path")
    if not recorded:
        raise DeployError(f"{model_dir}/meta.json names no source checkpoint; the torch backend needs one")
    for candidate in (Path(recorded), Path(model_dir) / recorded):
        if candidate.is_file():
            return candidate
    raise DeployError(f"source checkpoint {recorded} of {model_dir} not found; use --checkpoint or another backend")


def auto_backend(device: str, precision: str, has_onnx: bool, has_plan: bool) -> str:
    """The runtime ``--backend auto`` runs an exported folder with: TensorRT on a GPU when there is a plan, ONNX
    Runtime's CUDA EP on a GPU otherwise, and on CPU the first installed runtime of ``AUTO_CPU_ORDER[precision]``."""
    if device == "cuda":
        if has_plan and _has("tensorrt"):
            return "tensorrt"
        return "onnxruntime" if has_onnx else "torch"
    if not has_onnx:
        return "torch"
    for name in AUTO_CPU_ORDER.get(precision, AUTO_CPU_ORDER["fp32"]):
        if _has(RUNTIME_MODULES[name]):
            return name
    return "onnxruntime"  # a dependency of the package: its absence is reported by the backend itself


def create_backend(
    model_dir_or_ckpt: str | Path,
    backend: str = "auto",
    device: str = "cpu",
    threads: int | None = None,
    precision: str = "fp32",
) -> Backend:
    """Build a backend for a model directory (``models/<name>``) or a training checkpoint file.

    ``auto`` picks the fastest that can run here (``auto_backend``); a checkpoint file always runs on torch.
    ``precision`` applies to torch (fp16 / bf16 autocast on CUDA) and OpenVINO (``bf16`` runs f32 layers in
    bfloat16); ONNX Runtime and TensorRT run the exported graph's own precision.
    """
    if backend not in BACKENDS:
        raise DeployError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise DeployError(f"--device {device!r} is not one of {', '.join(DEVICES)}")
    path = Path(model_dir_or_ckpt)
    if not path.exists():
        raise DeployError(f"model {path} not found")
    if path.is_file():  # a training checkpoint
        if backend not in ("auto", "torch"):
            raise DeployError(f"{path} is a checkpoint: only --backend torch runs it (export it for {backend})")
        from dass_deploy.backends.torch_backend import TorchBackend

        return TorchBackend(path, device=device, precision=precision, threads=threads)

    from dass_deploy.repository import load_model_dir

    info = load_model_dir(path)
    if backend == "auto":
        exported = str(info.meta.get("precision", "fp32"))
        backend = auto_backend(device, exported, info.onnx_path is not None, info.plan_path is not None)
    if backend == "openvino":
        from dass_deploy.backends.openvino import OpenVINOBackend

        return OpenVINOBackend(
            info, device=device, threads=threads, precision="bf16" if precision == "bf16" else "fp32"
        )
    if backend == "tensorrt":
        from dass_deploy.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(info, device=device)
    if backend == "onnxruntime":
        from dass_deploy.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(info, device=device, threads=threads)
    if info.meta.get("adapt_bn"):
        raise DeployError(
            f"{path} was exported with --adapt-bn: its BatchNorm statistics are in the exported graph, not in the "
            "source checkpoint the torch backend would load; use --backend onnxruntime, or --checkpoint CKPT "
            "--adapt-bn SOURCE"
        )
    from dass_deploy.backends.torch_backend import TorchBackend

    return TorchBackend(
        source_checkpoint(path, info.meta), device=device, precision=precision, threads=threads, meta=info.meta
    )
