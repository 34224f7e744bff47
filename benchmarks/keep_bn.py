"""Issue 20, item 3: does keeping the BatchNorm nodes (``dass-export --keep-bn``) cost anything at inference, and how
does the torch-free ``--adapt-bn`` (ONNX Runtime + numpy) compare with the PyTorch one?

    python benchmarks/keep_bn.py --checkpoint runs/tables-paper-seed0/row4/adapt/last.pt \\
        --frames data/newcamera-seed500/cityscapes/leftImg8bit/train

1. The checkpoint is exported twice, fp32 with dynamic height/width: BN folded into the convolutions (the default)
   and with its BatchNormalization nodes kept. ONNX Runtime and OpenVINO are expected to fold BN themselves when
   they load a model; the latency of both exports is timed in blocks of runs taken round-robin (so a change of load
   slows all alike, and no runtime is timed while another's threads still spin) at each ``--sizes``, on every
   runtime installed here.
2. ``--adapt-bn`` on N = 16, 64, 256 frames of ``--frames``, both ways, through the CLI's own functions:
   ``adapt_torch_backend`` on the checkpoint (what ``dass-segment --checkpoint CKPT --adapt-bn`` does) and
   ``adapt_exported_model`` on the kept export (``dass-segment --model M --adapt-bn``, no PyTorch): wall seconds of
   each call (loading the model included, as the user waits for it), and how far apart the two adapted models are (the fraction of pixels whose label agrees on the
   frames, the largest relative difference of a running statistic).

Writes benchmarks/results/keep_bn.{json,md}. Timings mean something only on an idle machine (recorded).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dass_deploy.machine import describe_machine, machine_markdown  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CHECKPOINT = "runs/tables-paper-seed0/row4/adapt/last.pt"
DEFAULT_FRAMES = "data/newcamera-seed500/cityscapes/leftImg8bit/train"


def _in_repo(path: str) -> Path:
    """A relative path as given when it exists from here, else from the repository (the defaults are repo paths)."""
    return Path(path) if Path(path).exists() or Path(path).is_absolute() else REPO / path


def export(checkpoint: Path, out: Path, name: str, keep_bn: bool, size: tuple[int, int]) -> Path:
    from dass_deploy.cli_export import export_main

    words = [str(checkpoint), "--out", str(out), "--name", name, "--dynamic", "--quiet"]
    words += ["--height", str(size[0]), "--width", str(size[1])] + (["--keep-bn"] if keep_bn else [])
    if export_main(words):
        raise SystemExit(f"dass-export {' '.join(words)} failed")
    return out / name


def latency(models: dict[str, Path], sizes: list[tuple[int, int]], repeats: int, threads: int) -> list[dict]:
    """p50 / p95 ms of each (export, runtime, size): round-robin blocks (``time_in_blocks``), after a warm-up."""
    import numpy as np

    from dass_deploy.backends import create_backend
    from dass_deploy.benchmark import BLOCK, time_in_blocks
    from dass_deploy.errors import DeployError

    entries, rows = [], []
    for runtime in ("onnxruntime", "openvino"):
        for export_name, path in models.items():
            try:
                backend = create_backend(path, backend=runtime, threads=threads)
            except DeployError as exc:
                rows.append({"export": export_name, "runtime": runtime, "skipped": str(exc)})
                continue
            for size in sizes:
                x = np.random.default_rng(0).uniform(0, 255, (1, 3, *size)).astype(np.float32)
                for _ in range(3):
                    backend.predict(x)
                row = {"export": export_name, "runtime": runtime, "size": f"{size[0]}x{size[1]}", "threads": threads}
                rows.append(row)
                entries.append((backend, x, row))
    calls = [lambda b=backend, x=x: b.predict(x) for backend, x, _ in entries]
    for (_, _, row), times in zip(entries, time_in_blocks(calls, repeats), strict=True):
        row.update(p50_ms=float(np.percentile(times, 50)), p95_ms=float(np.percentile(times, 95)), repeats=repeats,
                   block=BLOCK)  # fmt: skip
    return rows


def adaptation(checkpoint: Path, kept: Path, frames: str, counts: list[int], size: tuple[int, int]) -> list[dict]:
    import numpy as np

    from dass_deploy.adapt_bn import adapt_torch_backend
    from dass_deploy.adapt_bn_onnx import adapt_exported_model
    from dass_deploy.adapt_frames import open_adapt_frames
    from dass_deploy.segmenter import Segmenter
    from dass_deploy.sources import collect_sources, read_image

    images = [read_image(p.path) for p in collect_sources([frames]).images[:16]]
    rows = []
    for count in counts:
        start = time.perf_counter()
        seg = Segmenter(str(checkpoint), backend="torch", size=size)
        torch_adapted = adapt_torch_backend(seg.backend, open_adapt_frames(frames, count), size, progress=False)
        torch_s = time.perf_counter() - start
        start = time.perf_counter()
        backend, ort_adapted = adapt_exported_model(kept, open_adapt_frames(frames, count), size, progress=False)
        ort_s = time.perf_counter() - start
        ort_seg = Segmenter(backend, size=size)
        agree = np.mean(
            [(a == b).mean() for a, b in zip(seg.predict_batch(images), ort_seg.predict_batch(images), strict=True)]
        )
        rows.append(
            {
                "frames": count,
                "torch_s": torch_s,
                "onnxruntime_s": ort_s,
                "label_agreement": float(agree),
                "same_frames": torch_adapted.record["frames_sha256"] == ort_adapted.record["frames_sha256"],
                "shift_torch": torch_adapted.record["shift"]["mean_shift_sd"]["median"],
                "shift_onnxruntime": ort_adapted.record["shift"]["mean_shift_sd"]["median"],
            }
        )
        print(f"N={count}: torch {torch_s:.1f} s, onnxruntime {ort_s:.1f} s, labels agree {agree:.5f}")
    return rows


def markdown(result: dict) -> str:
    lines = [
        "# `--keep-bn`: the cost of keeping BatchNorm nodes, and `--adapt-bn` without PyTorch (issue 20, item 3)",
        "",
        f"    {result['command']}",
        "",
        f"Checkpoint `{result['checkpoint']}`, exported fp32 with dynamic height/width, BN folded and kept.",
        "",
        "## Inference latency (ms, one image; blocks of runs, round-robin)",
        "",
        "| runtime | size | folded p50 | kept p50 | kept / folded | folded p95 | kept p95 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    timed = [r for r in result["latency"] if "p50_ms" in r]
    for r in (r for r in timed if r["export"] == "folded"):
        k = next(x for x in timed if x["export"] == "kept" and (x["runtime"], x["size"]) == (r["runtime"], r["size"]))
        lines.append(
            f"| {r['runtime']} | {r['size']} | {r['p50_ms']:.2f} | {k['p50_ms']:.2f} | {k['p50_ms'] / r['p50_ms']:.3f} "
            f"| {r['p95_ms']:.2f} | {k['p95_ms']:.2f} |"
        )
    lines += [f"- {r['runtime']} ({r['export']}): skipped, {r['skipped']}" for r in result["latency"] if "skipped" in r]
    lines += [
        "",
        f"## `--adapt-bn` at {result['size']}: PyTorch (checkpoint) against ONNX Runtime (kept export)",
        "",
        "| N | PyTorch s | ONNX Runtime s | labels agree | same frames | median mean shift (sd), torch / ORT |",
        "|---:|---:|---:|---:|---|---|",
    ]
    for r in result["adaptation"]:
        lines.append(
            f"| {r['frames']} | {r['torch_s']:.1f} | {r['onnxruntime_s']:.1f} | {r['label_agreement']:.5f} | "
            f"{'yes' if r['same_frames'] else 'no'} | {r['shift_torch']:.3f} / {r['shift_onnxruntime']:.3f} |"
        )
    lines += ["", machine_markdown(result["machine"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"a dass checkpoint (default {DEFAULT_CHECKPOINT})")
    p.add_argument("--frames", default=DEFAULT_FRAMES, help="SOURCE of the frames (default: the new camera's)")
    p.add_argument("--counts", default="16,64,256", help="N for --adapt-bn (comma list)")
    p.add_argument("--sizes", default="128x256,512x1024", help="latency sizes HxW (comma list)")
    p.add_argument("--size", default="128x256", help="HxW the adaptation runs at (the export's own size)")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per export, runtime and size")
    p.add_argument("--threads", type=int, default=None, help="runtime threads (default: all cores)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    import os

    from dass_deploy.segmenter import parse_size

    checkpoint = _in_repo(args.checkpoint)
    if not checkpoint.is_file():
        p.error(f"--checkpoint {checkpoint}: not found (python benchmarks/synth_tables.py makes it)")
    frames = _in_repo(args.frames)
    if not frames.exists():
        p.error(f"--frames {frames}: not found (python benchmarks/adapt_bn.py makes the new camera's)")
    size = parse_size(args.size)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    counts = [int(c) for c in args.counts.split(",")]
    threads = args.threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="keep-bn-") as tmp:
        folded = export(checkpoint, Path(tmp), "folded", False, size)
        kept = export(checkpoint, Path(tmp), "kept", True, size)
        latency_rows = latency({"folded": folded, "kept": kept}, sizes, args.repeats, threads)
        adapt_rows = adaptation(checkpoint, kept, str(frames), counts, size)
    words = ["--checkpoint", args.checkpoint, "--frames", args.frames, "--counts", args.counts]
    words += ["--sizes", args.sizes, "--size", args.size, "--repeats", str(args.repeats)]
    result = {
        "command": "python benchmarks/keep_bn.py " + " ".join(shlex.quote(w) for w in words),
        "checkpoint": args.checkpoint,
        "size": args.size,
        "machine": describe_machine(),
        "latency": latency_rows,
        "adaptation": adapt_rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "keep_bn.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "keep_bn.md").write_text(markdown(result))
    print((out / "keep_bn.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
