"""Where a synth2real source-only training step spends its time on CPU: data loading vs compute, and which CPU
settings help (intra-op threads, channels_last, torch.compile), optionally under an ISA cap (AVX2 emulation).

    python benchmarks/profile_train_step.py [--steps 8] [--data-root data/synthetic/gta5] [--compile]
    python benchmarks/profile_train_step.py --isa-cap AVX2     # oneDNN + ATen capped to AVX2: AVX2-only *emulation*

The step is the synth2real source-only shape: DeepLab-V2 ResNet-18 (BatchNorm training), batch 4 crops of
192x128 from the GTA5-layout synthetic source (resize shorter side 128, scale 0.8-1.2, flip), cross-entropy, SGD.
It is the network + loss + optimiser of the trainer's step without its bookkeeping (domain BN, logging), so it is
a lower bound of an iteration. The step variants are timed round-robin (one step of each per round), so their
ratios hold on a loaded machine; absolute times do not (the load average is recorded). Data loading is timed separately (4 ``dataset[i]`` calls = one batch, in the main
process). Results are merged into ``benchmarks/results/train_step_cpu.{md,json}``, keyed by machine.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def time_data(root: Path, steps: int, batch: int) -> list[float]:
    from dass_train.data.datasets import GTA5Dataset
    from dass_train.data.transforms import NORMALIZATIONS, TrainTransform, TransformConfig

    transform = TrainTransform(TransformConfig(128, (0.8, 1.2), (192, 128), True), NORMALIZATIONS["imagenet"])
    dataset = GTA5Dataset(root, transforms=transform)
    times = []
    for s in range(steps):
        start = time.perf_counter()
        for i in range(batch):
            dataset[((s * batch + i) % len(dataset), 0)]
        times.append((time.perf_counter() - start) * 1000)
    return times


def make_step(batch: int, channels_last: bool, compiled: bool):
    """One variant's training step (own model, optimiser and batch), as a zero-argument callable."""
    import torch

    from dass_train.network import deeplab_v2

    torch.manual_seed(0)
    model = deeplab_v2(19, "resnet18", freeze_bn=False).train()
    x = torch.randn(batch, 3, 128, 192)
    y = torch.randint(0, 19, (batch, 128, 192))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    net = torch.compile(model) if compiled else model

    def step() -> None:
        logits = torch.nn.functional.interpolate(net(x), size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_variants(variants: list[tuple[int, bool, bool]], steps: int, batch: int) -> dict[tuple, list[float]]:
    """Every variant's step, round-robin (one step of each per round, threads set before each), after 2 warm-up
    steps each: a machine whose load changes slows every variant alike."""
    import torch

    fns = {v: make_step(batch, v[1], v[2]) for v in variants}
    for (threads, _, _), fn in fns.items():
        torch.set_num_threads(threads)
        fn()
        fn()
    times: dict[tuple, list[float]] = {v: [] for v in variants}
    for _ in range(steps):
        for v, fn in fns.items():
            torch.set_num_threads(v[0])
            start = time.perf_counter()
            fn()
            times[v].append((time.perf_counter() - start) * 1000)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--data-root", default=str(REPO / "data" / "synthetic" / "gta5"))
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on 2 cores)")
    p.add_argument("--isa-cap", default=None, help="emulate a CPU limited to this oneDNN ISA (e.g. AVX2)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()
    if args.isa_cap and os.environ.get("ONEDNN_MAX_CPU_ISA") != args.isa_cap:
        # oneDNN (convolutions) and ATen's own vectorised kernels (elementwise, reductions) both capped
        from dass_deploy.machine import isa_cap_env

        env = {**os.environ, **isa_cap_env(args.isa_cap, aten=True)}
        return subprocess.call([sys.executable, *sys.argv], env=env)

    from dass_deploy.benchmark import write_json
    from dass_deploy.machine import describe_machine, machine_markdown

    cores = os.cpu_count() or 1
    rows = []

    def add(variant: str, times: list[float], **extra) -> None:
        ms = np.asarray(times)
        rows.append({"backend": "torch", "precision": "fp32", "size": "4x192x128", "variant": variant,
                     "p50_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)),
                     "img_per_s": float(1000.0 / ms.mean()), **extra})  # fmt: skip
        print(f"{variant}: median {np.median(ms):.0f} ms", flush=True)

    if Path(args.data_root).is_dir():
        add("data loading (4 samples, main process)", time_data(Path(args.data_root), args.steps, args.batch))
    variants = [(t, cl, False) for t in sorted({1, cores}) for cl in (False, True)]
    if args.compile:
        variants.append((cores, False, True))
    for (threads, channels_last, compiled), times in time_variants(variants, args.steps, args.batch).items():
        name = (
            f"step: {threads} thread(s){', channels_last' if channels_last else ''}{', compiled' if compiled else ''}"
        )
        add(name, times, threads=threads)

    command = "python benchmarks/profile_train_step.py " + shlex.join(sys.argv[1:])
    machine = describe_machine()
    out = Path(args.out)
    payload = write_json(rows, out / "train_step_cpu.json", command, machine=machine)
    lines = ["# synth2real source-only training step on CPU: data loading, threads, channels_last", ""]
    for key, m in payload["machines"].items():
        lines += [f"## {key}", "", machine_markdown(m) if "cpu_model" in m else "", ""]
        mrows = [r for r in payload["rows"] if r.get("machine") == key]
        lines += [
            f"`{mrows[0]['command']}`" if mrows else "",
            "",
            "| what | median (ms) | p95 (ms) |",
            "|---|---:|---:|",
        ]
        lines += [f"| {r['variant']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} |" for r in mrows]
        lines.append("")
    (out / "train_step_cpu.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
