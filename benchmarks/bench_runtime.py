"""CPU runtime requirement: ONNX Runtime vs torch eager, DeepLab-V2 ResNet-101, fp32, 512x1024, same run.

Weights are random (speed does not depend on their values); the model is exported with the real ``export_model``
to a temporary folder, then both backends are timed through ``dass_deploy.benchmark`` with the same thread count.
Writes ``benchmarks/results/runtime_cpu.{md,json}`` with the command line.

    python benchmarks/bench_runtime.py [--repeats 5] [--threads N] [--size 512x1024]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shlex
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def export_random(backbone: str, height: int, width: int, tmp: str) -> str:
    """Save a random-init checkpoint and export it; run in a child process so the parent's RSS stays clean."""
    import torch

    from dass_deploy.export import export_model
    from dass_train.checkpoint import checkpoint_meta_default, save_checkpoint
    from dass_train.network import deeplab_v2

    torch.manual_seed(0)
    model = deeplab_v2(num_classes=19, backbone=backbone)
    ckpt = Path(tmp) / f"{backbone}_random.pt"
    meta = checkpoint_meta_default(backbone=backbone, stage="random-init (benchmark)")
    save_checkpoint(ckpt, {"format": "dass-checkpoint", "version": 1, "model": model.state_dict(), "meta": meta})
    result = export_model(
        ckpt, out=Path(tmp) / "models", name=backbone, height=height, width=width, parity_samples=1, progress=False
    )
    return str(result.model_dir)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--size", default="512x1024")
    p.add_argument("--backbone", default="resnet101")
    args = p.parse_args()

    from dass_deploy.benchmark import run_benchmark, save_results, speedups, to_markdown
    from dass_deploy.segmenter import parse_size

    height, width = parse_size(args.size)
    command = "python benchmarks/bench_runtime.py " + shlex.join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="dass-bench-") as tmp:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            model_dir = pool.apply(export_random, (args.backbone, height, width, tmp))
        rows = run_benchmark(
            model=model_dir,
            sizes=[(height, width)],
            repeats=args.repeats,
            warmup=1,
            threads=args.threads,
            backends=["onnxruntime", "torch"],
        )
    notes = [
        f"DeepLab-V2 {args.backbone}, random init (speed does not depend on the weight values), fp32, batch 1, "
        f"{args.threads} threads for both backends (ORT intra-op, torch.set_num_threads), {args.repeats} timed runs "
        "after 1 warm-up. ORT: graph optimisation ORT_ENABLE_ALL, CPUExecutionProvider. Peak memory: RSS "
        "high-water mark minus RSS before the backend was built, both backends in one process (ORT first); the "
        "torch row can reuse memory ORT freed, so it is a lower bound.",
    ]
    for size, ratio in speedups(rows).items():
        verdict = "meets" if ratio >= 1.5 else "does NOT meet"
        notes.append(f"Requirement ONNX Runtime >= 1.5x torch eager at {size}: {ratio:.2f}x, {verdict} it.")
    path = save_results(rows, "runtime_cpu", command, REPO / "benchmarks" / "results", notes=notes)
    print(to_markdown(rows, command, notes))
    print(f"saved {path} and {path.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
