"""Latency / throughput / memory of every available backend x precision x size, through the one inference path.

Timings are of ``backend.predict`` on a ``[1,3,H,W]`` batch after warm-up (model only); with ``pipeline_frames`` the
threaded video pipeline is also timed on a synthetic clip of that size (end to end: decode, resize, infer, overlay,
encode) and reported as a fraction of the model-only throughput. Peak memory is the RSS high-water mark over the
build and the runs (reset through ``/proc/self/clear_refs``; Linux), or CUDA max allocated for torch on a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from dass_deploy.backends import create_backend, source_checkpoint
from dass_deploy.errors import DeployError
from dass_deploy.segmenter import parse_size

RESULTS_DIR = Path("benchmarks/results")


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> None:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0); harmless where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _plan(model: str | Path | None, checkpoint: str | Path | None, device: str) -> list[tuple[str, str, str | Path]]:
    """``(backend, precision, path)`` for everything that can run here."""
    if checkpoint is not None:
        precisions = ["fp32", "fp16", "bf16"] if device == "cuda" else ["fp32"]
        return [("torch", p, checkpoint) for p in precisions]
    from dass_deploy.repository import default_model_dir, load_model_dir

    model = Path(model) if model is not None else default_model_dir()
    info = load_model_dir(model)
    exported = info.meta.get("precision", "fp32")
    plan: list[tuple[str, str, str | Path]] = []
    if info.onnx_path is not None:
        plan.append(("onnxruntime", exported, model))
    if device == "cuda" and info.plan_path is not None and importlib.util.find_spec("tensorrt") is not None:
        plan.append(("tensorrt", exported, model))
    if importlib.util.find_spec("torch") is not None:
        try:
            source_checkpoint(model, info.meta)
            precisions = ["fp32", "fp16", "bf16"] if device == "cuda" else ["fp32"]
            plan += [("torch", p, model) for p in precisions]
        except DeployError:
            pass  # no source checkpoint next to the export: torch is simply not compared
    return plan


def _synthetic_clip(path: Path, height: int, width: int, frames: int) -> None:
    """A moving gradient clip: cheap to decode, not constant (so encoders do real work)."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (width, height))
    yy, xx = np.mgrid[0:height, 0:width]
    for t in range(frames):
        frame = np.stack([(xx + 7 * t) % 256, (yy + 3 * t) % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
        writer.write(frame)
    writer.release()


def _pipeline_fps(backend: Any, size: tuple[int, int], frames: int, tmp: Path) -> float:
    from dass_deploy.pipeline import run_video
    from dass_deploy.segmenter import Segmenter
    from dass_deploy.sinks import Renderer, VideoSink
    from dass_deploy.sources import VideoItem, open_video

    clip = tmp / f"clip_{size[0]}x{size[1]}.mp4"
    if not clip.exists():
        _synthetic_clip(clip, size[0], size[1], frames)
    seg = Segmenter(backend, size=size)
    capture, info = open_video(VideoItem(str(clip), clip.stem, "video"))
    sink = VideoSink(tmp / f"out_{backend.name}.mp4", info.fps, info.width, info.height)
    stats = run_video(seg, capture, sink, Renderer(seg.class_names, seg.palette), total=info.frames, progress=False)
    return stats.fps


def run_benchmark(
    model: str | Path | None = None,
    checkpoint: str | Path | None = None,
    sizes: list[tuple[int, int]] | None = None,
    repeats: int = 20,
    warmup: int = 2,
    device: str = "cpu",
    threads: int | None = None,
    backends: list[str] | None = None,
    pipeline_frames: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row per backend x precision x size: latency p50/p95 (ms), img/s, peak memory (MB), optional pipeline fps.

    ``threads`` is given to every backend (ORT intra-op, torch intra-op), so CPU comparisons are like for like.
    """
    from tqdm import tqdm

    threads = threads or os.cpu_count() or 1
    plan = [p for p in _plan(model, checkpoint, device) if backends is None or p[0] in backends]
    if not plan:
        raise DeployError("nothing to benchmark: no backend of the requested ones can run this model here")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dass-bench-") as tmpdir:
        for name, precision, path in plan:
            _reset_peak_rss()
            rss0 = _proc_status_kb("VmRSS") or 0
            backend = create_backend(path, backend=name, device=device, threads=threads, precision=precision)
            run_sizes = sizes or [backend.input_size or (512, 1024)]
            for size in run_sizes:
                row: dict[str, Any] = {
                    "backend": backend.name,
                    "precision": precision,
                    "device": device,
                    "size": f"{size[0]}x{size[1]}",
                    "threads": threads,
                }
                if backend.input_size and tuple(backend.input_size) != size and not backend.dynamic:
                    rows.append({**row, "skipped": f"fixed input {backend.input_size[0]}x{backend.input_size[1]}"})
                    continue
                x = np.random.default_rng(0).uniform(0, 255, (1, 3, *size)).astype(np.float32)
                cuda_torch = backend.name.startswith("torch") and device == "cuda"
                if cuda_torch:
                    backend.torch.cuda.reset_peak_memory_stats()
                for _ in range(warmup):
                    backend.predict(x)
                times = []
                for _ in tqdm(range(repeats), desc=f"{backend.name} {precision} {row['size']}", disable=not progress):
                    t0 = time.perf_counter()
                    backend.predict(x)
                    times.append((time.perf_counter() - t0) * 1000.0)
                ms = np.asarray(times)
                peak_kb = _proc_status_kb("VmHWM") or 0
                row.update(
                    p50_ms=float(np.percentile(ms, 50)),
                    p95_ms=float(np.percentile(ms, 95)),
                    mean_ms=float(ms.mean()),
                    img_per_s=float(1000.0 / ms.mean()),
                    peak_mem_mb=(
                        backend.torch.cuda.max_memory_allocated() / 2**20
                        if cuda_torch
                        else max(peak_kb - rss0, 0) / 1024
                    ),
                    memory_kind="cuda max allocated" if cuda_torch else "RSS high-water delta",
                )
                if pipeline_frames:
                    fps = _pipeline_fps(backend, size, pipeline_frames, Path(tmpdir))
                    row.update(pipeline_fps=fps, pipeline_ratio=fps / row["img_per_s"])
                rows.append(row)
            del backend
    return rows


def speedups(rows: list[dict[str, Any]], fast: str = "onnxruntime", slow: str = "torch") -> dict[str, float]:
    """``{size: throughput(fast) / throughput(slow)}`` for fp32 rows of both backends at the same size."""
    fp32 = {
        (r["backend"].split("-")[0], r["size"]): r for r in rows if r.get("precision") == "fp32" and "img_per_s" in r
    }
    return {
        size: fp32[(fast, size)]["img_per_s"] / fp32[(slow, size)]["img_per_s"]
        for (b, size) in fp32
        if b == fast and (slow, size) in fp32
    }


def to_markdown(rows: list[dict[str, Any]], command: str, notes: list[str] | None = None) -> str:
    head = "| backend | precision | device | size | p50 (ms) | p95 (ms) | img/s | peak mem (MB) | pipeline fps | pipeline / model |"
    lines = [f"`{command}`", "", head, "|" + "---|" * 10]
    for r in rows:
        if "skipped" in r:
            lines.append(
                f"| {r['backend']} | {r['precision']} | {r['device']} | {r['size']} | skipped: {r['skipped']} |||||"
            )
            continue
        pipe = (f"{r['pipeline_fps']:.2f}", f"{r['pipeline_ratio']:.0%}") if "pipeline_fps" in r else ("", "")
        lines.append(
            f"| {r['backend']} | {r['precision']} | {r['device']} | {r['size']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} "
            f"| {r['img_per_s']:.2f} | {r['peak_mem_mb']:.0f} | {pipe[0]} | {pipe[1]} |"
        )
    for size, ratio in speedups(rows).items():
        lines.append(f"\nONNX Runtime vs torch eager (fp32, {size}): {ratio:.2f}x throughput")
    lines += [f"\n{n}" for n in notes or []]
    return "\n".join(lines) + "\n"


def save_results(rows: list[dict[str, Any]], name: str, command: str, out_dir: Path = RESULTS_DIR, notes=None) -> Path:
    """Write ``<out_dir>/<name>.md`` and ``.json`` (rows, speed-ups, command, machine); returns the markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    import onnxruntime

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }
    if "torch" in sys.modules:
        env["torch"] = sys.modules["torch"].__version__
    payload = {"command": command, "rows": rows, "speedups_onnxruntime_vs_torch": speedups(rows), "env": env}
    if notes:
        payload["notes"] = notes
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=1))
    md = out_dir / f"{name}.md"
    md.write_text(f"# Benchmark: {name}\n\n" + to_markdown(rows, command, notes))
    return md


def benchmark_main(args: argparse.Namespace, argv: list[str]) -> int:
    """``dass-segment --benchmark``: print the table and save it (``--out`` overrides benchmarks/results/)."""
    sizes = [parse_size(s) for s in args.sizes.split(",")] if args.sizes else None
    backends = None if args.backend == "auto" else [args.backend]
    rows = run_benchmark(
        model=args.model,
        checkpoint=args.checkpoint,
        sizes=sizes,  # type: ignore[arg-type]
        repeats=args.repeats,
        device=args.device,
        threads=args.threads,
        backends=backends,
        pipeline_frames=max(args.repeats, 10),
        progress=not args.quiet,
    )
    command = "dass-segment " + shlex.join(argv)
    name = f"segment_{args.device}"
    path = save_results(rows, name, command, args.out or RESULTS_DIR)
    print(to_markdown(rows, command))
    print(f"saved {path} and {path.with_suffix('.json')}")
    return 0
