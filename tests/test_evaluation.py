"""Metrics against the official cityscapesscripts evaluation, the torch confusion matrix, and evaluate()."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLES  # noqa: E402
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from dass_train.data.datasets import CityscapesDataset
from dass_train.data.transforms import EvalTransform, TransformConfig
from dass_train.evaluation import ConfusionMatrix, evaluate, predict_logits
from dass_train.labels import (
    CLASS_NAMES,
    SYNTHIA_13,
    SYNTHIA_16,
    label_ids_to_train_ids,
    train_ids_to_label_ids,
)
from dass_train.metrics import confusion_matrix, format_table, scores

FRAME = "frankfurt_000000_000294"
TRAIN = 16  # trainId "train": kept out of every ground truth and prediction below, so its IoU is nan


def _noisy_prediction(rng: np.random.Generator, train_ids: np.ndarray) -> np.ndarray:
    """A plausible prediction: the ground truth with 30% of pixels (and every ignored one) replaced at random."""
    valid = np.array([c for c in range(19) if c != TRAIN])
    pred = np.where(train_ids == 255, rng.choice(valid, train_ids.shape), train_ids)
    noise = rng.random(train_ids.shape) < 0.3
    return np.where(noise, rng.choice(valid, train_ids.shape), pred).astype(np.uint8)


def _write_benchmark(root: Path) -> list[str]:
    """Cityscapes layout (val) with the real sample frame and two synthetic frames, plus labelId predictions."""
    rng = np.random.default_rng(0)
    frames = {}
    frames[FRAME] = np.array(Image.open(SAMPLES / f"{FRAME}_gtFine_labelIds.png"))
    for stem in ("munster_000000_000019", "lindau_000001_000019"):
        cells = rng.integers(0, 34, size=(9, 17))
        cells[cells == 31] = 7  # no "train" (labelId 31) anywhere
        frames[stem] = np.kron(cells, np.ones((8, 8), dtype=np.int64))[:64, :128].astype(np.uint8)
    for stem, label_ids in frames.items():
        city = stem.split("_")[0]
        (root / "gtFine" / "val" / city).mkdir(parents=True, exist_ok=True)
        (root / "leftImg8bit" / "val" / city).mkdir(parents=True, exist_ok=True)
        Image.fromarray(label_ids, mode="L").save(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png")
        h, w = label_ids.shape
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(
            root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png"
        )
        pred = _noisy_prediction(rng, label_ids_to_train_ids(label_ids))
        (root / "results").mkdir(exist_ok=True)
        Image.fromarray(train_ids_to_label_ids(pred), mode="L").save(root / "results" / f"{stem}_pred.png")
    return list(frames)


def _official(root: Path, monkeypatch) -> dict:
    """Run cityscapesscripts' evalPixelLevelSemanticLabeling on the layout (its own prediction lookup)."""
    monkeypatch.setenv("CITYSCAPES_DATASET", str(root))
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(root / "results"))
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev

    args = ev.args
    monkeypatch.setattr(args, "evalInstLevelScore", False)
    monkeypatch.setattr(args, "quiet", True)
    monkeypatch.setattr(args, "JSONOutput", False)
    monkeypatch.setattr(args, "predictionPath", None)
    monkeypatch.setattr(args, "predictionWalk", None)
    gts = sorted((root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    preds = [ev.getPrediction(args, str(gt)) for gt in gts]
    return ev.evaluateImgLists(preds, [str(g) for g in gts], args)


def _ours(root: Path) -> np.ndarray:
    ds = CityscapesDataset(root, "val")
    conf = np.zeros((19, 19), dtype=np.int64)
    for i, name in enumerate(ds.names):
        stem = Path(name).name[: -len("_leftImg8bit.png")]
        pred = label_ids_to_train_ids(np.array(Image.open(root / "results" / f"{stem}_pred.png")))
        conf += confusion_matrix(pred, ds.load_label(i), 19)
    return conf


def test_scores_match_cityscapesscripts(tmp_path, monkeypatch):
    _write_benchmark(tmp_path)
    official = _official(tmp_path, monkeypatch)
    conf = _ours(tmp_path)
    ours = scores(conf)
    theirs = np.array([official["classScores"][name] for name in CLASS_NAMES])
    assert np.isnan(theirs[TRAIN]) and np.isnan(ours["iou"][TRAIN])
    np.testing.assert_allclose(ours["iou"], theirs, rtol=0, atol=1e-6, equal_nan=True)
    assert abs(ours["miou"] - official["averageScoreClasses"]) < 1e-6
    assert 0.3 < ours["miou"] < 0.9  # a real, non-trivial score
    # Subsets: the same per-class IoUs averaged over 16 / 13 classes.
    for subset in (SYNTHIA_16, SYNTHIA_13):
        expected = np.nanmean(theirs[list(subset)])
        assert abs(scores(conf, subset)["miou"] - expected) < 1e-6
    assert len(SYNTHIA_16) == 16 and len(SYNTHIA_13) == 13


def test_confusion_matrix_definition():
    gt = np.array([[0, 0, 1, 255], [2, 2, 2, 1]])
    pred = np.array([[0, 1, 1, 2], [2, 0, 2, 1]])
    conf = confusion_matrix(pred, gt, 3)
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, [[1, 1, 0], [0, 2, 0], [1, 0, 2]])
    s = scores(conf)
    np.testing.assert_allclose(s["iou"], [1 / 3, 2 / 3, 2 / 3])
    assert s["acc"] == pytest.approx(5 / 7) and s["macc"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    with pytest.raises(ValueError, match="trainIds"):
        confusion_matrix(pred, np.full_like(gt, 26), 3)  # labelIds passed by mistake
    with pytest.raises(ValueError):
        confusion_matrix(np.full_like(pred, 255), gt, 3)


def test_torch_confusion_matrix_equals_numpy():
    rng = np.random.default_rng(0)
    cm = ConfusionMatrix(19, "cpu")
    expected = np.zeros((19, 19), dtype=np.int64)
    for _ in range(3):
        gt = rng.integers(0, 19, (2, 24, 32))
        gt[rng.random(gt.shape) < 0.2] = 255
        pred = rng.integers(0, 19, (2, 24, 32))
        cm.update(torch.from_numpy(pred), torch.from_numpy(gt).to(torch.uint8))
        expected += confusion_matrix(pred, gt, 19)
    np.testing.assert_array_equal(cm.compute(), expected)
    cm.all_reduce()  # no process group: unchanged
    np.testing.assert_array_equal(cm.compute(), expected)
    with pytest.raises(ValueError):
        cm.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 33))


