"""`dass-segment --benchmark` on DeepLab-V2 ResNet-101 at 512x1024: torch eager, ONNX Runtime and OpenVINO rows.

    python benchmarks/segment_benchmark_r101.py [--repeats 5] [--threads 2]

Exports a random-init ResNet-101 (speed does not depend on the weight values) with the real exporter into
runs/bench-r101/ (its checkpoint stays beside it, so the benchmark adds torch eager rows), then runs exactly

    dass-segment --benchmark --model runs/bench-r101/models/resnet101 --sizes 512x1024 --repeats N \
        --json benchmarks/results/segment_benchmark_r101.json --out benchmarks/results

which merges its rows (backend, precision, size, p50_ms, p95_ms, ...) and this machine's description into the
JSON, keeping other machines' rows, and prints the fastest CPU runtime against torch eager fp32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main(argv: list[str] | None = None) -> int:
    from bench_runtime import export_random

    from dass_deploy.cli import segment_main

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per backend (default 5)")
    p.add_argument("--threads", type=int, default=0, help="runtime threads (default 0: each runtime's default)")
    p.add_argument("--work", default=str(REPO / "runs" / "bench-r101"), help="where the model is exported")
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "segment_benchmark_r101.json"))
    args = p.parse_args(argv)
    work = Path(args.work)
    model = work / "models" / "resnet101"
    if not (model / "meta.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        model = Path(export_random("resnet101", 512, 1024, str(work)))
    command = ["--benchmark", "--model", str(model), "--sizes", "512x1024", "--repeats", str(args.repeats)]
    command += ["--json", args.json, "--out", str(Path(args.json).parent)]  # segment_cpu.md beside the json
    command += ["--threads", str(args.threads)] if args.threads else []
    print("dass-segment " + " ".join(command), flush=True)
    return segment_main(command)


if __name__ == "__main__":
    sys.exit(main())
