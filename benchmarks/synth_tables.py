"""Table 3 / Table 4 of the paper on the embedded synthetic benchmark, over several seeds of data and training (CPU).

Per seed S (the synthetic data and the training both use S):
- source-only and target-trained (oracle) models, same recipe and iterations: the domain gap;
- AdaBN: the source-only weights with BN statistics re-estimated on target-train images (no training);
- the five Table 3 rows (L_base; +FCL; +FCL+BCL; +dynamic labels w/o calibration; w/ calibration), each adapting
  the same source-only checkpoint;
- the regime of the proxy: accuracy and density of the static labels the adaptation trains on first (round 0),
  against target-train ground truth that training never sees;
- Table 4 (label density / accuracy during the full model's adaptation) and the feature diagnostics
  (``dass_train/diagnostics.py``) of every row and of the source-only model.

    python benchmarks/synth_tables.py                       # seeds 0,1,2; resumes where it stopped
    python benchmarks/synth_tables.py --seeds 3 --parallel 1 stages.adapt_iters=600

Resumable: finished stages are reused (runs/tables-seed<S>/), a finished seed writes
benchmarks/results/table3_seeds/seed<S>.json and is skipped on a rerun; the summary (table3_seeds.json / .md, one
diagnostics plot per row) is rebuilt from every seed file present. mIoU is measured once at the end of each stage
(last iterate: no checkpoint is picked on target labels).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(REPO))

from dass_deploy.machine import describe_machine, machine_markdown  # noqa: E402

ROWS = [  # (name, overrides) in the order of Table 3
    ("L_base", ["method.use_fcl=false", "method.use_bcl=false", "method.dynamic_labels=off"]),
    ("+ L_FC", ["method.use_fcl=true", "method.use_bcl=false", "method.dynamic_labels=off"]),
    ("+ L_FC + L_BC", ["method.use_fcl=true", "method.use_bcl=true", "method.dynamic_labels=off"]),
    ("+ y_D (w/o cal.)", ["method.use_fcl=true", "method.use_bcl=true", "method.dynamic_labels=uncalibrated"]),
    ("+ y_D (w/ cal.) = BiDA", ["method.use_fcl=true", "method.use_bcl=true", "method.dynamic_labels=calibrated"]),
]
PAPER_ROWS = [49.5, 51.2, 53.5, 55.3, 57.1]  # GTA5 -> Cityscapes, ResNet-101 (Table 3)
DIAG = ("own_sim", "margin", "spread", "proto_cos")


def run(args: list[str], log: Path) -> None:
    cmd = [sys.executable, "-m", "dass_train", *args]
    with open(log, "w") as fh:
        fh.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): see {log}")


def final_metrics(stage_dir: Path) -> dict:
    from dass_train.checkpoint import load_checkpoint

    return load_checkpoint(stage_dir / "last.pt")["meta"]["metrics"]


# ---------------------------------------------------------------------------------------------------- one seed
def run_seed(seed: int, args: argparse.Namespace, command: str) -> dict:
    runs = Path(args.runs or REPO / "runs") / f"tables-seed{seed}"
    runs.mkdir(parents=True, exist_ok=True)
    data = f"data.synthetic_root=data/synthetic-seed{seed}"  # one data folder per seed (overrides may move it)
    common = [f"run.seed={seed}", f"run.out={runs}", "run.progress=false", "run.val_every=0", data, *args.overrides]
    if args.parallel > 1:
        common.append("run.threads=1")
    start = time.perf_counter()

    def stage(name: str, stage_name: str, extra: list[str]) -> Path:
        out = runs / name / stage_name
        summary = runs / name / "summary.json"
        finished = summary.is_file() and stage_name in json.loads(summary.read_text())["stages"]
        if not finished:  # a rerun reuses finished stages
            run(
                ["synth2real", "--name", name, "--exist-ok", "--stage", stage_name, *common, *extra],
                runs / f"{name}-{stage_name}.log",
            )
        return out

    # the synthetic data is generated once, before parallel runs could race on it
    run(["synthesize", f"run.seed={seed}", data, *args.overrides], runs / "synthesize.log")
    with ThreadPoolExecutor(args.parallel) as pool:
        src_future = pool.submit(stage, "source_only", "source_only", [])
        oracle_future = pool.submit(stage, "oracle", "oracle", ["stages.oracle_iters=" + _iters(args, "source_only")])
        src_dir = src_future.result()
        init = src_dir / "last.pt"
        row_futures = [
            pool.submit(stage, f"row{i}", "adapt", [f"--init={init}", *over]) for i, (_, over) in enumerate(ROWS)
        ]
        oracle_dir = oracle_future.result()
        row_dirs = [f.result() for f in row_futures]

    source, oracle = final_metrics(src_dir), final_metrics(oracle_dir)
    result = {
        "seed": seed,
        "command": command,
        "machine": describe_machine(),
        "source_only": {"miou": source["miou"], "iou": source["iou"]},
        "oracle": {"miou": oracle["miou"], "iou": oracle["iou"]},
        "adabn": adabn_miou(init, seed, args, runs),
        "rows": [
            {"row": name, "miou": final_metrics(d)["miou"], "iou": final_metrics(d)["iou"]}
            for (name, _), d in zip(ROWS, row_dirs, strict=True)
        ],
        "static_labels": static_label_regime(row_dirs[-1], seed, args),
        "table4": json.loads((row_dirs[-1] / "label_stats.json").read_text()),
        "diagnostics": {
            "source_only": source_only_diagnostics(init),
            **{
                name: json.loads((d / "diagnostics.json").read_text())
                for (name, _), d in zip(ROWS, row_dirs, strict=True)
            },
        },
        "minutes": (time.perf_counter() - start) / 60,
    }
    return result


def adabn_miou(ckpt: Path, seed: int, args: argparse.Namespace, runs: Path) -> float:
    """Source-only weights with BN statistics re-estimated on target-train images (what domain BN alone gives)."""
    log = runs / "source_only-adabn.log"
    run(
        [
            "eval",
            "--checkpoint",
            str(ckpt),
            "--preset",
            "synth2real",
            "--target-bn",
            f"run.seed={seed}",
            *args.overrides,
        ],
        log,
    )
    line = [ln for ln in log.read_text().splitlines() if ": mIoU " in ln][-1]
    return float(line.split(": mIoU ")[1].split()[0]) / 100


def static_label_regime(adapt_dir: Path, seed: int, args: argparse.Namespace) -> dict:
    """Accuracy / density of the round-0 static labels (what adaptation trains on first) against target-train
    ground truth, at full label resolution, over all target-train images."""
    import numpy as np
    from PIL import Image

    from dass_train.config import build_config
    from dass_train.data.domains import target_dataset
    from dass_train.labels import IGNORE_INDEX
    from dass_train.pseudo_labels import label_path

    cfg = build_config(
        "synth2real", [f"run.seed={seed}", f"data.synthetic_root=data/synthetic-seed{seed}", *args.overrides]
    )
    ds = target_dataset(cfg, "train", None, with_labels=True, seed=seed + 1)
    labelled = correct = valid = 0
    for i, name in enumerate(ds.names):
        pseudo = np.asarray(Image.open(label_path(adapt_dir / "pseudo" / "round_00", name)))
        gt = np.asarray(ds.load_label(i))
        ok = gt != IGNORE_INDEX
        lab = ok & (pseudo != IGNORE_INDEX)
        labelled += int(lab.sum())
        correct += int((lab & (pseudo == gt)).sum())
        valid += int(ok.sum())
    return {"accuracy": correct / max(labelled, 1), "density": labelled / max(valid, 1), "images": len(ds.names)}


def source_only_diagnostics(ckpt: Path) -> dict:
    import torch

    from dass_train.checkpoint import load_checkpoint
    from dass_train.config import config_from_dict
    from dass_train.diagnostics import feature_diagnostics
    from dass_train.engine import build_model

    payload = load_checkpoint(ckpt)
    cfg = config_from_dict(payload["meta"]["config"])
    model = build_model(cfg, torch.device("cpu"))
    model.load_state_dict(payload["model"])
    return feature_diagnostics(model, cfg, payload["meta"]["normalization"], torch.device("cpu"))


def _iters(args: argparse.Namespace, stage_name: str) -> str:
    from dass_train.config import build_config

    cfg = build_config("synth2real", args.overrides)
    return str(cfg.stages.source_only_iters if stage_name == "source_only" else cfg.stages.adapt_iters)


# ---------------------------------------------------------------------------------------------------- summary
def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, s


def _pm(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    m, s = _mean_std(values)
    return "n/a" if math.isnan(m) else f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def machines_markdown(seeds: list[dict]) -> list[str]:
    """One line per distinct machine paragraph, naming its seeds; seed files of any record shape (the first seeds
    were stored before ``describe_machine``, and took an hour each: they are read as they are)."""
    by_text: dict[str, list[int]] = {}
    for r in seeds:
        by_text.setdefault(machine_markdown(r.get("machine")), []).append(r["seed"])
    return [f"Seeds {ids}: {text}" for text, ids in by_text.items()]


def summarize(out: Path) -> dict | None:
    seeds = sorted(
        (json.loads(p.read_text()) for p in (out / "table3_seeds").glob("seed*.json")), key=lambda r: r["seed"]
    )
    if not seeds:
        return None
    from dass_train.labels import CLASS_NAMES

    summary = {
        "seeds": [r["seed"] for r in seeds],
        "source_only": [r["source_only"]["miou"] for r in seeds],
        "oracle": [r["oracle"]["miou"] for r in seeds],
        "adabn": [r["adabn"] for r in seeds],
        "rows": [{"row": name, "miou": [r["rows"][i]["miou"] for r in seeds]} for i, (name, _) in enumerate(ROWS)],
        "static_labels": {
            "accuracy": [r["static_labels"]["accuracy"] for r in seeds],
            "density": [r["static_labels"]["density"] for r in seeds],
        },
        "ratio_source_only_to_oracle": [r["source_only"]["miou"] / r["oracle"]["miou"] for r in seeds],
        "table4": {
            key: {
                "density": [r["table4"][key]["density"] for r in seeds],
                "accuracy": [r["table4"][key]["accuracy"] for r in seeds],
            }
            for key in ("static", "dyn_raw", "dyn_cal", "hybrid")
        },
        "diagnostics": {
            name: {m: [r["diagnostics"][name][m]["mean"] for r in seeds] for m in DIAG}
            for name in ["source_only", *(n for n, _ in ROWS)]
        },
        "commands": sorted({r["command"] for r in seeds}),
        "machines": [r["machine"] for r in seeds],
    }
    (out / "table3_seeds.json").write_text(json.dumps(summary, indent=1) + "\n")

    lines = [
        "# Table 3 / Table 4 on the synthetic benchmark, over seeds",
        "",
        f"Seeds {summary['seeds']}; each seed regenerates the data and retrains everything. Commands: "
        + "; ".join(f"`{c}`" for c in summary["commands"]),
        *machines_markdown(seeds),
        "mIoU (19 classes, %) on synthetic target val, last iterate, mean ± sample std over seeds.",
        "",
        "## Regime of the proxy",
        "",
        "| figure | value | required |",
        "|---|---:|---:|",
        f"| static labels (round 0) accuracy, % | {_pm(summary['static_labels']['accuracy'], digits=1)} | >= 90 |",
        f"| static labels (round 0) density, % | {_pm(summary['static_labels']['density'], digits=1)} | >= 15 |",
        f"| source-only / target-trained mIoU | {_pm(summary['ratio_source_only_to_oracle'], 1.0, 3)} | 0.45 - 0.70 |",
        "",
        "## Table 3",
        "",
        "| model | mIoU | vs previous row (paired) | counts? | vs L_base (paired) | counts? |",
        "|---|---:|---:|---|---:|---|",
        f"| source-only | {_pm(summary['source_only'])} | | | | |",
        f"| target-trained (oracle) | {_pm(summary['oracle'])} | | | | |",
        f"| source-only + target BN statistics (AdaBN, no training) | {_pm(summary['adabn'])} | | | | |",
    ]

    def paired(row: list[float], ref: list[float]) -> tuple[str, str]:
        """Mean ± std of the per-seed differences, and whether the mean exceeds the larger seed std of the two."""
        m, s = _mean_std([a - b for a, b in zip(row, ref, strict=True)])
        if len(seeds) < 2:
            return f"{100 * m:+.2f}", "n/a (one seed: no spread yet)"
        spread = max(_mean_std(row)[1], _mean_std(ref)[1])
        return f"{100 * m:+.2f} ± {100 * s:.2f}", "yes" if abs(m) > spread else "no (within seed spread)"

    base = summary["rows"][0]["miou"]
    previous = summary["adabn"]  # L_base's previous row: the adaptation start (AdaBN), so it shows self-training
    for row in summary["rows"]:
        prev_diff, prev_verdict = paired(row["miou"], previous)
        base_diff, base_verdict = ("", "") if row is summary["rows"][0] else paired(row["miou"], base)
        lines.append(
            f"| {row['row']} | {_pm(row['miou'])} | {prev_diff} | {prev_verdict} | {base_diff} | {base_verdict} |"
        )
        previous = row["miou"]
    lines += [
        "",
        "A difference counts only where its mean exceeds the larger seed std of the two rows; L_base's previous row is "
        "AdaBN, the adaptation start. "
        f"Paper (GTA5 -> Cityscapes, ResNet-101): {', '.join(map(str, PAPER_ROWS))}.",
        "",
        "Per-class IoU (%), mean over seeds:",
        "",
        "| model | " + " | ".join(CLASS_NAMES) + " |",
        "|---|" + "---:|" * len(CLASS_NAMES),
    ]

    def per_class(name: str, getter) -> str:
        cols = []
        for c in range(len(CLASS_NAMES)):
            m, _ = _mean_std([getter(r)[c] for r in seeds])
            cols.append("n/a" if math.isnan(m) else f"{100 * m:.1f}")
        return f"| {name} | " + " | ".join(cols) + " |"

    lines.append(per_class("source-only", lambda r: r["source_only"]["iou"]))
    lines.append(per_class("oracle", lambda r: r["oracle"]["iou"]))
    for i, (name, _) in enumerate(ROWS):
        lines.append(per_class(name, lambda r, i=i: r["rows"][i]["iou"]))
    names = {"static": "Static (CBST)", "dyn_raw": "Dyn. (w/o cal.)", "dyn_cal": "Dyn. (w/ cal.)", "hybrid": "Hybrid"}
    lines += [
        "",
        "## Table 4 (full model's adaptation, target-train crops at feature resolution)",
        "",
        "| pseudo labels | density (%) | accuracy (%) |",
        "|---|---:|---:|",
    ]
    for key, label in names.items():
        t = summary["table4"][key]
        lines.append(f"| {label} | {_pm(t['density'], digits=1)} | {_pm(t['accuracy'], digits=1)} |")
    lines += [
        "",
        "Paper (GTA5 -> Cityscapes): 20.1 / 98.5, 22.2 / 98.6, 34.3 / 98.6, 42.3 / 98.8.",
        "",
        "## Feature diagnostics (target val, end of training; `dass_train/diagnostics.py`)",
        "",
        "own_sim: cosine of target pixels to their class's source prototype; margin: over the best other class; "
        "spread: within-class 1 - cos to the target class mean (lower = more compact); proto_cos: source vs target "
        "prototype of the same class. Class means, mean ± std over seeds.",
        "",
        "| model | own_sim | margin | spread | proto_cos |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, d in summary["diagnostics"].items():
        lines.append(f"| {name} | " + " | ".join(_pm(d[m], 1.0, 3) for m in DIAG) + " |")
    lines.append("")
    (out / "table3_seeds.md").write_text("\n".join(lines))
    plot_diagnostics(seeds, out / "table3_seeds")
    return summary


def plot_diagnostics(seeds: list[dict], folder: Path) -> None:
    """One PNG per Table 3 row: per-class diagnostics of the row against the source-only model (seed mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from dass_train.labels import CLASS_NAMES

    def mean_per_class(name: str, metric: str) -> np.ndarray:
        arr = np.array([r["diagnostics"][name][metric]["per_class"] for r in seeds], dtype=float)
        seen = np.isfinite(arr).any(axis=0)  # classes absent from target val in every seed stay NaN (no bar)
        out = np.full(arr.shape[1], np.nan)
        out[seen] = np.nanmean(arr[:, seen], axis=0)
        return out

    x = np.arange(len(CLASS_NAMES))
    for i, (name, _) in enumerate(ROWS):
        fig, axes = plt.subplots(len(DIAG), 1, figsize=(11, 8), sharex=True)
        for ax, metric in zip(axes, DIAG, strict=True):
            ax.bar(x - 0.2, mean_per_class("source_only", metric), 0.4, label="source-only", color="#999999")
            ax.bar(x + 0.2, mean_per_class(name, metric), 0.4, label=name, color="#1f77b4")
            ax.set_ylabel(metric)
            ax.axhline(0, color="black", linewidth=0.5)
        axes[0].legend(loc="upper right", fontsize=8)
        axes[-1].set_xticks(x, CLASS_NAMES, rotation=60, ha="right", fontsize=8)
        fig.suptitle(
            f"Feature diagnostics on target val: {name} vs source-only (mean of seeds {[r['seed'] for r in seeds]})"
        )
        fig.tight_layout()
        fig.savefig(folder / f"diagnostics_row{i}.png", dpi=80)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="extra config overrides for every run (section.key=value)")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default 0,1,2)")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (each gets run.threads=1 when > 1)")
    p.add_argument("--runs", default=None, help="folder of the run folders (default runs/)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--summary-only", action="store_true", help="only rebuild the summary from the seed files")
    args = p.parse_args(argv)
    out = Path(args.out)
    (out / "table3_seeds").mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        for seed in (int(s) for s in args.seeds.split(",") if s.strip()):
            seed_file = out / "table3_seeds" / f"seed{seed}.json"
            if seed_file.is_file():
                print(f"seed {seed}: done ({seed_file}), skipped")
                continue
            words = ["--seeds", str(seed), "--parallel", str(args.parallel), *args.overrides]
            command = "python benchmarks/synth_tables.py " + " ".join(shlex.quote(w) for w in words)
            result = run_seed(seed, args, command)
            seed_file.write_text(json.dumps(result, indent=1) + "\n")
            print(f"seed {seed}: written {seed_file} ({result['minutes']:.0f} min)")
            summarize(out)
    summary = summarize(out)
    if summary is not None:
        print((out / "table3_seeds.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
