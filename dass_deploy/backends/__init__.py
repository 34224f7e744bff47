"""Runtime backends behind one protocol (``base.Backend``); ``create_backend`` picks and builds one.

Importing this package imports neither torch nor onnxruntime / tensorrt: each backend module imports its runtime
when it is built, and only ``torch_backend`` touches torch.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from dass_deploy.backends.base import Backend
from dass_deploy.errors import DeployError

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
DEVICES = ("cpu", "cuda")

__all__ = ["BACKENDS", "DEVICES", "Backend", "create_backend", "source_checkpoint"]


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


def create_backend(
    model_dir_or_ckpt: str | Path,
    backend: str = "auto",
    device: str = "cpu",
    threads: int | None = None,
    precision: str = "fp32",
) -> Backend:
    """Build a backend for a model directory (``models/<name>``) or a training checkpoint file.

    ``auto`` picks the fastest that can run here: TensorRT if there is a plan, the package and a GPU; else ONNX
    Runtime (CUDA EP on ``cuda``); a checkpoint file always runs on torch. ``precision`` applies to torch only
    (the exported graphs carry their own).
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
        if device == "cuda" and info.plan_path is not None and _has("tensorrt"):
            backend = "tensorrt"
        elif info.onnx_path is not None:
            backend = "onnxruntime"
        else:
            backend = "torch"
    if backend == "tensorrt":
        from dass_deploy.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(info, device=device)
    if backend == "onnxruntime":
        from dass_deploy.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(info, device=device, threads=threads)
    from dass_deploy.backends.torch_backend import TorchBackend

    return TorchBackend(
        source_checkpoint(path, info.meta), device=device, precision=precision, threads=threads, meta=info.meta
    )