def test_format_table():
    conf = np.diag(np.arange(1, 20)).astype(np.int64)
    conf[0, 1] = 5
    s = scores(conf)
    s["miou16"] = scores(conf, SYNTHIA_16)["miou"]
    table = format_table(s, CLASS_NAMES)
    assert "road" in table and "bicycle" in table and "mIoU16" in table and "100.00" in table
    assert f"{100 * s['iou'][0]:6.2f}" in table


# --- evaluate() on real files with real (tiny) models ------------------------------------------------------------
IDENTITY_NORM = {"color": "RGB", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


def _class_coded_split(root: Path, classes: list[int]) -> None:
    """Frames of 64x32 whose red value is 10 * trainId; a quarter of each label is 'unlabeled' (labelId 0)."""
    for n, c in enumerate(classes):
        stem = f"bonn_000000_{n:06d}"
        img = np.zeros((32, 64, 3), np.uint8)
        img[..., 0] = 10 * c
        (root / "leftImg8bit/val/bonn").mkdir(parents=True, exist_ok=True)
        (root / "gtFine/val/bonn").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / f"leftImg8bit/val/bonn/{stem}_leftImg8bit.png")
        label = np.full((32, 64), train_ids_to_label_ids(np.array([c]))[0], np.uint8)
        label[:8] = 0
        Image.fromarray(label, mode="L").save(root / f"gtFine/val/bonn/{stem}_gtFine_labelIds.png")


def _nearest_class_model() -> nn.Module:
    """1x1 conv with logit_k = 20k*r - 100k^2 = -(r - 10k)^2 + r^2: argmax is the k with 10k closest to r."""
    conv = nn.Conv2d(3, 19, 1)
    k = torch.arange(19, dtype=torch.float32)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, 0, 0, 0] = 20 * k
        conv.bias.copy_(-100 * k**2)
    return conv


