"""OpenVINO: compile the ONNX graph directly, or the IR ``dass-export --openvino`` writes? Compile time and latency.

    python benchmarks/bench_openvino.py [--size 512x1024] [--backbone resnet101] [--repeats 3] [--threads N]

Exports a random-init DeepLab-V2 (speed does not depend on the weight values) with ``openvino=True`` (ONNX and IR
side by side), then times, alternating the two sources: ``compile_model`` (``--repeats`` times each, a fresh
``ov.Core`` each time, no model cache) and batch-1 inference of the compiled models, round-robin. Results are merged
into ``benchmarks/results/runtime_openvino.{md,json}``, keyed by machine.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def export_random(backbone: str, height: int, width: int, tmp: str) -> str:
    """Random-init checkpoint -> model folder with ONNX + IR (in a child process: torch stays out of the timing)."""
    import torch

    from dass_deploy.export import export_model
    from dass_train.checkpoint import checkpoint_meta_default, save_checkpoint
    from dass_train.network import deeplab_v2

    torch.manual_seed(0)
    ckpt = Path(tmp) / f"{backbone}.pt"
    meta = checkpoint_meta_default(backbone=backbone, stage="random-init (benchmark)")
    model = deeplab_v2(19, backbone)
    save_checkpoint(ckpt, {"format": "dass-checkpoint", "version": 1, "model": model.state_dict(), "meta": meta})
    result = export_model(ckpt, out=Path(tmp) / "models", name=backbone, height=height, width=width, openvino=True,
                          parity_samples=1, progress=False)  # fmt: skip
    return str(result.model_dir)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="512x1024")
    p.add_argument("--backbone", default="resnet101")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()

    import openvino as ov

    from dass_deploy.benchmark import write_json
    from dass_deploy.machine import describe_machine, machine_markdown

    h, _, w = args.size.partition("x")
    height, width = int(h), int(w)
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": args.threads}
    with tempfile.TemporaryDirectory(prefix="bench-ov-") as tmp:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            model_dir = Path(pool.apply(export_random, (args.backbone, height, width, tmp)))
        sources = {"onnx": model_dir / "1" / "model.onnx", "ir": model_dir / "1" / "model.xml"}
        compile_s: dict[str, list[float]] = {k: [] for k in sources}
        for _ in range(args.repeats):
            for key, path in sources.items():
                start = time.perf_counter()
                ov.Core().compile_model(str(path), "CPU", config)
                compile_s[key].append(time.perf_counter() - start)
        requests = {
            k: ov.Core().compile_model(str(p), "CPU", config).create_infer_request() for k, p in sources.items()
        }
        x = np.random.default_rng(0).uniform(0, 255, (1, 3, height, width)).astype(np.float32)
        infer_ms: dict[str, list[float]] = {k: [] for k in sources}
        outputs = {}
        for key, req in requests.items():
            req.infer({0: x})
            outputs[key] = req.get_output_tensor(0).data.copy()
        for _ in range(args.repeats):
            for key, req in requests.items():
                start = time.perf_counter()
                req.infer({0: x})
                infer_ms[key].append((time.perf_counter() - start) * 1000)
    same = float((outputs["onnx"] == outputs["ir"]).mean())
    rows = [
        {"backend": "openvino", "precision": "fp32", "size": f"{height}x{width}", "source": key,
         "compile_s_median": float(np.median(compile_s[key])), "p50_ms": float(np.median(infer_ms[key])),
         "p95_ms": float(np.percentile(infer_ms[key], 95)), "img_per_s": float(1000 / np.mean(infer_ms[key])),
         "threads": args.threads}
        for key in sources
    ]  # fmt: skip
    command = "python benchmarks/bench_openvino.py " + shlex.join(sys.argv[1:])
    notes = [f"OpenVINO {ov.get_version()}, DeepLab-V2 {args.backbone} random init, labels graph; compile and "
             f"inference alternate between the two sources; ONNX vs IR labels identical on {100 * same:.2f}% of "
             "pixels."]  # fmt: skip
    payload = write_json(rows, Path(args.out) / "runtime_openvino.json", command, notes=notes)
    lines = ["# OpenVINO: ONNX graph directly vs IR", ""]
    for key, machine in payload["machines"].items():
        mrows = [r for r in payload["rows"] if r.get("machine") == key]
        lines += [f"## {key}", "", machine_markdown(machine) if "cpu_model" in machine else "", ""]
        lines += [f"`{mrows[0]['command']}`" if mrows else "", ""]
        lines += ["| source | size | compile (s, median) | p50 (ms) | p95 (ms) |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['source']} | {r['size']} | {r['compile_s_median']:.2f} | {r['p50_ms']:.0f} | "
                  f"{r['p95_ms']:.0f} |" for r in mrows]  # fmt: skip
        lines += ["", *payload["notes"].get(key, []), ""]
    (Path(args.out) / "runtime_openvino.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(machine_markdown(describe_machine()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
