"""dass-segment on images and folders: every save kind, mirrored layout, --eval, bad inputs, no-overwrite."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SAMPLES

from dass_deploy.cli import segment_main
from dass_train.labels import LABEL_ID_TO_TRAIN_ID, TRAIN_ID_TO_LABEL_ID

FRANKFURT = "frankfurt_000000_000294"


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """in/street.png, in/city/frankfurt/<name>_leftImg8bit.png, in/city/notes.txt (ignored in folders)."""
    root = tmp_path / "in"
    (root / "city" / "frankfurt").mkdir(parents=True)
    shutil.copy(SAMPLES / "street_1024x512.png", root / "street.png")
    shutil.copy(SAMPLES / f"{FRANKFURT}_leftImg8bit.png", root / "city" / "frankfurt" / f"{FRANKFURT}_leftImg8bit.png")
    (root / "city" / "notes.txt").write_text("not an image")
    return root


def test_folder_all_save_kinds_mirrored(model_dir, image_tree, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    argv = [str(image_tree), "--model", str(model_dir), "--out", str(out), "--save", "overlay,color,labels,labelids"]
    rc = segment_main(argv + ["--legend", "--batch", "2"])
    text = capsys.readouterr().out
    assert rc == 0 and "2 images in" in text
    for stem, shape in [("street", (512, 1024)), (f"city/frankfurt/{FRANKFURT}_leftImg8bit", (128, 256))]:
        labels = cv2.imread(str(out / f"{stem}_labels.png"), cv2.IMREAD_UNCHANGED)
        label_ids = cv2.imread(str(out / f"{stem}_labelIds.png"), cv2.IMREAD_UNCHANGED)
        color = cv2.imread(str(out / f"{stem}_color.png"))
        overlay = cv2.imread(str(out / f"{stem}_overlay.jpg"))
        assert labels.shape == label_ids.shape == shape and color.shape == overlay.shape == (*shape, 3)
        assert labels.max() < 19
        np.testing.assert_array_equal(label_ids, TRAIN_ID_TO_LABEL_ID[labels])
        np.testing.assert_array_equal(LABEL_ID_TO_TRAIN_ID[label_ids], labels)
    assert sorted(p.name for p in out.rglob("*.png")) == sorted(
        [f"street_{k}.png" for k in ("labels", "labelIds", "color")]
        + [f"{FRANKFURT}_leftImg8bit_{k}.png" for k in ("labels", "labelIds", "color")]
    )


def test_eval_against_cityscapes_labels(model_dir, tmp_path, capsys):  # noqa: F811
    """mIoU from --eval equals the one computed from the saved label PNG and the ground truth."""
    from dass_train.metrics import confusion_matrix, scores

    gt_dir = tmp_path / "gtFine" / "val" / "frankfurt"
    gt_dir.mkdir(parents=True)
    shutil.copy(SAMPLES / f"{FRANKFURT}_gtFine_labelIds.png", gt_dir)
    out = tmp_path / "out"
    image = SAMPLES / f"{FRANKFURT}_leftImg8bit.png"
    rc = segment_main(
        [
            str(image),
            "--model",
            str(model_dir),
            "--out",
            str(out),
            "--save",
            "labels",
            "--eval",
            str(tmp_path / "gtFine"),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0 and "eval on 1 image(s)" in text and "mIoU" in text
    result = json.loads((out / "eval.json").read_text())
    pred = cv2.imread(str(out / f"{FRANKFURT}_leftImg8bit_labels.png"), cv2.IMREAD_UNCHANGED)
    gt = LABEL_ID_TO_TRAIN_ID[cv2.imread(str(gt_dir / f"{FRANKFURT}_gtFine_labelIds.png"), cv2.IMREAD_UNCHANGED)]
    expected = scores(confusion_matrix(pred, gt, 19))
    assert result["images"] == [FRANKFURT]
    assert result["miou"] == pytest.approx(expected["miou"]) and np.isfinite(result["miou"])


def test_bad_inputs_are_skipped_with_a_summary(model_dir, tmp_path, capsys):  # noqa: F811
    data = (SAMPLES / "street_1024x512.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00" * 2048)
    (tmp_path / "table.csv").write_text("a,b\n")
    good = SAMPLES / f"{FRANKFURT}_leftImg8bit.png"
    sources = [str(tmp_path / n) for n in ("truncated.png", "corrupt.mp4", "table.csv", "missing.png")] + [str(good)]
    rc = segment_main(sources + ["--model", str(model_dir), "--out", str(tmp_path / "out"), "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "1 image, 0 videos (0 frames)" in out and "4 failed" in out
    for name in ("truncated.png", "corrupt.mp4", "table.csv", "missing.png"):
        assert f"warning: {tmp_path / name}" in err
    assert "Traceback" not in out + err
    assert (tmp_path / "out" / f"{FRANKFURT}_leftImg8bit_overlay.jpg").is_file()


def test_no_overwrite_and_default_run_dirs(model_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    image = str(SAMPLES / f"{FRANKFURT}_leftImg8bit.png")
    assert segment_main([image, "--model", str(model_dir), "--quiet"]) == 0
    assert segment_main([image, "--model", str(model_dir), "--quiet"]) == 0
    assert (tmp_path / "runs/segment/exp1").is_dir() and (tmp_path / "runs/segment/exp2").is_dir()
    target = tmp_path / "runs/segment/exp1" / f"{FRANKFURT}_leftImg8bit_color.png"
    target.write_bytes(b"keep me")
    capsys.readouterr()
    assert segment_main([image, "--model", str(model_dir), "--out", "runs/segment/exp1", "--quiet"]) == 1
    assert "exists (use --overwrite" in capsys.readouterr().err and target.read_bytes() == b"keep me"
    assert segment_main([image, "--model", str(model_dir), "--out", "runs/segment/exp1", "--overwrite", "--quiet"]) == 0
    assert cv2.imread(str(target)).shape == (128, 256, 3)


def test_setup_errors_are_one_line(model_dir, tmp_path, capsys):  # noqa: F811
    """A problem found after parsing (here a model folder whose meta.json is not JSON) is one ``error:`` line."""
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "meta.json").write_text("{not json")
    image = str(SAMPLES / f"{FRANKFURT}_leftImg8bit.png")
    assert segment_main([image, "--model", str(broken), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "meta.json" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--model", "nope"], "'--model'"),
        (["--size", "100x7"], "'--size'"),
        (["--save", "overlay,nonsense"], "'--save'"),
        (["--eval", "nogt"], "'--eval'"),
        (["--alpha", "1.5"], "'--alpha'"),
        (["--batch", "0"], "'--batch'"),
        (["--backend", "caffe"], "'--backend'"),
    ],
)
def test_bad_options_are_usage_errors(model_dir, tmp_path, capsys, extra, option):  # noqa: F811
    """click checks options before any model loads: exit 2, the usage line, and an error naming the option."""
    image = str(SAMPLES / f"{FRANKFURT}_leftImg8bit.png")
    argv = [image, "--model", str(model_dir), "--out", str(tmp_path / "o"), *extra]
    with pytest.raises(SystemExit) as exc:
        segment_main([str(tmp_path / a) if a in ("nope", "nogt") else a for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Usage: dass-segment" in err and option in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        segment_main(["--help"])
    assert exc.value.code == 0 and "--benchmark" in capsys.readouterr().out


def test_sources_classification(tmp_path):
    from dass_deploy.sources import collect_sources

    (tmp_path / "a" / "b").mkdir(parents=True)
    shutil.copy(SAMPLES / "street_1024x512.png", tmp_path / "a" / "b" / "x.png")
    found = collect_sources(["0", "rtsp://cam.local/live", str(tmp_path / "a" / "**" / "*.png")])
    assert [(v.kind, v.name) for v in found.videos] == [("camera", "camera0"), ("stream", "stream_live")]
    assert [str(i.rel) for i in found.images] == ["b/x"] and not found.failures
