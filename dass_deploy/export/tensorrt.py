"""TensorRT: a serialised engine (``1/model.plan``) built from the exported ONNX graph; needs a CUDA GPU."""

from __future__ import annotations

from pathlib import Path

import torch

from dass_deploy.errors import DeployError
from dass_deploy.export.graph import INPUT_NAME, MAX_BATCH

GPU_EXTRA = "pip install 'dass[gpu]'"


def require_tensorrt() -> None:
    """``DeployError`` naming what the TensorRT build lacks: the ``tensorrt`` package and/or a CUDA GPU."""
    import importlib.util

    missing = []
    if importlib.util.find_spec("tensorrt") is None:
        missing.append("the 'tensorrt' Python package is not installed")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    if missing:
        raise DeployError(f"--trt needs TensorRT and a CUDA GPU, but {' and '.join(missing)}; install with {GPU_EXTRA}")


def build_trt_engine(
    onnx_path: Path,
    plan_path: Path,
    height: int,
    width: int,
    fp16: bool = False,
    int8: bool = False,
    max_batch: int = MAX_BATCH,
    workspace_gib: float = 4.0,
) -> dict:
    """Build a serialised TensorRT engine from the exported ONNX graph; returns the build settings for meta.json.

    One optimisation profile: batch 1 / 1 / ``max_batch`` at the export size, exactly what config.pbtxt states
    (a Triton config cannot express a profile's size range, so plans are never built with dynamic sizes). INT8 uses the graph's QDQ nodes (explicit
    quantisation: the calibration already happened in ``quantize_int8``). A timing cache next to the plan makes
    rebuilds for the same GPU fast.
    """
    require_tensorrt()
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DeployError(f"TensorRT cannot parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16 or int8:
        config.set_flag(trt.BuilderFlag.FP16)  # INT8 layers fall back to fp16 (not fp32) where INT8 has no kernel
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)

    shapes = {"min": (1, 3, height, width), "opt": (1, 3, height, width), "max": (max_batch, 3, height, width)}
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)

    cache_path = plan_path.with_suffix(".timing.cache")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DeployError(f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)")
    plan_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {
        "tensorrt": trt.__version__,
        "fp16": bool(fp16 or int8),
        "int8": bool(int8),
        "profile": {k: list(v) for k, v in shapes.items()},
        "timing_cache": cache_path.name,
        "gpu": torch.cuda.get_device_name(0),
    }
