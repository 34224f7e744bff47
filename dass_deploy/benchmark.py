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
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dass_deploy.backends import create_backend, source_checkpoint
from dass_deploy.errors import DeployError
from dass_deploy.machine import describe_machine, machine_markdown
from dass_deploy.segmenter import parse_size

RESULTS_DIR = Path("benchmarks/results")
RESULTS_FORMAT = "dass-benchmark"
BLOCK = 6  # calls per timing block: one untimed, then BLOCK - 1 timed (see time_in_blocks)


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
        if device == "cpu" and importlib.util.find_spec("openvino") is not None:
            plan.append(("openvino", exported, model))
            if exported == "fp32" and _cpu_has_bf16():
                plan.append(("openvino", "bf16", model))  # f32 layers in bfloat16: a separate, labelled row
    if device == "cuda" and info.plan_path is not None and importlib.util.find_spec("tensorrt") is not None:
        plan.append(("tensorrt", exported, model))
    # an --adapt-bn export's statistics are not in its source checkpoint, so torch would run another model
    if importlib.util.find_spec("torch") is not None and not info.meta.get("adapt_bn"):
        try:
            source_checkpoint(model, info.meta)
            precisions = ["fp32", "fp16", "bf16"] if device == "cuda" else ["fp32"]
            plan += [("torch", p, model) for p in precisions]
        except DeployError:
            pass  # no source checkpoint next to the export: torch is simply not compared
    return plan


def _cpu_has_bf16() -> bool:
    """AVX512_BF16 or AMX-BF16: OpenVINO's bf16 inference precision has native kernels here."""
    isa = describe_machine()["isa"]
    return bool(isa.get("avx512_bf16") or isa.get("amx_bf16"))


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


