"""Checkpoint -> ONNX (fp32 / fp16 / INT8) and optionally a TensorRT plan or OpenVINO IR, in a Triton folder.

One module per target: ``graph`` (the traced ONNX graph), ``images`` (calibration / parity / val inputs),
``parity`` (ONNX Runtime sessions, thresholds, the INT8 mIoU gate), ``precision`` (fp16, INT8), ``tensorrt``,
``triton`` (config.pbtxt / meta.json provenance) and ``exporter`` (``export_model``, the temp-folder protocol).
A new runtime is a new small module. The names below are the public API (the CLIs and benchmarks import them).
"""

from __future__ import annotations

from dass_deploy.export.exporter import ExportResult, export_model
from dass_deploy.export.graph import (
    INPUT_NAME,
    LABELS_NAME,
    LOGITS_NAME,
    MAX_BATCH,
    OPSET,
    ExportGraph,
    append_argmax,
)
from dass_deploy.export.images import (
    IMAGE_SUFFIXES,
    ImageFolderReader,
    list_images,
    load_image,
    synthetic_images,
)
from dass_deploy.export.parity import (
    FP32_MAX_ABS,
    FP32_REL_SCALE,
    INT8_MAX_MIOU_DROP,
    MIN_AGREEMENT,
    evaluate_miou_pair,
    ort_session,
)
from dass_deploy.export.precision import convert_to_fp16, quantize_int8
from dass_deploy.export.tensorrt import GPU_EXTRA, build_trt_engine, require_tensorrt

__all__ = [
    "FP32_MAX_ABS",
    "FP32_REL_SCALE",
    "GPU_EXTRA",
    "IMAGE_SUFFIXES",
    "INPUT_NAME",
    "INT8_MAX_MIOU_DROP",
    "LABELS_NAME",
    "LOGITS_NAME",
    "MAX_BATCH",
    "MIN_AGREEMENT",
    "OPSET",
    "ExportGraph",
    "ExportResult",
    "ImageFolderReader",
    "append_argmax",
    "build_trt_engine",
    "convert_to_fp16",
    "evaluate_miou_pair",
    "export_model",
    "list_images",
    "load_image",
    "ort_session",
    "quantize_int8",
    "require_tensorrt",
    "synthetic_images",
]
