"""CPU runtime requirement: the fastest CPU runtime vs torch eager fp32, DeepLab-V2 ResNet-101, 512x1024, one run.

Weights are random (speed does not depend on their values); the model is exported with the real ``export_model``
to a temporary folder, then ONNX Runtime, OpenVINO (f32 and, where the CPU has bf16 kernels, bf16) and torch eager
are timed through ``dass_deploy.benchmark.run_benchmark`` with the same thread count, *interleaved* (one run of each
per round), so a shared machine's changing load slows all of them alike.

    python benchmarks/bench_runtime.py [--repeats 5] [--threads N] [--size 512x1024]
    python benchmarks/bench_runtime.py --isa-cap AVX2     # emulate an AVX2-only CPU (see below)

``--isa-cap AVX2`` sets ``ONEDNN_MAX_CPU_ISA=AVX2`` for the whole run: torch's and OpenVINO's oneDNN kernels stop at
AVX2. It is an *emulation* and labelled so (the machine key gets ``| cap AVX2``): ONNX Runtime's own MLAS kernels do
not read that variable and keep using AVX-512, so its row is NOT an AVX2 figure. Results are merged into
``benchmarks/results/runtime_cpu.{md,json}``, keyed by machine (CPU model + ISA + cap): other machines' rows stay.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shlex
import subprocess
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
    p.add_argument("--isa-cap", default=None, help="emulate a CPU limited to this oneDNN ISA (e.g. AVX2)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="results folder")
    args = p.parse_args()

    if args.isa_cap and os.environ.get("ONEDNN_MAX_CPU_ISA") != args.isa_cap:
        # oneDNN reads the cap once, when torch / OpenVINO load it: re-run this script with it set from the start.
        from dass_deploy.machine import isa_cap_env

        env = {**os.environ, **isa_cap_env(args.isa_cap)}
        return subprocess.call([sys.executable, *sys.argv], env=env)

    from dass_deploy.benchmark import fastest_vs, run_benchmark, save_results, to_markdown
    from dass_deploy.machine import describe_machine, machine_markdown
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
            backends=["onnxruntime", "openvino", "torch"],
            interleave=True,
        )
    machine = describe_machine()
    notes = [
        f"DeepLab-V2 {args.backbone}, random init (speed does not depend on the weight values), batch 1, "
        f"{args.threads} threads for every backend (ORT intra-op, OpenVINO INFERENCE_NUM_THREADS, "
        f"torch.set_num_threads), {args.repeats} timed rounds after 1 warm-up, interleaved (one run of each backend "
        "per round). ORT: ORT_ENABLE_ALL, CPUExecutionProvider. OpenVINO: CPU plugin, LATENCY hint, the ONNX graph "
        "compiled directly; fp32 = INFERENCE_PRECISION_HINT f32 (labels equal ORT's), bf16 = f32 layers run in "
        "bfloat16 (reduced precision, a separate row). Peak memory: RSS high-water delta of each backend's build + "
        "warm-up, in one process.",
    ]
    if machine["isa_cap"]:
        notes.append(
            f"EMULATION of a {machine['isa_cap']}-only CPU: ONEDNN_MAX_CPU_ISA={machine['isa_cap']} caps torch's and "
            "OpenVINO's oneDNN kernels; ONNX Runtime's MLAS ignores it and still uses this CPU's full ISA, so the "
            "onnxruntime row is not an AVX2 figure. OpenVINO has no documented ISA cap of its own; its CPU plugin "
            "does read ONEDNN_MAX_CPU_ISA (fp32 compiled under the AVX2 cap here; bf16 did not: a skipped row says "
            "why)."
        )
    fp32_rows = [r for r in rows if r.get("precision") == "fp32"]
    for label, subset in (("any precision", rows), ("fp32 only", fp32_rows)):
        for size, best in fastest_vs(subset).items():
            verdict = "meets" if best["speedup"] >= 1.5 else "does NOT meet"
            notes.append(
                f"Requirement fastest CPU runtime >= 1.5x torch eager fp32 at {size} ({label}): {best['backend']} "
                f"{best['precision']} {best['speedup']:.2f}x, {verdict} it."
            )
    path = save_results(rows, "runtime_cpu", command, Path(args.out), notes=notes)
    print(machine_markdown(machine))
    print(to_markdown(rows, command, notes))
    print(f"saved {path} and {path.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
