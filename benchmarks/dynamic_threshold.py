"""Which threshold T (Eq. 8), on which quantity? Dynamic-label density and accuracy on the synthetic proxy.

The paper thresholds the cosine similarity s(f_T, rho_{S->T}); the authors' code thresholds the softmax over classes
of cosine / tau at 0.8, a different quantity. This script takes an adapted checkpoint (with its EMA prototype memory),
draws (source, target) training crops as the adapt stage does, and for a grid of T and both quantities measures the
density and accuracy of the dynamic labels (calibrated and not) against target-train ground truth (measurement only),
beside the static labels on the same crops. The documented rule for a default: the smallest T whose calibrated
dynamic labels are at least as accurate as the static labels they extend (denser labels, no less reliable).

    python benchmarks/dynamic_threshold.py runs/tables-seed0/row4/adapt/last.pt --batches 40

Writes benchmarks/results/<name>.{json,md} (default dynamic_threshold) with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dass_deploy.machine import describe_machine, machine_markdown  # noqa: E402

COSINE = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.96, 0.98, 0.99, 0.995, 0.998, 0.999]
SOFTMAX = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]


def adapted_stage(checkpoint: Path):
    """The adapt stage of a finished synth2real run, resumed from ``checkpoint``: weights, EMA memory, static-label
    round and sampler positions, ready to draw the (source, target) batches its training would draw next."""
    import torch

    from dass_train.checkpoint import load_checkpoint
    from dass_train.config import config_from_dict
    from dass_train.distributed import DistInfo
    from dass_train.stages import make_stage

    cfg = config_from_dict(load_checkpoint(checkpoint)["meta"]["config"])
    cfg.run.progress = False
    cfg.data.num_workers = 0
    st = make_stage(cfg, "adapt", checkpoint.parent.parent, DistInfo())
    torch.manual_seed(1234)
    st._build_model()
    st.build_streams()
    st._resume(checkpoint)
    st.point_target_labels(st.pseudo_dir())
    return st


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="an adapt-stage last.pt of a synth2real run (its run folder intact)")
    p.add_argument("--batches", type=int, default=40, help="(source, target) batches to measure on")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--name", default="dynamic_threshold", help="results file name (e.g. dynamic_threshold_paper)")
    args = p.parse_args(argv)
    command = "python benchmarks/dynamic_threshold.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    import torch

    from dass_train import bida
    from dass_train.engine import bn_statistics_frozen

    st = adapted_stage(args.checkpoint)
    cfg = st.cfg
    tau = cfg.loss.tau
    grids = {"cosine": COSINE, "softmax": SOFTMAX}
    counts = {
        (score, cal, t): torch.zeros(3, dtype=torch.float64)
        for score, grid in grids.items()
        for cal in (False, True)
        for t in grid
    }
    static = torch.zeros(3, dtype=torch.float64)
    st.model.train()
    with torch.no_grad(), bn_statistics_frozen(st.model):
        for _ in range(args.batches):
            src, tgt = st.source.next(), st.target.next()
            _, _, f_s, f_t = st.forward_pair(src["image"], tgt["image"])
            size = f_s.shape[2:]
            y_s = bida.downsample_labels(src["label"], size)
            gt = bida.downsample_labels(tgt["gt"], size)
            static += torch.tensor(
                bida.pseudo_label_counts(bida.downsample_labels(tgt["label"], size), gt), dtype=torch.float64
            )
            rho_s, pres_s = bida.class_prototypes(f_s.float(), y_s, 19)
            protos = {False: rho_s, True: st.memory.calibrate(rho_s)}
            for (score, cal, t), c in counts.items():
                lab = bida.dynamic_pseudo_labels(f_t.float(), protos[cal], pres_s, t, score=score, tau=tau)
                c += torch.tensor(bida.pseudo_label_counts(lab, gt), dtype=torch.float64)

    def stats(c: torch.Tensor) -> dict:
        labelled, correct, valid = c.tolist()
        return {"density": labelled / valid if valid else 0.0, "accuracy": correct / labelled if labelled else None}

    static_stats = stats(static)
    rows = [{"score": s, "calibrated": cal, "T": t, **stats(c)} for (s, cal, t), c in counts.items()]
    chosen = {}
    for score in grids:
        ok = [
            r
            for r in rows
            if r["score"] == score
            and r["calibrated"]
            and r["accuracy"] is not None
            and r["accuracy"] >= static_stats["accuracy"]
        ]
        chosen[score] = min(ok, key=lambda r: r["T"]) if ok else None
    result = {
        "command": command,
        "checkpoint": str(args.checkpoint),
        "machine": describe_machine(),
        "batches": args.batches,
        "config": {
            "tau": tau,
            "dynamic_threshold": cfg.method.dynamic_threshold,
            "dynamic_score": cfg.method.dynamic_score,
        },
        "static": static_stats,
        "rows": rows,
        "rule": "smallest T whose calibrated dynamic labels are at least as accurate as the static labels",
        "chosen": chosen,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Dynamic-label threshold T (Eq. 8): density and accuracy on the synthetic proxy ({cfg.preset})",
        "",
        f"Command: `{command}`.",
        "",
        machine_markdown(result["machine"]),
        "",
        f"Static labels on the same crops: density {100 * static_stats['density']:.1f} %, accuracy "
        f"{100 * (static_stats['accuracy'] or 0):.1f} %. Rule: {result['rule']}.",
        "",
        "| score | T | density w/o cal. (%) | accuracy w/o cal. (%) | density w/ cal. (%) | accuracy w/ cal. (%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}"

    for score, grid in grids.items():
        for t in grid:
            raw = next(r for r in rows if r["score"] == score and not r["calibrated"] and r["T"] == t)
            cal = next(r for r in rows if r["score"] == score and r["calibrated"] and r["T"] == t)
            lines.append(
                f"| {score} | {t} | {pct(raw['density'])} | {pct(raw['accuracy'])} | {pct(cal['density'])} | {pct(cal['accuracy'])} |"
            )
    lines += [
        "",
        "Chosen by the rule: " + ", ".join(f"{s}: T = {c['T'] if c else 'none'}" for s, c in chosen.items()),
        "",
    ]
    (args.out / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
