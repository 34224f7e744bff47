"""Dataset loaders, transforms, class statistics and samplers on small real files written to tmp_path."""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import SAMPLES  # noqa: E402
from PIL import Image
from torch.utils.data import DataLoader

from dass_train.data.datasets import CityscapesDataset, GTA5Dataset, ImageFolderDataset, SynthiaDataset
from dass_train.data.sampling import CACHE_NAME, InfiniteSampler, RareClassSampler, class_stats
from dass_train.data.transforms import (
    CAFFE_BGR,
    IMAGENET_RGB,
    EvalTransform,
    TrainTransform,
    TransformConfig,
    normalize,
)
from dass_train.errors import DataError
from dass_train.labels import LABELS, label_ids_to_train_ids, synthia_ids_to_train_ids

FRAME = "frankfurt_000000_000294"

# Cityscapes colour of every labelId: GTA5 ships its labels as palette PNGs with exactly this palette.
_CS_PALETTE = np.zeros((256, 3), dtype=np.uint8)
for _lab in LABELS:
    _CS_PALETTE[_lab.id] = _lab.color


# --- writers --------------------------------------------------------------------------------------------------
def write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb, mode="RGB").save(path)


def write_palette_label(path: Path, label_ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(label_ids.astype(np.uint8), mode="L")
    im.putpalette(_CS_PALETTE.ravel().tolist())  # -> mode "P", indices = labelIds
    im.save(path)


def write_png16_rgb(path: Path, rgb16: np.ndarray) -> None:
    """A 16-bit RGB PNG written byte by byte, so the channel order does not depend on OpenCV's conventions."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def random_label_ids(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Blocky labelIds (8x8 cells) over all 34 ids, ignored ones included."""
    cells = rng.integers(0, 34, size=(h // 8 + 1, w // 8 + 1))
    return np.kron(cells, np.ones((8, 8), dtype=np.int64))[:h, :w].astype(np.uint8)


def make_gta5(root: Path, n: int = 3, size: tuple[int, int] = (40, 24), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    w, h = size
    ids = []
    for i in range(n):
        write_rgb(root / "images" / f"{i:05d}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        lab = random_label_ids(rng, h, w)
        write_palette_label(root / "labels" / f"{i:05d}.png", lab)
        ids.append(lab)
    return ids


def make_cityscapes(root: Path, split: str, frames: dict[str, np.ndarray], size=(32, 16), seed: int = 0) -> None:
    """``frames``: ``{"<city>_<seq>_<frame>": labelIds [H,W]}``."""
    rng = np.random.default_rng(seed)
    for stem, label_ids in frames.items():
        city = stem.split("_")[0]
        h, w = label_ids.shape
        write_rgb(
            root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rng.integers(0, 256, (h, w, 3), np.uint8)
        )
        lab = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
        lab.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(label_ids, mode="L").save(lab)


# --- GTA5 ------------------------------------------------------------------------------------------------------
def test_gta5_palette_labels_are_read_as_indices(tmp_path):
    ids = make_gta5(tmp_path, n=2)
    ds = GTA5Dataset(tmp_path)
    assert len(ds) == 2 and ds.names == ["00000.png", "00001.png"]
    for i in range(2):
        item = ds[i]
        assert item["label"].dtype == torch.int64 and item["label"].shape == (24, 40)
        np.testing.assert_array_equal(item["label"].numpy(), label_ids_to_train_ids(ids[i]))
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 24, 40)
        assert item["index"] == i and item["name"] == f"0000{i}.png"
    # The classic bug: OpenCV decodes the palette to colours, so "ids" read that way are not the labelIds.
    path = tmp_path / "labels" / "00000.png"
    assert cv2.imread(str(path)).ndim == 3
    wrong = label_ids_to_train_ids(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))
    assert (wrong != label_ids_to_train_ids(ids[0])).mean() > 0.5


def test_gta5_rgb_label_refused(tmp_path):
    make_gta5(tmp_path, n=1)
    path = tmp_path / "labels" / "00000.png"
    Image.open(path).convert("RGB").save(path)
    ds = GTA5Dataset(tmp_path)
    with pytest.raises(DataError, match="00000.png.*RGB"):
        ds[0]


def test_gta5_list_file_and_missing_entries(tmp_path):
    make_gta5(tmp_path, n=3)
    (tmp_path / "train.txt").write_text("00002.png\n00000.png\n")
    ds = GTA5Dataset(tmp_path, list_file=tmp_path / "train.txt")
    assert ds.names == ["00002.png", "00000.png"]
    (tmp_path / "bad.txt").write_text("00007.png\n")
    with pytest.raises(DataError, match="00007.png"):
        GTA5Dataset(tmp_path, list_file=tmp_path / "bad.txt")


def test_missing_folders_name_the_expected_layout(tmp_path):
    with pytest.raises(DataError, match=f"GTA5 not found: expected {tmp_path}/images/\\*.png"):
        GTA5Dataset(tmp_path)
    with pytest.raises(DataError, match=f"SYNTHIA not found: expected {tmp_path}/RGB"):
        SynthiaDataset(tmp_path)
    with pytest.raises(DataError, match=f"{tmp_path}/leftImg8bit/val/<city>"):
        CityscapesDataset(tmp_path, "val")
    with pytest.raises(DataError, match="no images"):
        ImageFolderDataset(tmp_path)


def test_image_without_label(tmp_path):
    make_gta5(tmp_path, n=3)
    (tmp_path / "labels" / "00001.png").unlink()
    with pytest.raises(DataError, match="1 image\\(s\\) without a label.*images/00001.png"):
        GTA5Dataset(tmp_path)


def test_size_mismatch_found_up_front(tmp_path):
    make_gta5(tmp_path, n=3)
    write_palette_label(tmp_path / "labels" / "00002.png", np.zeros((20, 40), np.uint8))
    ds = GTA5Dataset(tmp_path)
    assert len(ds.problems()) == 1
    with pytest.raises(DataError, match="images/00002.png is 40x24 but .*labels/00002.png is 40x20"):
        ds.verify()
    with pytest.raises(DataError, match="size mismatch"):
        ds[2]
    ds[0]  # the healthy files still load


def test_truncated_files_raise_data_error_naming_them(tmp_path):
    make_gta5(tmp_path, n=2)
    truncate(tmp_path / "images" / "00000.png")
    truncate(tmp_path / "labels" / "00001.png")
    ds = GTA5Dataset(tmp_path)
    with pytest.raises(DataError, match="images/00000.png"):
        ds[0]
    with pytest.raises(DataError, match="labels/00001.png"):
        ds[1]


# --- SYNTHIA ---------------------------------------------------------------------------------------------------
def test_synthia_class_id_is_first_channel(tmp_path):
    h, w = 6, 8
    cls = np.array([3, 2, 10, 8, 21, 1, 0, 15], dtype=np.uint16)[None].repeat(h, 0)  # SYNTHIA ids
    inst = (1000 + np.arange(h * w, dtype=np.uint16)).reshape(h, w)  # G: instance ids
    third = np.full((h, w), 7, dtype=np.uint16)  # B: 7 would be "pole" if misread
    write_png16_rgb(tmp_path / "GT" / "LABELS" / "0000000.png", np.stack([cls, inst, third], axis=-1))
    write_rgb(tmp_path / "RGB" / "0000000.png", np.zeros((h, w, 3), np.uint8))
    ds = SynthiaDataset(tmp_path)
    label = ds[0]["label"].numpy()
    np.testing.assert_array_equal(label, synthia_ids_to_train_ids(cls))
    assert label[0].tolist() == [0, 2, 11, 13, 3, 10, 255, 6]
    # OpenCV returns the channels as B, G, R: its "first" channel is the wrong one.
    raw = cv2.imread(str(tmp_path / "GT" / "LABELS" / "0000000.png"), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and (raw[..., 0] == 7).all() and (raw[..., 2] == cls).all()


# --- Cityscapes --------------------------------------------------------------------------------------------------
def test_cityscapes_layout_sorted_and_mapped(tmp_path):
    rng = np.random.default_rng(1)
    frames = {
        s: random_label_ids(rng, 16, 32)
        for s in ["zurich_000001_000019", "aachen_000000_000019", "aachen_000000_000001"]
    }
    make_cityscapes(tmp_path, "val", frames)
    ds = CityscapesDataset(tmp_path, "val")
    assert ds.names == [
        "aachen/aachen_000000_000001_leftImg8bit.png",
        "aachen/aachen_000000_000019_leftImg8bit.png",
        "zurich/zurich_000001_000019_leftImg8bit.png",
    ]
    for i, name in enumerate(ds.names):
        stem = name.split("/")[1][: -len("_leftImg8bit.png")]
        np.testing.assert_array_equal(ds[i]["label"].numpy(), label_ids_to_train_ids(frames[stem]))
    unlabelled = CityscapesDataset(tmp_path, "val", with_labels=False)
    assert "label" not in unlabelled[0] and not unlabelled.has_labels
    (tmp_path / "gtFine" / "val" / "zurich" / "zurich_000001_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError, match="zurich_000001_000019_leftImg8bit.png"):
        CityscapesDataset(tmp_path, "val")


def test_real_cityscapes_sample_label_ids_match_train_ids(tmp_path):
    from cityscapesscripts.helpers.labels import id2label

    shutil.copy(
        SAMPLES / f"{FRAME}_leftImg8bit.png", _dst(tmp_path / "leftImg8bit/val/frankfurt", f"{FRAME}_leftImg8bit.png")
    )
    shutil.copy(
        SAMPLES / f"{FRAME}_gtFine_labelIds.png",
        _dst(tmp_path / "gtFine/val/frankfurt", f"{FRAME}_gtFine_labelIds.png"),
    )
    ds = CityscapesDataset(tmp_path, "val", keep_raw=True)
    ds.verify()
    item = ds[0]
    label = item["label"].numpy()
    np.testing.assert_array_equal(item["raw"], np.array(Image.open(SAMPLES / f"{FRAME}_leftImg8bit.png")))

    # Exactly the official table: map the same labelIds with cityscapesscripts' own id2label.
    ids = np.array(Image.open(SAMPLES / f"{FRAME}_gtFine_labelIds.png"))
    official = np.vectorize(lambda i: id2label[int(i)].trainId % 256)(ids)  # trainId -1 / 255 -> 255
    np.testing.assert_array_equal(label, official)
    assert len(np.unique(label)) > 5  # a real, varied label

    # The shipped labelTrainIds file was downscaled separately from the labelIds file, so they disagree on a
    # few boundary pixels (77 of 32768); everywhere else they agree, and each disagreement has the expected
    # class within 2 pixels.
    expected = np.array(Image.open(SAMPLES / f"{FRAME}_gtFine_labelTrainIds.png"))
    assert (label == expected).mean() > 0.995
    r = 2
    padded = np.pad(label, r, constant_values=254)
    near = np.zeros(label.shape, dtype=bool)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            near |= padded[dy : dy + label.shape[0], dx : dx + label.shape[1]] == expected
    assert near.all()


def _dst(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def test_image_folder_dataset(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    write_rgb(tmp_path / "b.png", rgb)
    write_rgb(tmp_path / "a.png", rgb[::-1])
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, keep_raw=True)
    assert ds.names == ["a.png", "b.png"] and "label" not in ds[0]
    np.testing.assert_array_equal(ds[1]["raw"], rgb)
    listed = ImageFolderDataset([tmp_path / "b.png"])
    assert listed.names == ["b.png"]
    with pytest.raises(DataError, match="missing.png"):
        ImageFolderDataset([tmp_path / "missing.png"])


# --- transforms ----------------------------------------------------------------------------------------------------
def _pair(h: int = 80, w: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (h, w), dtype=np.uint8)
    return image, label


def test_train_transform_shapes_and_label_values():
    image, label = _pair()
    t = TrainTransform(TransformConfig(resize_short=64, scale=(0.8, 1.2), crop=(48, 40)))
    out = t(image, label, np.random.default_rng(0))
    assert out["image"].shape == (3, 40, 48) and out["image"].dtype == torch.float32
    assert out["label"].shape == (40, 48) and out["label"].dtype == torch.int64
    assert out["raw"].shape == (40, 48, 3) and out["raw"].dtype == np.uint8
    assert set(out["label"].unique().tolist()) <= set(np.unique(label).tolist())  # nearest: no invented ids


def test_train_transform_crop_and_flip_keep_image_and_label_aligned():
    image, _ = _pair(30, 50)
    label = image[..., 0].copy()  # label = red channel: any misalignment shows up
    t = TrainTransform(TransformConfig(resize_short=None, scale=None, crop=(40, 40), flip=True))
    windows = [image[:, x : x + 40] for x in range(11)]
    flipped = []
    for seed in range(12):
        out = t(image, label, np.random.default_rng(seed))
        raw, lab = out["raw"], out["label"].numpy()
        assert raw.shape == (40, 40, 3)
        np.testing.assert_array_equal(lab[:30], raw[:30, :, 0])
        assert (lab[30:] == 255).all() and (raw[30:] == 0).all()  # padded: ignore label, zero image
        plain = any(np.array_equal(raw[:30], win) for win in windows)
        mirrored = any(np.array_equal(raw[:30], win[:, ::-1]) for win in windows)
        assert plain or mirrored  # a crop of the image, possibly mirrored, nothing else
        flipped.append(mirrored)
    assert any(flipped) and not all(flipped)


def test_train_transform_is_deterministic_in_its_generator():
    image, label = _pair()
    t = TrainTransform(TransformConfig(resize_short=64, crop=(48, 40)))
    a = t(image, label, np.random.default_rng(123))
    b = t(image, label, np.random.default_rng(123))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    others = [t(image, label, np.random.default_rng(s))["raw"] for s in range(5)]
    assert any(not np.array_equal(o, a["raw"]) for o in others)
    with pytest.raises(ValueError):
        t(image, label, None)


def test_eval_transform_keeps_full_resolution_label():
    image, label = _pair(64, 128)
    out = EvalTransform(TransformConfig(eval_size=(32, 16)))(image, label)
    assert out["image"].shape == (3, 16, 32)
    np.testing.assert_array_equal(out["label"].numpy(), label)


def test_normalize_colour_order_mean_std():
    rgb = np.array([[[10, 20, 30]]], dtype=np.uint8)
    caffe = normalize(rgb, CAFFE_BGR)[:, 0, 0]
    np.testing.assert_allclose(caffe.numpy(), [30 - 104.008, 20 - 116.669, 10 - 122.679], rtol=1e-6)
    imnet = normalize(rgb, IMAGENET_RGB)[:, 0, 0]
    np.testing.assert_allclose(
        imnet.numpy(), [(10 - 123.675) / 58.395, (20 - 116.28) / 57.12, (30 - 103.53) / 57.375], rtol=1e-6
    )


def test_dataset_augmentation_reproducible_from_seed_draw_index(tmp_path):
    make_gta5(tmp_path, n=2, size=(64, 48))
    t = TrainTransform(TransformConfig(resize_short=40, crop=(24, 24)))
    a, b = GTA5Dataset(tmp_path, t, seed=5), GTA5Dataset(tmp_path, t, seed=5)
    assert torch.equal(a[(1, 7)]["image"], b[(1, 7)]["image"])
    a.set_epoch(7)
    assert torch.equal(a[1]["label"], b[(1, 7)]["label"])
    draws = {a[(1, d)]["image"].numpy().tobytes() for d in range(6)}
    assert len(draws) > 1


# --- class statistics ------------------------------------------------------------------------------------------
def _expected_counts(ids: list[np.ndarray]) -> np.ndarray:
    return np.stack([np.bincount(label_ids_to_train_ids(x).ravel(), minlength=256)[:19] for x in ids])


def test_class_stats_cached_and_stale_detection(tmp_path):
    ids = make_gta5(tmp_path / "gta", n=3)
    ds = GTA5Dataset(tmp_path / "gta")
    counts = class_stats(ds, progress=False, cache_dir=tmp_path / "user_cache")
    assert counts.dtype == np.int64 and counts.shape == (3, 19)
    np.testing.assert_array_equal(counts, _expected_counts(ids))
    cache = tmp_path / "gta" / CACHE_NAME
    assert cache.is_file()

    # A cache with a matching signature is trusted: plant a marker and see it come back.
    with np.load(cache) as data:
        planted = {k: data[k] for k in data.files}
    planted["counts"] = np.full_like(planted["counts"], 7)
    np.savez(cache, **planted)
    np.testing.assert_array_equal(class_stats(ds, progress=False), np.full((3, 19), 7))

    # Rewriting a label makes it stale: recomputed from the files.
    new = np.full((24, 40), 26, dtype=np.uint8)  # all car
    write_palette_label(tmp_path / "gta" / "labels" / "00001.png", new)
    os.utime(tmp_path / "gta" / "labels" / "00001.png", ns=(1, 1))
    fresh = class_stats(GTA5Dataset(tmp_path / "gta"), progress=False)
    np.testing.assert_array_equal(fresh, _expected_counts([ids[0], new, ids[2]]))


def test_class_stats_fall_back_to_user_cache_when_data_folder_not_writable(tmp_path):
    make_gta5(tmp_path / "gta", n=2)
    # Tests run as root here, so chmod cannot make a folder read-only; a directory in the cache file's
    # place makes the write fail with the same OSError a read-only mount gives.
    (tmp_path / "gta" / CACHE_NAME).mkdir()
    ds = GTA5Dataset(tmp_path / "gta")
    counts = class_stats(ds, progress=False, cache_dir=tmp_path / "user_cache")
    files = list((tmp_path / "user_cache").glob("class_stats-*.npz"))
    assert len(files) == 1
    with np.load(files[0]) as data:
        np.testing.assert_array_equal(data["counts"], counts)
    np.testing.assert_array_equal(class_stats(ds, progress=False, cache_dir=tmp_path / "user_cache"), counts)


# --- samplers ------------------------------------------------------------------------------------------------------
def _rare_stats() -> tuple[np.ndarray, np.ndarray]:
    """100 images of road; images 90..99 also hold a little bicycle (trainId 18)."""
    stats = np.zeros((100, 19), dtype=np.int64)
    stats[:, 0] = 10_000
    stats[90:, 18] = 50
    return stats, np.arange(90, 100)


def test_rare_class_sampler_prefers_rare_classes_at_low_temperature():
    stats, rare = _rare_stats()

    def rare_share(temperature):
        return np.isin(RareClassSampler(stats, temperature, num_samples=4000, seed=0).take(4000), rare).mean()

    low, high, uniform = rare_share(0.01), rare_share(1.0), rare_share(None)
    assert low > 0.45  # ~ 1/2 (bicycle drawn) + 1/2 * 1/10 (road drawn, then a bicycle image)
    assert 0.05 < uniform < 0.15
    assert low > high > uniform
    s = RareClassSampler(stats, 0.01)
    assert s.class_probs[1:18].sum() == 0  # classes no image has are never drawn


def test_uniform_sampler_visits_every_image_once_per_block():
    stats, _ = _rare_stats()
    s = RareClassSampler(stats, temperature=None, seed=3)
    assert sorted(s.take(100).tolist()) == list(range(100))


def test_samplers_deterministic_and_resume_exactly():
    stats, _ = _rare_stats()
    for make in (
        lambda seed: RareClassSampler(stats, 0.05, num_samples=30, seed=seed, with_draw=True),
        lambda seed: InfiniteSampler(17, seed=seed, with_draw=True),
    ):
        a, b = make(4), make(4)
        assert a.take(100).tolist() == b.take(100).tolist()
        assert a.take(100).tolist() != make(5).take(100).tolist()
        it = iter(a)
        first = [next(it) for _ in range(37)]
        state = a.state_dict()
        expected = [next(it) for _ in range(50)]
        resumed = make(999)
        resumed.load_state_dict(state)
        assert [x for _, x in zip(range(50), iter(resumed), strict=False)] == expected
        assert [i for i, _ in first] == b.take(37).tolist()
        assert [g for _, g in first] == list(range(37))  # draw ids: global stream positions


def test_samplers_split_across_ranks():
    stats, _ = _rare_stats()
    for make in (
        lambda r, w: RareClassSampler(stats, 0.05, num_samples=40, seed=1, rank=r, world_size=w),
        lambda r, w: InfiniteSampler(10, seed=1, rank=r, world_size=w),
    ):
        single = make(0, 1).take(60)
        ranks = [make(r, 3).take(20) for r in range(3)]
        np.testing.assert_array_equal(np.stack(ranks, axis=1).ravel(), single)
    # Each pass of the target sampler covers every image exactly once across the ranks.
    per_rank = [InfiniteSampler(10, seed=2, rank=r, world_size=2).take(5) for r in range(2)]
    assert sorted(np.concatenate(per_rank).tolist()) == list(range(10))
    # Resuming on a different number of GPUs continues the same shared stream.
    s = InfiniteSampler(10, seed=2, rank=0, world_size=2)
    state = s.state_dict(consumed=6)  # 12 global samples consumed
    t = InfiniteSampler(10, seed=0, rank=0, world_size=1)
    t.load_state_dict(state)
    np.testing.assert_array_equal(t.take(8), InfiniteSampler(10, seed=2).take(20)[12:])


def test_sampler_drives_a_dataloader(tmp_path):
    make_gta5(tmp_path, n=3, size=(40, 32))
    ds = GTA5Dataset(tmp_path, TrainTransform(TransformConfig(resize_short=None, scale=None, crop=(16, 16))))
    loader = DataLoader(ds, batch_size=2, sampler=InfiniteSampler(len(ds), seed=0, with_draw=True))
    batches = [b for _, b in zip(range(3), loader, strict=False)]
    assert batches[0]["image"].shape == (2, 3, 16, 16) and batches[0]["label"].shape == (2, 16, 16)
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()[:3]) == [0, 1, 2]