def time_in_blocks(
    runs: Sequence[Callable[[], object]],
    repeats: int,
    block: int = BLOCK,
    on_round: Callable[[int, int], None] | None = None,
) -> list[list[float]]:
    """Milliseconds of ``repeats`` timed calls of each of ``runs``, in blocks taken round-robin.

    Every block starts with one untimed call, then times ``block - 1`` calls of the same callable, and the blocks of
    all callables alternate. Round-robin makes a load change during the benchmark slow every callable alike (ratios
    are measured in one run); the untimed call keeps the previous callable's ONNX Runtime / OpenVINO worker threads,
    still spinning after they return, out of the timings (alternating single calls slowed the next 128x256 run by
    ~60 %). ``on_round(done, total)`` is called after each round of blocks (a progress hook).
    """
    if repeats < 1 or block < 2:
        raise ValueError(f"repeats must be >= 1 and block >= 2, got repeats={repeats}, block={block}")
    per_block = block - 1
    rounds = -(-repeats // per_block)
    times: list[list[float]] = [[] for _ in runs]
    for r in range(rounds):
        for fn, ms in zip(runs, times, strict=True):
            fn()
            for _ in range(min(per_block, repeats - len(ms))):
                start = time.perf_counter()
                fn()
                ms.append((time.perf_counter() - start) * 1000.0)
        if on_round is not None:
            on_round(r + 1, rounds)
    return times


def _row(backend: Any, precision: str, device: str, size: tuple[int, int], threads: int) -> dict[str, Any]:
    return {
        "backend": backend.name,
        "precision": precision,
        "device": device,
        "size": f"{size[0]}x{size[1]}",
        "threads": threads,
    }


def _timings(row: dict[str, Any], times: list[float]) -> dict[str, Any]:
    ms = np.asarray(times)
    row.update(
        p50_ms=float(np.percentile(ms, 50)),
        p95_ms=float(np.percentile(ms, 95)),
        mean_ms=float(ms.mean()),
        img_per_s=float(1000.0 / ms.mean()),
        repeats=len(times),
    )
    return row


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
    interleave: bool = False,
) -> list[dict[str, Any]]:
    """One row per backend x precision x size: latency p50/p95 (ms), img/s, peak memory (MB), optional pipeline fps.

    ``threads`` is given to every backend (ORT intra-op, OpenVINO, torch intra-op), so CPU comparisons are like for
    like. ``interleave`` builds every backend first and times them in round-robin blocks (``time_in_blocks``), so a
    machine whose load changes during the benchmark slows all of them alike: use it for speed-up figures on a shared
    machine. Memory is then the RSS high-water delta of each backend's build + warm-up.
    """
    threads = threads or os.cpu_count() or 1
    plan = [p for p in _plan(model, checkpoint, device) if backends is None or p[0] in backends]
    if not plan:
        raise DeployError("nothing to benchmark: no backend of the requested ones can run this model here")
    if interleave:
        return _run_interleaved(plan, sizes, repeats, warmup, device, threads, progress)
    from tqdm import tqdm

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dass-bench-") as tmpdir:
        for name, precision, path in plan:
            _reset_peak_rss()
            rss0 = _proc_status_kb("VmRSS") or 0
            backend = create_backend(path, backend=name, device=device, threads=threads, precision=precision)
            run_sizes = sizes or [backend.input_size or (512, 1024)]
            for size in run_sizes:
                row = _row(backend, precision, device, size, threads)
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
                peak_kb = _proc_status_kb("VmHWM") or 0
                _timings(row, times)
                row.update(
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


def _run_interleaved(
    plan: list[tuple[str, str, str | Path]],
    sizes: list[tuple[int, int]] | None,
    repeats: int,
    warmup: int,
    device: str,
    threads: int,
    progress: bool,
) -> list[dict[str, Any]]:
    """Build + warm up every (backend, size) in turn, then time them in round-robin blocks (``time_in_blocks``)."""
    entries: list[tuple[Any, dict[str, Any], np.ndarray]] = []
    rows: list[dict[str, Any]] = []
    for name, precision, path in plan:
        _reset_peak_rss()
        rss0 = _proc_status_kb("VmRSS") or 0
        t0 = time.perf_counter()
        try:
            backend = create_backend(path, backend=name, device=device, threads=threads, precision=precision)
        except DeployError as exc:  # one runtime failing here (e.g. under an ISA cap) must not lose the others
            for size in sizes or [(512, 1024)]:
                rows.append({"backend": name, "precision": precision, "device": device,
                             "size": f"{size[0]}x{size[1]}", "threads": threads, "skipped": str(exc)})  # fmt: skip
            continue
        build_s = time.perf_counter() - t0
        for size in sizes or [backend.input_size or (512, 1024)]:
            row = _row(backend, precision, device, size, threads)
            if backend.input_size and tuple(backend.input_size) != size and not backend.dynamic:
                rows.append({**row, "skipped": f"fixed input {backend.input_size[0]}x{backend.input_size[1]}"})
                continue
            x = np.random.default_rng(0).uniform(0, 255, (1, 3, *size)).astype(np.float32)
            for _ in range(warmup):
                backend.predict(x)
            row.update(
                build_s=build_s,
                peak_mem_mb=max((_proc_status_kb("VmHWM") or 0) - rss0, 0) / 1024,
                memory_kind="RSS high-water delta (build + warm-up)",
                interleaved=True,
            )
            rows.append(row)
            entries.append((backend, row, x))

    def report(done: int, total: int) -> None:
        if progress:
            print(f"dass-benchmark: round {done}/{total} of blocks done", file=sys.stderr, flush=True)

    calls = [lambda b=backend, x=x: b.predict(x) for backend, _, x in entries]
    for (_, row, _), times in zip(entries, time_in_blocks(calls, repeats, on_round=report), strict=True):
        _timings(row, times)
        row["block"] = BLOCK
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


def fastest_vs(rows: list[dict[str, Any]], slow: str = "torch") -> dict[str, dict[str, Any]]:
    """Per size: the fastest non-``slow`` row (any precision) and its throughput over ``slow`` fp32."""
    out: dict[str, dict[str, Any]] = {}
    for size in sorted({r["size"] for r in rows if "img_per_s" in r}):
        timed = [r for r in rows if r["size"] == size and "img_per_s" in r]
        ref = [r for r in timed if r["backend"].split("-")[0] == slow and r["precision"] == "fp32"]
        others = [r for r in timed if r["backend"].split("-")[0] != slow]
        if ref and others:
            best = max(others, key=lambda r: r["img_per_s"])
            out[size] = {
                "backend": best["backend"],
                "precision": best["precision"],
                "speedup": best["img_per_s"] / ref[0]["img_per_s"],
            }
    return out


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
    for size, best in fastest_vs(rows).items():
        lines.append(
            f"\nFastest runtime vs torch eager fp32 ({size}): {best['backend']} {best['precision']}, "
            f"{best['speedup']:.2f}x throughput"
        )
    lines += [f"\n{n}" for n in notes or []]
    return "\n".join(lines) + "\n"


def _load_results(path: Path) -> dict[str, Any]:
    """An existing results file in the per-machine format; a file of the older one-machine format is kept as the
    rows of an unrecorded machine, so nothing measured before is lost."""
    empty: dict[str, Any] = {"format": RESULTS_FORMAT, "version": 1, "machines": {}, "rows": [], "notes": {}}
    if not path.is_file():
        return empty
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DeployError(
            f"{path}: existing results file is not valid JSON ({exc}); move it or choose another file"
        ) from None
    if isinstance(old, dict) and old.get("format") == RESULTS_FORMAT:
        return {**empty, **old}
    if isinstance(old, dict) and isinstance(old.get("rows"), list):  # the format before machines were recorded
        env = old.get("env", {})
        key = f"unrecorded machine ({env.get('platform', '?')}, {env.get('cpu_count', '?')} CPUs)"
        rows = [{**r, "machine": key, "command": old.get("command")} for r in old["rows"] if isinstance(r, dict)]
        return {**empty, "machines": {key: {"key": key, "env": env}}, "rows": rows}
    raise DeployError(f"{path}: not a dass benchmark results file; move it or choose another file") from None


def write_json(
    rows: list[dict[str, Any]],
    path: str | Path,
    command: str,
    machine: dict[str, Any] | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """Merge ``rows`` into the results file ``path`` (JSON) and return its content.

    Rows are keyed by machine (``dass_deploy.machine.machine_key``: CPU model + ISA flags + ISA cap): this machine's
    earlier rows are replaced, every other machine's rows are kept. Each row records its command and time.
    """
    machine = machine or describe_machine()
    key = machine["key"]
    path = Path(path)
    payload = _load_results(path)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    payload["rows"] = [r for r in payload["rows"] if r.get("machine") != key]
    payload["rows"] += [{**r, "machine": key, "command": command, "measured_at": stamp} for r in rows]
    payload["machines"][key] = machine
    payload["notes"][key] = list(notes or [])
    payload["command"] = command  # the latest one; every row has its own
    payload["speedups_onnxruntime_vs_torch"] = speedups(rows)
    payload["fastest_vs_torch"] = fastest_vs(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)
    return payload


def results_markdown(payload: dict[str, Any], title: str) -> str:
    """Every machine's rows of a results file, one section per machine (the machine described first)."""
    parts = [f"# Benchmark: {title}\n"]
    for key, machine in payload["machines"].items():
        rows = [r for r in payload["rows"] if r.get("machine") == key]
        command = rows[0].get("command", "") if rows else ""
        parts.append(f"## {key}\n")
        if "cpu_model" in machine:
            parts.append(machine_markdown(machine) + "\n")
        parts.append(to_markdown(rows, command, payload.get("notes", {}).get(key)))
    return "\n".join(parts)


def save_results(rows: list[dict[str, Any]], name: str, command: str, out_dir: Path = RESULTS_DIR, notes=None) -> Path:
    """Merge into ``<out_dir>/<name>.json`` (rows keyed by machine) and rewrite ``<name>.md`` from it; returns the
    markdown path."""
    out_dir = Path(out_dir)
    payload = write_json(rows, out_dir / f"{name}.json", command, notes=notes)
    md = out_dir / f"{name}.md"
    md.write_text(results_markdown(payload, name))
    return md


def benchmark_main(args: argparse.Namespace, argv: list[str]) -> int:
    """``dass-segment --benchmark``: print the table and save it in ``args.out`` (the CLI's default is the next free
    runs/benchmark/expN/; benchmarks/results/ when called without one); with
    ``args.json`` (``--json FILE``, optional) the rows are also merged into that file, keyed by machine."""
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
    if getattr(args, "json", None):
        write_json(rows, args.json, command)
        print(f"merged the rows into {args.json}")
    print(machine_markdown(describe_machine()))
    print(to_markdown(rows, command))
    print(f"saved {path} and {path.with_suffix('.json')}")
    return 0
