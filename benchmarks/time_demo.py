"""Wall time of ``make demo`` from a fresh clone (venv and install included), the timing table of docs/SPEED.md.

    python benchmarks/time_demo.py                   # this machine as it is
    python benchmarks/time_demo.py --isa-cap AVX2    # oneDNN + ATen capped to AVX2: an AVX2-only *emulation*

The committed HEAD is cloned into a temporary folder (uncommitted changes are not timed) and ``make demo`` runs there
exactly as a user runs it; its log is kept beside the results (``--log``). The two mIoU figures are read from the
trainer's summary. Results are merged into ``benchmarks/results/demo_time.{md,json}``, keyed by machine (CPU model +
ISA + cap): each machine's row stays when another machine is measured. No assertion on the time: the figure is
recorded, with the machine and the load average at the start (other work slows it).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dass_deploy.benchmark import write_json  # noqa: E402
from dass_deploy.machine import describe_machine, isa_cap_env, machine_markdown  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SUMMARY = re.compile(r"^Summary of \S+ \((?P<minutes>[\d.]+) min\)", re.M)
STAGE = re.compile(r"^\s+(?P<stage>source_only|adapt)\s+target val mIoU\s+(?P<miou>[\d.]+)", re.M)


def parse_log(text: str) -> dict:
    """Training minutes and the per-stage mIoU from ``dass-train``'s closing summary (None where absent)."""
    summary = SUMMARY.search(text)
    stages = {m["stage"]: float(m["miou"]) for m in STAGE.finditer(text)}
    return {
        "train_min": float(summary["minutes"]) if summary else None,
        "miou_source_only": stages.get("source_only"),
        "miou_bida": stages.get("adapt"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--isa-cap", default=None, help="emulate a CPU limited to this ISA (oneDNN and ATen), e.g. AVX2")
    p.add_argument("--log", default="/tmp/dass-demo-time.log", help="where the make demo log goes")
    p.add_argument("--out", default=str(RESULTS), help="results folder (default: benchmarks/results)")
    args = p.parse_args(argv)

    if args.isa_cap:  # in this process's environment: the machine record shows it, make demo inherits it
        os.environ.update(isa_cap_env(args.isa_cap, aten=True))
    machine = describe_machine()  # before the run: the load average is other work, not the demo
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="dass-demo-time-") as tmp:
        clone = Path(tmp) / "dass"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        start = time.perf_counter()
        with open(args.log, "w") as log:
            rc = subprocess.call(["make", "demo"], cwd=clone, stdout=log, stderr=subprocess.STDOUT)
        wall_min = (time.perf_counter() - start) / 60
    row = {
        "what": "make demo (fresh clone, venv + install included)",
        "commit": commit,
        "exit_code": rc,
        "wall_min": round(wall_min, 2),
        **parse_log(Path(args.log).read_text(errors="replace")),
    }
    command = "python benchmarks/time_demo.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    notes = [f"make demo exit code {rc}; log: {args.log} (not committed)."]
    if machine["isa_cap"]:
        notes.append(
            f"EMULATION of a {machine['isa_cap']}-only CPU: ONEDNN_MAX_CPU_ISA and ATEN_CPU_CAPABILITY cap torch's "
            "kernels on a CPU with more; a real CPU of that ISA also differs in clock, cache and memory."
        )
    payload = write_json([row], Path(args.out) / "demo_time.json", command, machine=machine, notes=notes)
    (Path(args.out) / "demo_time.md").write_text(to_markdown(payload))
    print(machine_markdown(machine))
    print(
        f"make demo: exit {rc}, {wall_min:.1f} min (training {row['train_min']} min), mIoU source-only "
        f"{row['miou_source_only']} -> BiDA {row['miou_bida']}"
    )
    return rc


def to_markdown(payload: dict) -> str:
    parts = ["# `make demo` wall time from a fresh clone\n"]
    for key, machine in payload["machines"].items():
        for r in (r for r in payload["rows"] if r.get("machine") == key):
            parts += [
                f"## {key}\n",
                machine_markdown(machine) + "\n",
                f"`{r['command']}` at commit {r['commit'][:7]}, {r['measured_at']}\n",
                "| exit | wall (min) | training (min) | mIoU source-only | mIoU BiDA |",
                "|---:|---:|---:|---:|---:|",
                f"| {r['exit_code']} | {r['wall_min']:.1f} | {r['train_min']} | {r['miou_source_only']} | "
                f"{r['miou_bida']} |",
                "",
                *payload.get("notes", {}).get(key, []),
                "",
            ]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.exit(main())
