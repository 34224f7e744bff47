"""The Gradio demo end to end: a real exported model, a real server on a free port, the real gradio_client.

The model is a random-init DeepLab-v2 (ResNet-18) exported at 128x256 by ``dass_deploy.export``; a copy with another
``stage`` makes a source-only / adapted pair so the Compare tab exists too.
"""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")

ROOT = Path(__file__).resolve().parents[1]
STREET = ROOT / "app" / "examples" / "street_1024x512.png"
FRANKFURT = ROOT / "app" / "examples" / "frankfurt_000000_000294_leftImg8bit.png"
_EXPORTED: dict[str, Path] = {}


def make_models_root(root: Path) -> Path:
    """``root/{tiny_source,tiny_bida}``: one real export, copied with a different stage (both are valid models)."""
    if "root" in _EXPORTED:  # shared by test_app.py and test_app_browser.py within one pytest session
        return _EXPORTED["root"]
    import torch

    from dass_deploy.export import export_model
    from dass_train.checkpoint import checkpoint_meta_default, save_checkpoint
    from dass_train.network import deeplab_v2

    torch.manual_seed(0)
    model = deeplab_v2(num_classes=19, backbone="resnet18").eval()
    meta = checkpoint_meta_default(backbone="resnet18", stage="source_only", metrics={"miou": 0.301})
    ckpt = root / "tiny.pt"
    save_checkpoint(ckpt, {"format": "dass-checkpoint", "version": 1, "model": model.state_dict(), "meta": meta})
    models = root / "models"
    export_model(ckpt, out=models, name="tiny_source", height=128, width=256, parity_samples=1, progress=False)
    shutil.copytree(models / "tiny_source", models / "tiny_bida")
    # the exporter records the stage under export.checkpoint_stage; the copy overrides it with meta.json's own field
    for name, extra in (("tiny_source", {}), ("tiny_bida", {"stage": "adapt", "metrics": {"miou": 0.412}})):
        meta_path = models / name / "meta.json"
        info = json.loads(meta_path.read_text())
        info.update(name=name, benchmark="synth2real", **extra)
        meta_path.write_text(json.dumps(info, indent=2))
    _EXPORTED["root"] = models
    return models


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_demo(models_root: Path) -> Iterator[str]:
    """Serve ``build_demo`` with the real launch settings on a free port; yields the URL."""
    from app.app import build_demo, launch

    demo = build_demo(models_root)
    _, url = launch(demo, models_root, host="127.0.0.1", port=free_port(), block=False)
    try:
        yield url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_models_root(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def server(models_root: Path) -> Iterator[str]:
    with running_demo(models_root) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> gradio_client.Client:
    return gradio_client.Client(server, verbose=False)


def _segment(client, image: Path, resolution: str = "original", model: str = "tiny_bida"):
    return client.predict(
        gradio_client.handle_file(str(image)), model, "onnxruntime", 0.5, resolution, api_name="/segment"
    )


def test_overlay_matches_input_size_at_original_resolution(client) -> None:
    overlay, mask, legend, table, latency, files = _segment(client, STREET)
    with Image.open(STREET) as src:
        size = src.size
    assert Image.open(overlay).size == size
    assert Image.open(mask).size == size
    assert "ms" in latency and "onnxruntime" in latency
    names = sorted(Path(f).name for f in files)
    assert names == ["segmentation_color.png", "segmentation_trainIds.png"]
    train_ids = np.asarray(Image.open(next(f for f in files if f.endswith("trainIds.png"))))
    assert train_ids.shape == (size[1], size[0]) and train_ids.max() < 19


def test_model_size_resolution_returns_the_network_input(client) -> None:
    overlay, *_ = _segment(client, FRANKFURT, resolution="model size")
    assert Image.open(overlay).size == (256, 128)


def test_class_share_table_sums_to_100_percent(client) -> None:
    table = _segment(client, STREET)[3]
    assert table["headers"] == ["class", "share (%)", "pixels"]
    rows = table["data"]
    shares = [row[1] for row in rows]
    assert rows and abs(sum(shares) - 100.0) < 0.1
    assert shares == sorted(shares, reverse=True)
    assert sum(row[2] for row in rows) == 1024 * 512
    assert all(share > 0 for share in shares)


def test_bad_file_gives_a_clear_message(client, tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("this is a text file, not a picture\n")
    with pytest.raises(gradio_client.exceptions.AppError, match="'notes.png' is not an image"):
        _segment(client, bad)


def test_server_refuses_uploads_over_the_limit(server: str) -> None:
    import httpx

    big = httpx.post(f"{server}gradio_api/upload", files={"files": ("big.png", b"\0" * 27_000_000, "image/png")})
    assert big.status_code == 413 and "maximum allowed size" in big.text
    small = httpx.post(f"{server}gradio_api/upload", files={"files": ("small.png", b"\0" * 1000, "image/png")})
    assert small.status_code == 200


def test_only_examples_and_models_are_served(server: str, models_root: Path) -> None:
    import httpx

    assert httpx.get(f"{server}gradio_api/file={STREET}").status_code == 200
    assert httpx.get(f"{server}gradio_api/file={models_root / 'tiny_bida' / 'meta.json'}").status_code == 200
    assert httpx.get(f"{server}gradio_api/file={ROOT / 'pyproject.toml'}").status_code == 403
    assert httpx.get(f"{server}gradio_api/file=/etc/passwd").status_code == 403
    assert httpx.get(f"{server}gradio_api/file={models_root.parent / 'tiny.pt'}").status_code == 403  # next door


def test_compare_runs_source_and_adapted_models(client) -> None:
    src, ada, summary = client.predict(
        gradio_client.handle_file(str(FRANKFURT)),
        "synth2real: tiny_source vs tiny_bida",
        "onnxruntime",
        0.5,
        "original",
        api_name="/compare",
    )
    assert Image.open(src).size == Image.open(ada).size == (256, 128)
    # both are copies of one network, so adaptation "changes" nothing: a real check that both ran on the same input
    assert summary.startswith("0.0% of the pixels change class")


def test_video_goes_through_the_pipeline(client, tmp_path: Path) -> None:
    import cv2

    src = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (256, 128))
    frame = np.asarray(Image.open(FRANKFURT).convert("RGB"))[..., ::-1]
    for shift in range(6):
        writer.write(np.ascontiguousarray(np.roll(frame, 8 * shift, axis=1)))
    writer.release()
    video, latency, files = client.predict(
        gradio_client.handle_file(str(src)), "tiny_bida", "auto", 0.5, api_name="/segment_video"
    )
    assert "6 frames" in latency and "onnxruntime" in latency
    (download,) = files
    assert Path(download).name == "clip_segmented.mp4"
    cap = cv2.VideoCapture(download)
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    cap.release()
    assert (count, size) == (6, (256, 128))
    assert Path(video["video"] if isinstance(video, dict) else video).is_file()


def test_video_tab_rejects_a_non_video(client, tmp_path: Path) -> None:
    fake = tmp_path / "clip.mp4"
    fake.write_bytes(b"not a video at all" * 10)
    with pytest.raises(gradio_client.exceptions.AppError, match="'clip.mp4' could not be read as a video"):
        client.predict(gradio_client.handle_file(str(fake)), "tiny_bida", "auto", 0.5, api_name="/segment_video")


def test_models_are_listed_with_stage_and_miou(models_root: Path) -> None:
    from app.app import compare_pairs, discover_models

    models = discover_models(models_root)
    assert models["tiny_source"].label() == "tiny_source (source only, resnet18, mIoU 30.1)"
    assert "mIoU on the target validation set: **41.2**" in models["tiny_bida"].describe()
    (pair,) = compare_pairs(models)
    assert (pair.source.name, pair.adapted.name) == ("tiny_source", "tiny_bida")


def test_default_model_follows_the_repository_default(
    models_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.app import _default_model, discover_models

    monkeypatch.delenv("DASS_MODEL", raising=False)
    models = discover_models(models_root)
    assert _default_model(tmp_path, models) == "tiny_bida"  # no DEFAULT file: the first by name
    (tmp_path / "DEFAULT").write_text("tiny_source\n")
    assert _default_model(tmp_path, models) == "tiny_source"


def test_main_reports_an_empty_model_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from app.app import main

    assert main(["--models", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` with almost no pixel data: how a decompression bomb starts."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    return path


@pytest.mark.parametrize(
    "width, height, needle",
    [
        (30000, 30000, "image too large (900 megapixels, limit 17 megapixels)"),  # Pillow refuses to open it
        (5000, 5000, "image too large (25 megapixels, 5000x5000, limit 17 megapixels)"),  # over the demo's limit
    ],
)
def test_too_many_pixels_gives_the_demo_s_own_message(client, tmp_path: Path, width, height, needle) -> None:
    big = _png_header_only(tmp_path / "huge.png", width, height)
    with pytest.raises(gradio_client.exceptions.AppError) as info:
        _segment(client, big)
    assert f"'huge.png': {needle}" in str(info.value)


def test_image_just_under_the_limit_is_segmented(client, tmp_path: Path) -> None:
    from app.app import MAX_IMAGE_PIXELS

    side = int(MAX_IMAGE_PIXELS**0.5)
    path = tmp_path / "big_ok.png"
    Image.new("RGB", (side, side), (90, 90, 90)).save(path)
    overlay, *_ = _segment(client, path)
    assert Image.open(overlay).size == (side, side)


def test_video_is_cut_at_the_frame_limit(client, tmp_path: Path, monkeypatch) -> None:
    import cv2

    import app.app as demo_module

    monkeypatch.setattr(demo_module, "MAX_VIDEO_FRAMES", 4)  # the server runs in this process: same module
    src = tmp_path / "long.mp4"
    writer = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (256, 128))
    frame = np.asarray(Image.open(FRANKFURT).convert("RGB"))[..., ::-1]
    for shift in range(9):
        writer.write(np.ascontiguousarray(np.roll(frame, 8 * shift, axis=1)))
    writer.release()
    _, latency, (download,) = client.predict(
        gradio_client.handle_file(str(src)), "tiny_bida", "auto", 0.5, api_name="/segment_video"
    )
    assert "4 frames" in latency
    cap = cv2.VideoCapture(download)
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    cap.release()


def test_demo_lists_good_models_beside_a_broken_folder(models_root: Path, tmp_path: Path, capsys) -> None:
    from app.app import build_demo, discover_models

    root = tmp_path / "models"
    shutil.copytree(models_root / "tiny_bida", root / "tiny_bida")
    (root / "broken").mkdir()
    (root / "broken" / "meta.json").write_text('{"num_classes": 19}')
    assert list(discover_models(root)) == ["tiny_bida"]
    build_demo(root).close()
    err = capsys.readouterr().err
    assert "warning: skipped model folder broken" in err and "field 'class_names' is missing" in err
