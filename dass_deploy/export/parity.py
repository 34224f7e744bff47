"""Parity of an exported graph with torch: ONNX Runtime sessions, thresholds, latency and the INT8 mIoU gate."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from dass_deploy.export.graph import INPUT_NAME
from dass_deploy.export.images import find_val_pairs, load_image, load_train_ids

#: Parity thresholds: fraction of pixels whose class agrees with torch fp32, and for fp32 the max abs logit error,
#: 1e-3 for logits up to 10 and relative (1e-4 of the largest logit) beyond, since the float32 rounding error grows
#: with the magnitude (random-init ResNet-101s reach |logit| ~ 1e5).
FP32_MAX_ABS = 1e-3
FP32_REL_SCALE = 10.0
MIN_AGREEMENT = {"fp32": 0.999, "fp16": 0.995}
INT8_MAX_MIOU_DROP = 1.0  # points


def ort_session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    """Run one image at a time (fixed-batch exports accept any batch too, but this bounds memory)."""
    return np.concatenate([session.run(None, {INPUT_NAME: images[i : i + 1]})[0] for i in range(len(images))])


def _median_ms(session: ort.InferenceSession, image: np.ndarray, repeats: int = 3) -> float:
    session.run(None, {INPUT_NAME: image})  # warm-up: allocations, kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {INPUT_NAME: image})
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


#: One val image: (image path, label path, height, width). Paths, not arrays: a real val set at export size does not
#: fit in memory (500 Cityscapes frames at 1024x2048 are 12 GB as float32), and each evaluation reads it anew.
ValItem = tuple[Path, Path, int, int]


def val_items(root: Path, height: int, width: int) -> list[ValItem]:
    """Every (image, label) pair of a Cityscapes-layout val folder, to be read at the export size."""
    return [(image, label, height, width) for image, label in find_val_pairs(root)]


def load_val_item(item: ValItem) -> tuple[np.ndarray, np.ndarray]:
    """image [1,3,H,W] float32 0..255 and train-id label [H,W] uint8."""
    image, label, height, width = item
    return load_image(image, height, width)[None], load_train_ids(label, height, width)


def _val_confusions(sessions: Sequence[ort.InferenceSession], items: Sequence[ValItem]) -> list[np.ndarray | None]:
    """Confusion matrix of each logits session over the val items, every image read once for all of them."""
    from dass_train.metrics import confusion_matrix

    confs: list[np.ndarray | None] = [None] * len(sessions)
    for item in items:
        image, gt = load_val_item(item)
        for j, session in enumerate(sessions):
            logits = session.run(None, {INPUT_NAME: image})[0][0]  # [K,H,W]
            c = confusion_matrix(logits.argmax(0).astype(np.uint8), gt, logits.shape[0])
            confs[j] = c if confs[j] is None else confs[j] + c
    return confs


def _miou(conf: np.ndarray | None) -> float:
    from dass_train.metrics import scores

    return float(scores(conf)["miou"]) if conf is not None else 0.0


def val_miou(model: onnx.ModelProto | ort.InferenceSession, items: Sequence[ValItem]) -> float:
    """mIoU in [0, 1] of a logits graph (or its session) on val items; also NNCF's validation function in
    accuracy-controlled quantisation."""
    session = model if isinstance(model, ort.InferenceSession) else ort_session(model)
    return _miou(_val_confusions([session], items)[0])


def evaluate_miou_pair(
    reference: ort.InferenceSession, candidate: ort.InferenceSession, root: Path, height: int, width: int
) -> dict:
    """mIoU (in points) of two logits sessions on a Cityscapes-layout val set, both at the export size."""
    items = val_items(root, height, width)
    miou_ref, miou_cand = (100 * _miou(c) for c in _val_confusions([reference, candidate], items))
    return {"val_images": len(items), "miou_fp32": miou_ref, "miou_int8": miou_cand, "miou_drop": miou_ref - miou_cand}


def compare_with_torch(
    graph: torch.nn.Module,
    logits_model: onnx.ModelProto,
    shipped: onnx.ModelProto,
    images: np.ndarray,
    output: str,
    precision: str,
    real_images: int = 0,
) -> tuple[dict, list[str], ort.InferenceSession]:
    """torch fp32 vs ONNX Runtime CPU: logits of the shipped precision, and the shipped graph's own output.

    Returns the ``parity`` dict for meta.json, the failed thresholds (human-readable) and the shipped graph's
    session (reused for timing). INT8 is judged by its mIoU change on a labelled val set, so its argmax agreement
    is only reported here.
    """
    with torch.inference_mode():
        ref = torch.cat([graph(torch.from_numpy(images[i : i + 1])) for i in range(len(images))]).numpy()
    ort_logits = _run(ort_session(logits_model), images)
    shipped_session = ort_session(shipped)
    ort_out = _run(shipped_session, images) if output == "labels" else ort_logits
    ref_labels = ref.argmax(1)
    ort_labels = ort_out if output == "labels" else ort_out.argmax(1)
    diff = np.abs(ort_logits.astype(np.float64) - ref)
    parity = {
        "reference": "torch fp32 (CPU)",
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "samples": len(images),
        "real_images": real_images,
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "max_abs_logit": float(np.abs(ref).max()),
        "argmax_agreement": float((ort_labels == ref_labels).mean()),
        "thresholds": {"argmax_agreement": MIN_AGREEMENT[precision]} if precision in MIN_AGREEMENT else {},
    }
    failures = []
    if precision == "fp32":
        tol = FP32_MAX_ABS * max(1.0, parity["max_abs_logit"] / FP32_REL_SCALE)
        parity["thresholds"]["max_abs_logit_diff"] = tol
        if parity["max_abs_logit_diff"] > tol:
            failures.append(f"max|Δlogit| {parity['max_abs_logit_diff']:.2e} > {tol:.1e}")
    if precision != "int8" and parity["argmax_agreement"] < MIN_AGREEMENT[precision]:
        failures.append(f"argmax agreement {100 * parity['argmax_agreement']:.2f}% < {100 * MIN_AGREEMENT[precision]}%")
    return parity, failures, shipped_session
