"""Runtime backends, Segmenter, visualisation and the benchmark, on a real exported (random-init ResNet-18) model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import EXPORT_SIZE, SAMPLES, subprocess_env

from dass_deploy.errors import DeployError
from dass_deploy.machine import describe_machine, machine_key

SAMPLE_IMAGES = [SAMPLES / "frankfurt_000000_000294_leftImg8bit.png", SAMPLES / "street_1024x512.png"]


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def test_import_without_torch(model_dir):
    """The ONNX path (backends, Segmenter, CLI, visualisation) never imports torch."""
    code = (
        "import sys, numpy as np\n"
        "from dass_deploy.segmenter import Segmenter\n"
        "import dass_deploy.backends, dass_deploy.cli, dass_deploy.visualize, dass_deploy.pipeline\n"
        "from dass_deploy.sources import read_image\n"
        f"seg = Segmenter({str(model_dir)!r}, backend='onnxruntime')\n"
        f"labels = seg.predict(read_image({str(SAMPLE_IMAGES[0])!r}))\n"
        "assert labels.shape == (128, 256) and labels.dtype == np.uint8, labels.shape\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok', seg.backend_name)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "ok onnxruntime" in proc.stdout


def test_backends_agree_on_samples(model_dir):
    """ONNX Runtime and torch eager (the model dir's source checkpoint) give the same labels on real images."""
    from dass_deploy.segmenter import Segmenter

    ort_seg = Segmenter(model_dir, backend="onnxruntime")
    torch_seg = Segmenter(model_dir, backend="torch")
    assert (ort_seg.backend_name, torch_seg.backend_name) == ("onnxruntime", "torch")
    assert torch_seg.size == ort_seg.size == EXPORT_SIZE
    for path in SAMPLE_IMAGES:
        rgb = read_rgb(path)
        a, b = ort_seg.predict(rgb), torch_seg.predict(rgb)
        assert a.shape == b.shape == rgb.shape[:2]
        assert (a == b).mean() >= 0.995, f"{path.name}: agreement {(a == b).mean():.4f}"
        assert len(np.unique(a)) > 1  # a random net still predicts several classes: the test can see differences


def test_predict_batch_mixed_sizes(model_dir):
    """Batching does not change results; each label map comes back at its own image's size."""
    from dass_deploy.segmenter import Segmenter

    seg = Segmenter(model_dir)
    images = [read_rgb(p) for p in SAMPLE_IMAGES] + [read_rgb(SAMPLE_IMAGES[1])[:300, :500]]
    batched = seg.predict_batch(images)
    for img, labels in zip(images, batched, strict=True):
        assert labels.shape == img.shape[:2] and labels.dtype == np.uint8
        np.testing.assert_array_equal(labels, seg.predict(img))
    raw = seg.backend.predict(np.zeros((2, 3, *EXPORT_SIZE), np.float32))
    assert raw.shape == (2, *EXPORT_SIZE) and raw.dtype == np.uint8


def test_backend_errors(model_dir, checkpoint, tmp_path):
    from dass_deploy.backends import create_backend
    from dass_deploy.segmenter import Segmenter

    with pytest.raises(DeployError, match="not found"):
        create_backend(tmp_path / "nope")
    with pytest.raises(DeployError, match="only --backend torch"):
        create_backend(checkpoint, backend="onnxruntime")
    with pytest.raises(DeployError, match="tensorrt|TensorRT|GPU|cuda"):
        create_backend(model_dir, backend="tensorrt", device="cuda")
    with pytest.raises(DeployError, match="CUDAExecutionProvider|cuda"):
        create_backend(model_dir, backend="onnxruntime", device="cuda")
    with pytest.raises(DeployError, match="fixed input of 128x256"):
        Segmenter(model_dir, size="256x512")
    with pytest.raises(DeployError, match="--size"):
        Segmenter(model_dir, size="12x3")


def test_torch_backend_from_checkpoint_runs_native_size(checkpoint):
    from dass_deploy.segmenter import Segmenter

    seg = Segmenter(checkpoint)
    assert seg.backend_name == "torch" and seg.size is None and len(seg.class_names) == 19
    rgb = read_rgb(SAMPLE_IMAGES[0])
    assert seg.predict(rgb).shape == rgb.shape[:2]


def test_visualize():
    from dass_deploy.visualize import class_shares, color_mask, legend, overlay, paste_legend
    from dass_train.labels import CLASS_NAMES, PALETTE

    labels = np.array([[0, 13], [255, 13]], np.uint8)
    rgb = np.full((2, 2, 3), 200, np.uint8)
    colors = color_mask(labels, PALETTE)
    assert colors[0, 0].tolist() == [128, 64, 128] and colors[0, 1].tolist() == [0, 0, 142]
    assert colors[1, 0].tolist() == [0, 0, 0]
    np.testing.assert_array_equal(overlay(rgb, labels, PALETTE, alpha=0.0), rgb)
    full = overlay(rgb, labels, PALETTE, alpha=1.0)
    assert full[0, 1].tolist() == [0, 0, 142] and full[1, 0].tolist() == [200, 200, 200]  # ignore keeps the image
    np.testing.assert_allclose(class_shares(labels, 19)[[0, 13]], [1 / 3, 2 / 3])
    assert class_shares(labels, 19).sum() == pytest.approx(1.0)
    two = legend(CLASS_NAMES, PALETTE, present=[0, 13], row_height=20)
    everything = legend(CLASS_NAMES, PALETTE)
    assert two.shape[0] == 40 and everything.shape[0] == 19 * 20 and two.dtype == np.uint8
    assert tuple(two[10, 10]) == (128, 64, 128) and tuple(two[30, 10]) == (0, 0, 142)
    mask = class_shares(labels, 19) > 0
    np.testing.assert_array_equal(legend(CLASS_NAMES, PALETTE, present=mask), two)
    frame = np.zeros((64, 128, 3), np.uint8)
    pasted = paste_legend(frame, everything)
    assert pasted.shape == frame.shape and pasted.any()


def test_time_in_blocks_order_and_untimed_first_call():
    """Blocks alternate between callables, each timed exactly ``repeats`` times; the first call of every block is
    untimed, so a callable slowed right after another one ran (spinning runtime threads) is not charged for it."""
    from dass_deploy.benchmark import time_in_blocks

    calls: list[str] = []
    last = [""]

    def make(name: str):
        def run() -> None:
            if last[0] != name:  # the first call after a switch is slow, like a runtime still spinning
                time.sleep(0.03)
            last[0] = name
            calls.append(name)

        return run

    rounds: list[tuple[int, int]] = []
    times = time_in_blocks([make("a"), make("b")], repeats=7, block=4, on_round=lambda d, t: rounds.append((d, t)))
    assert [len(t) for t in times] == [7, 7]
    assert rounds == [(1, 3), (2, 3), (3, 3)]
    # 3 rounds: blocks of 1 untimed + 3, 1 + 3, 1 + 1 timed calls, a's block before b's in every round
    assert calls == ["a"] * 4 + ["b"] * 4 + ["a"] * 4 + ["b"] * 4 + ["a"] * 2 + ["b"] * 2
    assert max(max(t) for t in times) < 25.0  # the 30 ms switch cost never lands in a timing
    with pytest.raises(ValueError, match="repeats"):
        time_in_blocks([make("a")], repeats=0)
    with pytest.raises(ValueError, match="block"):
        time_in_blocks([make("a")], repeats=3, block=1)


def test_benchmark_interleaved_records_blocks(model_dir):
    """``interleave``: every runtime built first, then timed in blocks; the rows say so."""
    from dass_deploy.benchmark import BLOCK, run_benchmark

    rows = run_benchmark(model=model_dir, repeats=4, warmup=1, progress=False, threads=1, interleave=True)
    timed = [r for r in rows if "p50_ms" in r]
    assert {r["backend"] for r in timed} >= {"onnxruntime", "torch"}
    for r in timed:
        assert r["interleaved"] and r["block"] == BLOCK and r["repeats"] == 4 and r["build_s"] > 0


def test_benchmark_table(model_dir, tmp_path):
    """Both CPU backends timed in one run, with the pipeline measured too; markdown + JSON written."""
    from dass_deploy.benchmark import run_benchmark, save_results

    rows = run_benchmark(
        model=model_dir,
        sizes=[EXPORT_SIZE, (64, 128)],
        repeats=3,
        warmup=1,
        pipeline_frames=6,
        progress=False,
        threads=2,
    )
    timed = {(r["backend"], r["precision"]): r for r in rows if "p50_ms" in r}
    backends = {b for b, _ in timed}
    assert {"onnxruntime", "torch"} <= backends
    if importlib.util.find_spec("openvino") is not None:
        assert ("openvino", "fp32") in timed
    skipped = [r for r in rows if "skipped" in r]
    assert {r["backend"] for r in skipped} <= {"onnxruntime", "openvino"} and skipped  # fixed 128x256 graphs
    assert all(r["size"] == "64x128" for r in skipped)  # torch runs any size
    for r in timed.values():
        assert 0 < r["p50_ms"] <= r["p95_ms"] and r["img_per_s"] > 0 and r["peak_mem_mb"] >= 0
        assert r["pipeline_fps"] > 0 and r["pipeline_ratio"] > 0
    md = save_results(rows, "test", "dass-segment --benchmark", tmp_path)
    text = md.read_text()
    assert "| onnxruntime | fp32 | cpu | 128x256 |" in text and "ONNX Runtime vs torch eager (fp32, 128x256)" in text
    payload = json.loads(md.with_suffix(".json").read_text())
    assert payload["command"] == "dass-segment --benchmark" and "128x256" in payload["speedups_onnxruntime_vs_torch"]
    machine = describe_machine()
    assert payload["machines"][machine["key"]]["cpu_model"] == machine["cpu_model"]
    assert {r["machine"] for r in payload["rows"]} == {machine["key"]}
    assert "avx2" in machine["isa"] and "Machine: " in text


def test_results_keep_each_machines_rows(tmp_path):
    """Rows measured on another machine survive a new measurement here; this machine's rows are replaced."""
    from dass_deploy.benchmark import results_markdown, write_json

    here = describe_machine()
    other = {**here, "cpu_model": "AMD Ryzen 5 5600X", "isa": {"avx2": True, "fma": True}, "isa_cap": None}
    other["key"] = machine_key(other)
    assert other["key"] == "AMD Ryzen 5 5600X | avx2+fma" != here["key"]
    path = tmp_path / "runtime.json"
    row = {"backend": "onnxruntime", "precision": "fp32", "device": "cpu", "size": "64x128", "p50_ms": 5.0,
           "p95_ms": 6.0, "img_per_s": 190.0, "peak_mem_mb": 10.0}  # fmt: skip
    write_json([{**row, "p50_ms": 9.0}], path, "cmd other", machine=other)
    write_json([row], path, "cmd here 1")
    payload = write_json([{**row, "p50_ms": 4.0}], path, "cmd here 2")
    by_machine = {r["machine"]: r for r in payload["rows"]}
    assert len(payload["rows"]) == 2 and set(payload["machines"]) == {here["key"], other["key"]}
    assert by_machine[other["key"]]["p50_ms"] == 9.0 and by_machine[other["key"]]["command"] == "cmd other"
    assert by_machine[here["key"]]["p50_ms"] == 4.0 and by_machine[here["key"]]["command"] == "cmd here 2"
    assert json.loads(path.read_text()) == payload
    md = results_markdown(payload, "runtime")
    assert f"## {here['key']}" in md and "## AMD Ryzen 5 5600X | avx2+fma" in md


def test_results_file_errors(tmp_path):
    from dass_deploy.benchmark import write_json

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DeployError, match="bad.json: existing results file is not valid JSON"):
        write_json([], bad, "cmd")
    assert bad.read_text() == "{not json"  # nothing already written is lost
