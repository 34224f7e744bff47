"""Timed gta2city training steps on one CUDA GPU, through the real CLI (``python -m dass_train gta2city``).

ResNet-101, 730x730 crops, batch 4 source + 4 target, the adapt stage (BiDA losses, pseudo labels), from the random
checkpoint ``prepare.py`` wrote, on its synthetic data at the real GTA5 / Cityscapes resolutions. For each AMP
mode the stage runs twice, with ``--iters-short`` and ``--iters-long`` iterations; the step rate is the difference
(long - short iterations) / (long - short seconds), so start-up, pseudo labels and validation cancel out. Peak
memory is read from the stage's ``log.txt`` line ``peak CUDA memory: <N> MiB`` when the trainer writes one.
TensorBoard logging is off: the GPU machine's image has no tensorboard, and the step rate does not need it.

    python benchmarks/gpu/train_speed.py --work runs/gpu_suite --out benchmarks/results/gpu [--amp off,bf16,fp16]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PEAK = re.compile(r"peak CUDA memory:\s*([\d.]+)\s*MiB")
TARGET_ITERS = 100_000  # the paper's schedule
TARGET_HOURS = 3.0


def run_stage(work: Path, prep: dict, amp: str, iters: int, timeout: float) -> dict:
    name = f"gpu-{amp}-{iters}"
    cmd = [
        sys.executable, "-m", "dass_train", "gta2city", "--name", name, "--stage", "adapt", "--exist-ok",
        "--init", prep["checkpoint"], f"run.out={work / 'runs'}", f"stages.adapt_iters={iters}",
        f"data.source_root={prep['source_root']}", f"data.target_root={prep['target_root']}", "model.init=null",
        f"run.amp={amp}", "run.val_every=0", "run.ckpt_every=0", "run.progress=false", "data.num_workers=4",
        "run.tensorboard=false",  # a bare CUDA image has no tensorboard; the timing does not need its logs
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    log = work / "runs" / name / "adapt" / "log.txt"
    text = log.read_text() if log.is_file() else ""
    peaks = [float(m) for m in PEAK.findall(text)]
    result = {"amp": amp, "iters": iters, "seconds": seconds, "returncode": proc.returncode, "command": cmd}
    if peaks:
        result["peak_cuda_mib"] = max(peaks)
    if proc.returncode != 0:
        result["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--amp", default="off,bf16,fp16", help="AMP modes (run.amp), comma separated")
    p.add_argument("--iters-short", type=int, default=5)
    p.add_argument("--iters-long", type=int, default=25)
    p.add_argument("--timeout", type=float, default=240, help="seconds per run")
    args = p.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    prep = json.loads((work / "prepare.json").read_text())
    rows = []
    for amp in args.amp.split(","):
        short = run_stage(work, prep, amp, args.iters_short, args.timeout)
        long = run_stage(work, prep, amp, args.iters_long, args.timeout)
        row = {"amp": amp, "runs": [short, long]}
        if short["returncode"] == 0 and long["returncode"] == 0 and long["seconds"] > short["seconds"]:
            it_s = (args.iters_long - args.iters_short) / (long["seconds"] - short["seconds"])
            hours = TARGET_ITERS / it_s / 3600
            row.update(it_per_s=it_s, hours_for_100k=hours, meets_3h=hours <= TARGET_HOURS)
        if "peak_cuda_mib" in long:
            row["peak_cuda_mib"] = long["peak_cuda_mib"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_speed.json").write_text(json.dumps({"rows": rows, "prepare": prep}, indent=1) + "\n")
    lines = [
        "# gta2city training speed (ResNet-101, 730x730, batch 4+4, adapt stage)",
        "",
        f"`python benchmarks/gpu/train_speed.py {' '.join(argv or sys.argv[1:])}`",
        "",
        "| AMP | it/s | hours for 100k it | <= 3 h | peak CUDA memory (MiB) |",
        "|---|---:|---:|---|---:|",
    ]
    for r in rows:
        if "it_per_s" in r:
            lines.append(
                f"| {r['amp']} | {r['it_per_s']:.2f} | {r['hours_for_100k']:.2f} | {'yes' if r['meets_3h'] else 'NO'} "
                f"| {r.get('peak_cuda_mib', 'not logged')} |"
            )
        else:
            errors = "; ".join(run.get("error", "") for run in r["runs"] if run.get("error"))
            lines.append(f"| {r['amp']} | failed: {errors} | | | |")
    (out / "train_speed.md").write_text("\n".join(lines) + "\n")
    return 0 if all("it_per_s" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
