"""The synthetic GTA5 -> Cityscapes generator: file layouts, label formats, determinism, the kinds of domain shift.

Rendering speed is measured by benchmarks/bench_synthetic.py (which records the machine), not asserted here."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import subprocess_env
from PIL import Image

from dass_train.data import synthetic as S
from dass_train.errors import DataError
from dass_train.labels import LABELS, NUM_CLASSES, label_ids_to_train_ids

SMALL = S.SyntheticConfig(width=256, height=128, n_source=6, n_target_train=5, n_target_val=4, seed=3)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    S.generate(root, SMALL, progress=False)
    return root


def test_layout_and_file_names(small_root: Path) -> None:
    images = sorted(p.name for p in (small_root / "gta5" / "images").iterdir())
    labels = sorted(p.name for p in (small_root / "gta5" / "labels").iterdir())
    assert images == labels == [f"{i:05d}.png" for i in range(1, SMALL.n_source + 1)]
    for split, n in (("train", SMALL.n_target_train), ("val", SMALL.n_target_val)):
        imgs = sorted((small_root / "cityscapes" / "leftImg8bit" / split).glob("*/*.png"))
        gts = sorted((small_root / "cityscapes" / "gtFine" / split).glob("*/*.png"))
        assert len(imgs) == len(gts) == n
        cities = {p.parent.name for p in imgs}
        assert 2 <= len(cities) <= 3 and cities <= set(S.TARGET_CITIES[split])
        for img, gt in zip(imgs, gts, strict=True):
            m = re.fullmatch(r"([a-z]+)_000000_(\d{6})_leftImg8bit\.png", img.name)
            assert m and m.group(1) == img.parent.name
            assert gt.name == f"{m.group(1)}_000000_{m.group(2)}_gtFine_labelIds.png"
    meta = json.loads((small_root / "synthetic.json").read_text())
    assert meta["seed"] == SMALL.seed and meta["version"] == S.GENERATOR_VERSION
    assert meta["counts"] == {"source": 6, "train": 5, "val": 4}
    assert (meta["width"], meta["height"]) == (256, 128)


def test_label_formats(small_root: Path) -> None:
    valid_ids = {lab.id for lab in LABELS}
    for path in sorted((small_root / "gta5" / "labels").iterdir()):
        im = Image.open(path)
        assert im.mode == "P" and im.size == (256, 128)
        pal = np.array(im.getpalette()[: 256 * 3], dtype=np.uint8).reshape(-1, 3)
        ids = np.array(im)  # palette indices are the labelIds, like real GTA5 labels
        assert set(np.unique(ids)) <= valid_ids
        for lab in LABELS:
            assert tuple(pal[lab.id]) == lab.color, lab.name
        rgb = Image.open(small_root / "gta5" / "images" / path.name)
        assert rgb.mode == "RGB" and rgb.size == (256, 128)
    for path in sorted((small_root / "cityscapes" / "gtFine").rglob("*.png")):
        im = Image.open(path)
        assert im.mode == "L" and im.size == (256, 128)
        train_ids = label_ids_to_train_ids(np.array(im))
        assert 0.85 < (train_ids != 255).mean() < 0.99  # void: the ego-vehicle bonnet, like Cityscapes' frames
        assert (train_ids[-1, 100:156] == 255).all()  # the bonnet covers the bottom centre
    # the labels are exactly the scene that was rendered: regenerate one image alone from its seed
    rng = S.image_rng(SMALL.seed, "train", 2)
    expected = S.compose_scene(rng, 256, 128, "target").labels
    gt = next((small_root / "cityscapes" / "gtFine" / "train").rglob("*_000002_gtFine_labelIds.png"))
    np.testing.assert_array_equal(label_ids_to_train_ids(np.array(Image.open(gt))), expected)


def test_deterministic_and_independent_of_workers(small_root: Path, tmp_path: Path) -> None:
    S.generate(tmp_path / "a", SMALL, progress=False, workers=2)
    assert _digest(tmp_path / "a") == _digest(small_root)
    other = S.SyntheticConfig(**{**SMALL.__dict__, "seed": SMALL.seed + 1})
    S.generate(tmp_path / "b", other, progress=False)
    assert _digest(tmp_path / "b") != _digest(small_root)


def test_ensure_dataset_reuses_and_regenerates(tmp_path: Path) -> None:
    cfg = S.SyntheticConfig(width=128, height=64, n_source=2, n_target_train=2, n_target_val=2, seed=1)
    root = S.ensure_dataset(tmp_path / "d", cfg, progress=False)
    stamp = (root / "synthetic.json").stat().st_mtime_ns
    assert S.ensure_dataset(root, cfg, progress=False) == root
    assert (root / "synthetic.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    bigger = S.SyntheticConfig(**{**cfg.__dict__, "n_source": 3})
    S.ensure_dataset(root, bigger, progress=False)
    assert len(list((root / "gta5" / "images").iterdir())) == 3
    assert json.loads((root / "synthetic.json").read_text())["n_source"] == 3
    # a run's config reaches the generator: another style shift is another dataset
    from dass_train.config import build_config
    from dass_train.trainer import synthetic_settings

    run_cfg = build_config("synth2real", ["data.synthetic_style_shift=0.5", "run.seed=1"])
    defaults = build_config("synth2real").data  # the config's defaults are the generator's
    assert (defaults.synthetic_style_shift, defaults.synthetic_class_shift) == (
        S.DEFAULT_STYLE_SHIFT,
        S.DEFAULT_CLASS_SHIFT,
    )
    assert synthetic_settings(run_cfg).style_shift == 0.5 and synthetic_settings(run_cfg).seed == 1
    S.ensure_dataset(root, S.SyntheticConfig(**{**bigger.__dict__, "style_shift": 0.5}), progress=False)
    assert json.loads((root / "synthetic.json").read_text())["style_shift"] == 0.5
    # a folder with data but no synthetic.json may be a real dataset: refuse
    (tmp_path / "real" / "gta5").mkdir(parents=True)
    with pytest.raises(DataError, match="synthetic.json"):
        S.ensure_dataset(tmp_path / "real", cfg, progress=False)


def test_an_interrupted_generation_is_regenerated_not_refused(tmp_path: Path) -> None:
    """A ``dass-train synthesize`` killed half-way leaves images but no synthetic.json; its marker says the folder is
    the generator's own, so the next run regenerates it instead of refusing it as a possible real dataset."""
    root = tmp_path / "synthetic"
    cmd = [sys.executable, "-m", "dass_train", "synthesize", "--out", str(root), "--counts", "2000,0,0"]
    proc = subprocess.Popen([*cmd, "--size", "128,64", "--no-progress"], env=subprocess_env())
    images = root / "gta5" / "images"
    deadline = time.monotonic() + 120
    while len(list(images.glob("*.png"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    assert len(list(images.glob("*.png"))) >= 3 and not (root / "synthetic.json").exists()
    assert (root / S.PARTIAL).is_file()
    cfg = S.SyntheticConfig(width=128, height=64, n_source=2, n_target_train=1, n_target_val=1, seed=0)
    S.ensure_dataset(root, cfg, progress=False)
    assert sorted(p.name for p in images.iterdir()) == ["00001.png", "00002.png"]  # nothing of the killed run left
    assert (root / "synthetic.json").is_file() and not (root / S.PARTIAL).exists()


def test_class_coverage_and_plausible_layout() -> None:
    counts = np.zeros(256, dtype=np.int64)
    for i in range(80):
        labels = S.render_layout(np.random.default_rng([7, i]), 256, 128)
        assert labels.dtype == np.uint8 and labels.shape == (128, 256)
        counts += np.bincount(labels.ravel(), minlength=256)
        rows_sky = np.flatnonzero((labels == 10).any(axis=1))
        rows_road = np.flatnonzero((labels == 0).any(axis=1))
        assert rows_road.size and rows_road.max() == 127  # the road reaches the bottom
        if rows_sky.size:
            assert rows_sky.max() < rows_road.min() + 2  # sky is above the horizon, road below
    present = int((counts[:NUM_CLASSES] > 0).sum())
    assert present >= 15, counts[:NUM_CLASSES]
    assert counts[255] / counts.sum() < 0.01
    share = counts[:NUM_CLASSES] / counts.sum()
    assert share[0] > 0.15 and share[2] > 0.1  # road and building dominate, like in real street datasets


def test_domains_differ_in_colour_for_the_same_layout() -> None:
    """Per-class mean colour distance between the styles, far above the spread between two source renderings."""
    gap, same = [], []
    for i in range(6):
        rng = np.random.default_rng([11, i])
        scene = S.compose_scene(rng, 256, 128)
        labels = scene.labels
        src_a, src_b = S.render_source(scene, rng), S.render_source(scene, rng)
        tgt = S.render_target(scene, rng)
        assert tgt.shape == src_a.shape == (128, 256, 3) and tgt.dtype == np.uint8
        for c in np.unique(labels):
            m = labels == c
            if c == 255 or m.sum() < 50:
                continue
            mean_a, mean_b, mean_t = (im[m].astype(np.float64).mean(0) for im in (src_a, src_b, tgt))
            gap.append(np.linalg.norm(mean_a - mean_t))
            same.append(np.linalg.norm(mean_a - mean_b))
    assert np.mean(gap) > 40 and np.mean(gap) > 2 * np.mean(same), (np.mean(gap), np.mean(same))
    # the target style is a camera: noisy (high-frequency energy) where the source is flat
    rng = np.random.default_rng(5)
    scene = S.compose_scene(rng, 256, 128)
    lap = lambda im: np.abs(cv2.Laplacian(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY), cv2.CV_32F))  # noqa: E731
    road = scene.labels == 0
    assert np.median(lap(S.render_target(scene, rng))[road]) > np.median(lap(S.render_source(scene, rng))[road]) + 1
    # a plain trainId map (no scene) renders too
    assert S.render_target(scene.labels, rng).shape == (128, 256, 3)


def test_class_conditional_shift_survives_a_global_colour_correction() -> None:
    """With ``class_shift`` the target swaps the colours of road and sidewalk: after the best per-channel affine map
    from target to source colours over the whole image (all a re-estimation of BatchNorm statistics can do to the
    input), the two classes still lie in the reverse order along the colour direction that separates them in the
    source. Without it, the order is kept."""

    def separation(class_shift: float, a: int, b: int) -> tuple[float, float]:
        src_px, tgt_px, lab_px = [], [], []
        for i in range(4):
            rng = np.random.default_rng([21, i])
            scene = S.compose_scene(rng, 256, 128)
            src_px.append(S.render_source(scene, rng).reshape(-1, 3))
            tgt_px.append(S.render_target(scene, rng, class_shift=class_shift).reshape(-1, 3))
            lab_px.append(scene.labels.reshape(-1))
        src, tgt, lab = (np.concatenate(x).astype(np.float64) for x in (src_px, tgt_px, lab_px))
        keep = lab != 255
        for ch in range(3):  # least-squares per-channel gain and offset, fitted on every labelled pixel
            design = np.stack([tgt[keep, ch], np.ones(int(keep.sum()))], 1)
            gain, offset = np.linalg.lstsq(design, src[keep, ch], rcond=None)[0]
            tgt[:, ch] = gain * tgt[:, ch] + offset
        source_gap = src[lab == a].mean(0) - src[lab == b].mean(0)
        direction = source_gap / np.linalg.norm(source_gap)
        return float(direction @ source_gap), float(direction @ (tgt[lab == a].mean(0) - tgt[lab == b].mean(0)))

    road, sidewalk, vegetation, terrain = 0, 1, 8, 9
    in_source, swapped = separation(1.0, road, sidewalk)
    assert in_source > 50 and swapped < -10, (in_source, swapped)
    assert separation(0.0, road, sidewalk)[1] > 30
    assert separation(1.0, vegetation, terrain)[1] > 30  # classes outside the swap keep their order


def _scene_stats(domain: str, n: int = 60) -> dict[str, np.ndarray]:
    """Camera and content statistics of ``n`` scenes of one domain (layouts only: no rendering)."""
    horizon, focal, cam, share = [], [], [], []
    for i in range(n):
        scene = S.compose_scene(np.random.default_rng([31, i]), 256, 128, domain)
        horizon.append(scene.horizon / 128)
        focal.append(scene.focal / 256)
        cam.append(scene.cam_height)
        share.append(np.bincount(scene.labels.ravel(), minlength=256) / scene.labels.size)
    return {k: np.array(v) for k, v in locals().items() if k in ("horizon", "focal", "cam", "share")}


def test_domains_differ_in_camera_object_scale_and_class_frequencies() -> None:
    """The content part of the shift (``SCENE_PRIORS``): the target's car-mounted camera is lower, with a narrower
    view (larger objects) and a bonnet at the bottom; its streets hold fewer
    trucks and buses and more people and trees."""
    src, tgt = _scene_stats("source"), _scene_stats("target")
    for stats, prior in ((src, S.SCENE_PRIORS["source"]), (tgt, S.SCENE_PRIORS["target"])):
        assert prior.horizon[0] - 0.01 <= stats["horizon"].min() and stats["horizon"].max() <= prior.horizon[1] + 0.01
        assert prior.focal[0] <= stats["focal"].min() and stats["focal"].max() <= prior.focal[1]
    assert tgt["cam"].max() < src["cam"].min()  # camera geometry: lower camera, no overlap
    assert tgt["focal"].mean() > 1.2 * src["focal"].mean()  # object scale: same object, larger in the target
    assert tgt["horizon"].std() < src["horizon"].std()  # one fixed camera vs many game cameras
    road, building, vegetation, person, rider, truck, bus = 0, 2, 8, 11, 12, 14, 15
    s, t = src["share"].mean(0), tgt["share"].mean(0)
    assert t[255] > 0.03 > 0.01 > s[255]  # the bonnet is void, in the target only
    assert t[person] + t[rider] > 1.5 * (s[person] + s[rider])
    assert t[vegetation] > 1.2 * s[vegetation]
    assert s[truck] + s[bus] > 1.5 * (t[truck] + t[bus])
    assert min(s[road], t[road]) > 0.15 and min(s[building], t[building]) > 0.08  # both still street scenes


def test_bad_settings_raise_user_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="too small"):
        S.generate(tmp_path, S.SyntheticConfig(width=16, height=8), progress=False)


def test_new_camera_is_the_target_city_through_another_camera():
    """The new-camera style (deployment's --adapt-bn benchmark): no bonnet in view, a wider lens and a higher
    mount than the target camera, and a warmer, darker rendering of the same materials; deterministic."""
    n = 16
    scenes = {
        d: [S.compose_scene(S.image_rng(2, "val", i, "newcamera"), 256, 128, d) for i in range(n)]
        for d in ("target", "newcamera")
    }
    assert all(s.cam_height >= 1.7 for s in scenes["newcamera"]) and all(s.cam_height <= 1.4 for s in scenes["target"])
    assert max(s.focal for s in scenes["newcamera"]) < min(s.focal for s in scenes["target"])
    void_bottom = [float((s.labels[-3:] == 255).mean()) for s in scenes["newcamera"]]
    assert max(void_bottom) < 0.5  # no bonnet (the target's covers the bottom rows)
    target = np.stack([S.render_target(s, S.image_rng(2, "val", i)) for i, s in enumerate(scenes["newcamera"])])
    new = np.stack([S.render_new_camera(s, S.image_rng(2, "val", i), 0.6) for i, s in enumerate(scenes["newcamera"])])
    t_mean, n_mean = target.reshape(-1, 3).mean(0), new.reshape(-1, 3).mean(0)
    assert n_mean.mean() < 0.9 * t_mean.mean()  # darker
    assert n_mean[0] / n_mean[2] > 1.2 * t_mean[0] / t_mean[2]  # warmer (red over blue)
    again = S.render_new_camera(scenes["newcamera"][0], S.image_rng(2, "val", 0), 0.6)
    assert np.array_equal(again, new[0])