def _loader(root: Path) -> DataLoader:
    ds = CityscapesDataset(root, "val", EvalTransform(TransformConfig(eval_size=(32, 16)), IDENTITY_NORM))
    return DataLoader(ds, batch_size=2)


def test_evaluate_full_protocol_with_tta(tmp_path):
    classes = [0, 2, 13, 13, 18]
    _class_coded_split(tmp_path, classes)
    model = _nearest_class_model().train()
    for flip, scales in ((False, (1.0,)), (True, (1.0,)), (True, (0.5, 1.0))):
        result = evaluate(model, _loader(tmp_path), eval_size=(32, 16), flip=flip, scales=scales, progress=False)
        assert model.training  # mode restored
        assert {"miou", "iou", "acc", "macc", "miou16", "miou13", "confusion", "num_images"} <= set(result)
        assert result["num_images"] == 5
        assert result["miou"] == pytest.approx(1.0) and result["miou16"] == pytest.approx(1.0)
        assert [c for c in range(19) if not np.isnan(result["iou"][c])] == [0, 2, 13, 18]
        # full resolution: 5 frames x 24 labelled rows x 64 columns
        assert result["confusion"].sum() == 5 * 24 * 64

    # A model one class off (predicts c + 1; 18 stays 18, there is no 19) scores 1 of 7 classes: the metric can fail.
    shifted = _nearest_class_model()
    with torch.no_grad():
        shifted.weight[:, 0, 0, 0] = 20 * (torch.arange(19.0) - 1)
        shifted.bias.copy_(-100 * (torch.arange(19.0) - 1) ** 2)
    wrong = evaluate(shifted, _loader(tmp_path), eval_size=(32, 16), progress=False)
    assert wrong["miou"] == pytest.approx(1 / 7)


def test_evaluate_random_model_with_flip_and_full_size(tmp_path):
    _class_coded_split(tmp_path, [1, 5, 8])
    torch.manual_seed(0)
    model = nn.Sequential(nn.AvgPool2d(4), nn.Conv2d(3, 19, 1))  # logits at 1/4 resolution, like a real network
    result = evaluate(model, _loader(tmp_path), eval_size=(16, 8), full_size=(64, 32), flip=True, progress=False)
    assert 0.0 <= result["miou"] <= 1.0 and len(result["iou"]) == 19 and result["confusion"].shape == (19, 19)


def test_predict_logits_flip_averages_probabilities():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 19, 3, padding=1)  # not flip-equivariant
    x = torch.randn(2, 3, 8, 12)
    plain = predict_logits(model, x, (16, 24))
    assert plain.shape == (2, 19, 16, 24)
    up = torch.nn.functional.interpolate
    expected = (
        up(model(x), size=(16, 24), mode="bilinear").softmax(1)
        + up(model(x.flip(-1)).flip(-1), size=(16, 24), mode="bilinear").softmax(1)
    ) / 2
    tta = predict_logits(model, x, (16, 24), flip=True)
    torch.testing.assert_close(tta.softmax(1), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(tta.softmax(1), plain.softmax(1))


def test_sample_frame_scored_through_the_dataset(tmp_path):
    """The real frame through CityscapesDataset: a perfect prediction scores 1 on every class it contains."""
    (tmp_path / "gtFine/val/frankfurt").mkdir(parents=True)
    (tmp_path / "leftImg8bit/val/frankfurt").mkdir(parents=True)
    shutil.copy(
        SAMPLES / f"{FRAME}_gtFine_labelIds.png", tmp_path / f"gtFine/val/frankfurt/{FRAME}_gtFine_labelIds.png"
    )
    shutil.copy(SAMPLES / f"{FRAME}_leftImg8bit.png", tmp_path / f"leftImg8bit/val/frankfurt/{FRAME}_leftImg8bit.png")
    gt = CityscapesDataset(tmp_path, "val").load_label(0)
    pred = np.where(gt == 255, 0, gt)
    s = scores(confusion_matrix(pred, gt, 19))
    present = sorted(set(np.unique(gt).tolist()) - {255})
    assert [c for c in range(19) if not np.isnan(s["iou"][c])] == present
    assert s["miou"] == 1.0 and s["acc"] == 1.0
