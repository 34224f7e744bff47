"""Exact logit upsampling for foreign checkpoints: the export graph and the torch backend upsample like the
lineage trained (bilinear ``align_corners=True`` for the BiDA authors, AdaptSegNet, ProDA; docs/UPSAMPLING.md),
dass checkpoints without the ``upsampling`` field keep ``align_corners=False``.

Real checkpoints (random weights in each layout), real exports, real ONNX Runtime sessions, the real street image.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from dass_deploy.export import export_model
from dass_train.checkpoint import (
    checkpoint_meta_default,
    load_model,
    save_checkpoint,
    upsampling_align_corners,
)
from dass_train.network import deeplab_v2

H, W = 512, 1024  # the street image's own size: nothing is resized before the network
FAST = dict(progress=False, parity_samples=1)


def _street(samples: Path) -> np.ndarray:
    bgr = cv2.imread(str(samples / "street_1024x512.png"), cv2.IMREAD_COLOR)
    assert bgr is not None and bgr.shape == (H, W, 3)
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).transpose(2, 0, 1)[None], dtype=np.float32)


def _reference_labels(checkpoint: Path, image: np.ndarray, align_corners: bool) -> np.ndarray:
    """The network's logits, upsampled bilinearly with the given ``align_corners``, argmax: what training saw."""
    net, meta, _ = load_model(checkpoint)
    norm = meta["normalization"]
    x = torch.from_numpy(image)
    if norm["color"] == "BGR":
        x = x.flip(1)
    x = (x - torch.tensor(norm["mean"]).view(1, 3, 1, 1)) / torch.tensor(norm["std"]).view(1, 3, 1, 1)
    with torch.inference_mode():
        logits = F.interpolate(net(x), size=(H, W), mode="bilinear", align_corners=align_corners)
    return logits.argmax(1).numpy().astype(np.uint8)


def _onnx_labels(model_dir: Path, image: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": image})[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("upsampling")


@pytest.fixture(scope="module")
def authors_ckpt(work) -> Path:
    """The BiDA authors' layout: a bare state_dict with a second (target) stem and an unused layer6."""
    torch.manual_seed(3)
    sd = deeplab_v2(19, "resnet18").state_dict()
    out = dict(sd)
    for key, value in sd.items():
        if key.startswith(("conv1.", "bn1.", "layer1.")):
            out["target_" + key] = value.clone()
        if key.startswith("layer5."):
            out["layer6." + key[len("layer5.") :]] = value.clone()
    path = work / "authors.pth"
    torch.save(out, path)
    return path


@pytest.fixture(scope="module")
def old_dass_ckpt(work) -> Path:
    """A dass checkpoint written before the ``upsampling`` field existed."""
    torch.manual_seed(4)
    meta = checkpoint_meta_default(backbone="resnet18", stage="source_only")
    del meta["upsampling"]
    path = work / "old_dass.pt"
    model = deeplab_v2(19, "resnet18")
    save_checkpoint(path, {"format": "dass-checkpoint", "version": 1, "model": model.state_dict(), "meta": meta})
    return path


def test_meta_field_and_helper():
    assert checkpoint_meta_default()["upsampling"] == {"mode": "bilinear", "align_corners": False}
    meta = checkpoint_meta_default(align_corners=True)
    assert meta["upsampling"] == {"mode": "bilinear", "align_corners": True} and upsampling_align_corners(meta)
    assert upsampling_align_corners({}) is False  # files without the field: today's behaviour
    assert upsampling_align_corners({"upsampling": {"mode": "bilinear"}}) is False


def test_lineages_set_align_corners(work, authors_ckpt, old_dass_ckpt):
    sd = deeplab_v2(19, "resnet18").state_dict()
    adaptseg = work / "adaptseg.pth"
    torch.save({"module." + k: v for k, v in sd.items()}, adaptseg)
    assert upsampling_align_corners(load_model(adaptseg)[1])
    _, meta, report = load_model(authors_ckpt)
    assert upsampling_align_corners(meta) and "logit upsampling: bilinear, align_corners=True" in report
    assert not upsampling_align_corners(load_model(old_dass_ckpt)[1])


def test_authors_checkpoint_export_reproduces_align_corners_true(work, authors_ckpt, samples):
    image = _street(samples)
    result = export_model(authors_ckpt, out=work / "models", name="authors", height=H, width=W, **FAST)
    meta = json.loads((result.model_dir / "meta.json").read_text())
    assert meta["upsampling"] == {"mode": "bilinear", "align_corners": True}
    assert meta["export"]["upsample"] == "bilinear, align_corners=True"
    labels = _onnx_labels(result.model_dir, image)
    true_ref = _reference_labels(authors_ckpt, image, align_corners=True)
    false_ref = _reference_labels(authors_ckpt, image, align_corners=False)
    agree_true, agree_false = (labels == true_ref).mean(), (labels == false_ref).mean()
    assert agree_true >= 0.995, f"only {100 * agree_true:.2f}% of pixels match align_corners=True"
    assert agree_false < agree_true  # the image is discriminative: the two upsamplings do differ on it

    from dass_deploy.backends import create_backend

    torch_labels = create_backend(result.model_dir, backend="torch").predict(image)
    assert (torch_labels == true_ref).mean() >= 0.995


def test_old_dass_checkpoint_keeps_align_corners_false(work, old_dass_ckpt, samples):
    image = _street(samples)
    result = export_model(old_dass_ckpt, out=work / "models", name="old", height=H, width=W, **FAST)
    meta = json.loads((result.model_dir / "meta.json").read_text())
    assert meta["upsampling"] == {"mode": "bilinear", "align_corners": False}
    labels = _onnx_labels(result.model_dir, image)
    false_ref = _reference_labels(old_dass_ckpt, image, align_corners=False)
    true_ref = _reference_labels(old_dass_ckpt, image, align_corners=True)
    assert (labels == false_ref).mean() >= 0.995
    assert (labels == true_ref).mean() < (labels == false_ref).mean()
