"""Table 3 / Table 4 of the paper on the embedded synthetic benchmark, over several seeds of data and training (CPU).

Per seed S (the synthetic data and the training both use S), for a preset (``--preset``):
- source-only and target-trained (oracle) models, same recipe (the oracle for ``stages.oracle_iters``, by default as
  long as source-only): the domain gap;
- AdaBN, for presets that train BN (``synth2real``): the source-only weights with BN statistics re-estimated on
  target-train images (no training). Frozen-BN presets (``synth2real_paper``, the paper's regime) compute no target
  statistics anywhere, so they have no such row: their adaptation starts from the source-only model itself;
- the five Table 3 rows (L_base; +FCL; +FCL+BCL; +dynamic labels w/o calibration; w/ calibration), each adapting
  the same source-only checkpoint;
- the regime of the proxy: accuracy and density of the static labels the adaptation trains on first (round 0),
  against target-train ground truth that training never sees;
- Table 4 (label density / accuracy during the full model's adaptation) and the feature diagnostics
  (``dass_train/diagnostics.py``) of every row and of the source-only model.

    python benchmarks/synth_tables.py                       # synth2real, seeds 0,1,2; resumes where it stopped
    python benchmarks/synth_tables.py --preset synth2real_paper --seeds 0,1,2
    python benchmarks/synth_tables.py --seeds 3 --parallel 1 stages.adapt_iters=600

Resumable: finished stages are reused (runs/tables[-<preset>]-seed<S>/), a finished seed writes
benchmarks/results/<name>/seed<S>.json and is skipped on a rerun; the summary (<name>.json / .md, one diagnostics
plot per row) is rebuilt from every seed file present. <name> is table3_seeds for synth2real, table3_paper_regime
for synth2real_paper (``--results-name``). mIoU is measured once at the end of each stage (last iterate: no
checkpoint is picked on target labels). Rows are compared paired by seed: the mean difference with its 95 %
Student-t confidence interval; a difference counts only where the interval excludes 0.
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

import numpy as np

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
RESULTS_NAMES = {"synth2real": "table3_seeds", "synth2real_paper": "table3_paper_regime"}
#: two-sided 95 % quantiles of Student's t by degrees of freedom (n - 1 paired seeds); 1.96 beyond the table
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


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
def seed_runs(preset: str, seed: int, runs_root: str | None) -> Path:
    """runs/tables[-<preset>]-seed<S>: one folder per preset and seed (other scripts reuse its checkpoints)."""
    folder = "tables" if preset == "synth2real" else f"tables-{preset.removeprefix('synth2real_')}"
    return Path(runs_root or REPO / "runs") / f"{folder}-seed{seed}"


def seed_data(seed: int) -> str:
    """The override that gives seed S its own synthetic data folder, data/synthetic-seed<S> (overrides may move it)."""
    return f"data.synthetic_root=data/synthetic-seed{seed}"


def seed_arguments(seed: int, runs: Path, overrides: list[str], parallel: int) -> list[str]:
    """The overrides every run of a seed gets: its seed, folder and data; one thread each when runs share cores."""
    common = [f"run.seed={seed}", f"run.out={runs}", "run.progress=false", "run.val_every=0", seed_data(seed)]
    common += overrides
    return [*common, "run.threads=1"] if parallel > 1 else common


def synthesize(preset: str, seed: int, runs: Path, overrides: list[str]) -> None:
    """Generate the seed's synthetic data (a no-op when it exists)."""
    runs.mkdir(parents=True, exist_ok=True)
    run(["synthesize", "--preset", preset, f"run.seed={seed}", seed_data(seed), *overrides], runs / "synthesize.log")


def run_stage(preset: str, runs: Path, name: str, stage_name: str, common: list[str], extra: list[str]) -> Path:
    """Run one stage of one seed into runs/<name>/<stage_name> unless its summary says it finished (resumable)."""
    out = runs / name / stage_name
    summary = runs / name / "summary.json"
    finished = summary.is_file() and stage_name in json.loads(summary.read_text())["stages"]
    if not finished:  # a rerun reuses finished stages
        run(
            [preset, "--name", name, "--exist-ok", "--stage", stage_name, *common, *extra],
            runs / f"{name}-{stage_name}.log",
        )
    return out


def row_arguments(row: int, init: Path) -> list[str]:
    """The adapt stage of Table 3 row ``row`` (0 = L_base ... 4 = BiDA), from the source-only checkpoint ``init``."""
    return [f"--init={init}", *ROWS[row][1]]


def run_seed(seed: int, args: argparse.Namespace, command: str) -> dict:
    runs = seed_runs(args.preset, seed, args.runs)
    common = seed_arguments(seed, runs, args.overrides, args.parallel)
    start = time.perf_counter()

    def stage(name: str, stage_name: str, extra: list[str]) -> Path:
        return run_stage(args.preset, runs, name, stage_name, common, extra)

    synthesize(args.preset, seed, runs, args.overrides)  # once, before parallel runs could race on it
    with ThreadPoolExecutor(args.parallel) as pool:
        src_future = pool.submit(stage, "source_only", "source_only", [])
        oracle_future = pool.submit(stage, "oracle", "oracle", [])
        src_dir = src_future.result()
        init = src_dir / "last.pt"
        row_futures = [pool.submit(stage, f"row{i}", "adapt", row_arguments(i, init)) for i in range(len(ROWS))]
        oracle_dir = oracle_future.result()
        row_dirs = [f.result() for f in row_futures]

    source, oracle = final_metrics(src_dir), final_metrics(oracle_dir)
    result = {
        "seed": seed,
        "preset": args.preset,
        "command": command,
        "machine": describe_machine(),
        "source_only": {"miou": source["miou"], "iou": source["iou"]},
        "oracle": {"miou": oracle["miou"], "iou": oracle["iou"]},
        "adabn": adabn_miou(init, seed, args, runs) if trains_bn(args) else None,
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
        "minutes": (time.perf_counter() - start) / 60,  # this invocation (a resumed seed: only what was left)
        "stage_minutes": {  # each run's own time, as its summary.json recorded it (whichever invocation ran it)
            name: json.loads((d.parent / "summary.json").read_text())["stages"][d.name]["minutes"]
            for name, d in [("source_only", src_dir), ("oracle", oracle_dir)]
            + [(f"row{i}", d) for i, d in enumerate(row_dirs)]
        },
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
            args.preset,
            "--target-bn",
            f"run.seed={seed}",
            *args.overrides,
        ],
        log,
    )
    line = [ln for ln in log.read_text().splitlines() if ": mIoU " in ln][-1]
    return float(line.split(": mIoU ")[1].split()[0]) / 100


def target_train_labelled(preset: str, seed: int, overrides: list[str]):
    """The seed's target-train split with its ground truth (which training never sees), in the order and with the
    names the static-label pass wrote its labels under."""
    from dass_train.config import build_config
    from dass_train.data.domains import target_dataset

    cfg = build_config(preset, [f"run.seed={seed}", seed_data(seed), *overrides])
    return target_dataset(cfg, "train", None, with_labels=True, seed=seed + 1)


def static_label_confusion(round_dir: Path, dataset) -> tuple[np.ndarray, np.ndarray]:
    """One round of static labels against ground truth, at full label resolution: ``[K+1, K]`` counts of labelled
    pixels (rows = ground truth, the last row where it is ignored; columns = the pseudo label) and ``[K]`` ground-truth
    pixels per class."""
    from PIL import Image

    from dass_train.labels import IGNORE_INDEX, NUM_CLASSES
    from dass_train.pseudo_labels import label_path

    k = NUM_CLASSES
    conf = np.zeros((k + 1, k), dtype=np.int64)
    gt_pixels = np.zeros(k, dtype=np.int64)
    for i, name in enumerate(dataset.names):
        pseudo = np.asarray(Image.open(label_path(round_dir, name))).astype(np.int64)
        gt = np.asarray(dataset.load_label(i)).astype(np.int64)
        gt = np.where(gt == IGNORE_INDEX, k, gt)
        gt_pixels += np.bincount(gt.ravel(), minlength=k + 1)[:k]
        labelled = pseudo != IGNORE_INDEX
        conf += np.bincount(gt[labelled] * k + pseudo[labelled], minlength=(k + 1) * k).reshape(k + 1, k)
    return conf, gt_pixels


def label_accuracy_density(conf: np.ndarray, gt_pixels: np.ndarray) -> tuple[float, float]:
    """Accuracy (correct / labelled) and density (labelled / labelled-ground-truth pixels), both where the ground
    truth has a class, from ``static_label_confusion``."""
    judged = conf[: conf.shape[1]]
    return float(np.trace(judged) / max(judged.sum(), 1)), float(judged.sum() / max(gt_pixels.sum(), 1))


def static_label_regime(adapt_dir: Path, seed: int, args: argparse.Namespace) -> dict:
    """Accuracy / density of the round-0 static labels (what adaptation trains on first) against target-train
    ground truth, at full label resolution, over all target-train images."""
    ds = target_train_labelled(args.preset, seed, args.overrides)
    accuracy, density = label_accuracy_density(*static_label_confusion(adapt_dir / "pseudo" / "round_00", ds))
    return {"accuracy": accuracy, "density": density, "images": len(ds.names)}


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


def trains_bn(args: argparse.Namespace) -> bool:
    """Whether the preset trains BN (so AdaBN exists); frozen-BN presets never compute target statistics."""
    from dass_train.config import build_config

    return not build_config(args.preset, args.overrides).model.freeze_bn


# ---------------------------------------------------------------------------------------------------- summary
def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, s


def _seeds(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    return " / ".join(f"{scale * v:.{digits}f}" for v in values)


def pm_text(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    m, s = _mean_std(values)
    return "n/a" if math.isnan(m) else f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def paired_ci(row: list[float], ref: list[float]) -> dict:
    """Paired by seed: mean and sample std of row - ref, its 95 % Student-t interval (None with one seed), n."""
    diffs = [a - b for a, b in zip(row, ref, strict=True)]
    m, s = _mean_std(diffs)
    n = len(diffs)
    if n < 2:
        return {"mean": m, "std": None, "ci95": None, "n": n}
    half = T975.get(n - 1, 1.96) * s / math.sqrt(n)
    return {"mean": m, "std": s, "ci95": [m - half, m + half], "n": n}


def ci_text(p: dict) -> tuple[str, str]:
    """'+1.23 [+0.40, +2.06]' and the verdict: counts only where the interval excludes 0."""
    if p["ci95"] is None:
        return f"{100 * p['mean']:+.2f}", "n/a (one seed)"
    lo, hi = p["ci95"]
    verdict = "**yes**" if lo > 0 or hi < 0 else "no (CI contains 0)"
    return f"{100 * p['mean']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]", verdict


def machines_markdown(seeds: list[dict]) -> list[str]:
    """One line per distinct machine paragraph, naming its seeds; seed files of any record shape (the first seeds
    were stored before ``describe_machine``, and took an hour each: they are read as they are)."""
    by_text: dict[str, list[int]] = {}
    for r in seeds:
        by_text.setdefault(machine_markdown(r.get("machine")), []).append(r["seed"])
    return [f"Seeds {ids}: {text}" for text, ids in by_text.items()]


def summarize(out: Path, results_name: str = "table3_seeds") -> dict | None:
    seeds = sorted(
        (json.loads(p.read_text()) for p in (out / results_name).glob("seed*.json")), key=lambda r: r["seed"]
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
    trained_bn = all(r.get("adabn") is not None for r in seeds)
    start_name, start = ("AdaBN", summary["adabn"]) if trained_bn else ("source-only", summary["source_only"])
    row_names = [n for n, _ in ROWS]
    pairs = []
    previous_name, previous = start_name, start  # L_base's previous row is the adaptation start
    for row in summary["rows"]:
        pairs.append({"row": row["row"], "vs": previous_name, **paired_ci(row["miou"], previous)})
        if row["row"] != row_names[0] and previous_name != row_names[0]:
            pairs.append({"row": row["row"], "vs": row_names[0], **paired_ci(row["miou"], summary["rows"][0]["miou"])})
        previous_name, previous = row["row"], row["miou"]
    best_row = [max(r["rows"][i]["miou"] for i in range(len(ROWS))) for r in seeds]
    summary["paired"] = pairs
    summary["regime"] = {
        "adapt_start": start_name,
        "ratio_adapt_start_to_oracle": [a / o for a, o in zip(start, summary["oracle"], strict=True)],
        "oracle_minus_L_base": [o - b for o, b in zip(summary["oracle"], summary["rows"][0]["miou"], strict=True)],
        "oracle_above_every_row": [o > b for o, b in zip(summary["oracle"], best_row, strict=True)],
    }
    (out / f"{results_name}.json").write_text(json.dumps(summary, indent=1) + "\n")

    regime = summary["regime"]
    preset = seeds[0].get("preset", "synth2real")
    lines = [
        f"# Table 3 / Table 4 on the synthetic benchmark ({preset}), over seeds",
        "",
        f"Seeds {summary['seeds']}; each seed regenerates the data and retrains everything. Commands: "
        + "; ".join(f"`{c}`" for c in summary["commands"]),
        *machines_markdown(seeds),
        "mIoU (19 classes, %) on synthetic target val, last iterate, mean ± sample std over seeds.",
        "",
        "## Regime of the proxy",
        "",
        "| figure | per seed | mean ± std | required |",
        "|---|---|---:|---:|",
        f"| static labels (round 0) accuracy, % | {_seeds(summary['static_labels']['accuracy'], 100, 1)} | "
        f"{pm_text(summary['static_labels']['accuracy'], digits=1)} | >= 90 |",
        f"| static labels (round 0) density, % | {_seeds(summary['static_labels']['density'], 100, 1)} | "
        f"{pm_text(summary['static_labels']['density'], digits=1)} | >= 15 |",
        f"| source-only / oracle mIoU | {_seeds(summary['ratio_source_only_to_oracle'], 1, 2)} | "
        f"{pm_text(summary['ratio_source_only_to_oracle'], 1.0, 3)} | |",
        f"| adaptation start ({start_name}) / oracle | {_seeds(regime['ratio_adapt_start_to_oracle'], 1, 2)} | "
        f"{pm_text(regime['ratio_adapt_start_to_oracle'], 1.0, 3)} | 0.45 - 0.70 |",
        f"| oracle - L_base, points | {_seeds(regime['oracle_minus_L_base'], 100, 2)} | "
        f"{pm_text(regime['oracle_minus_L_base'])} | >= 5 on average |",
        f"| oracle above every adapted row | {' / '.join('yes' if v else '**no**' for v in regime['oracle_above_every_row'])}"
        " | | every seed |",
        "",
        "## Table 3",
        "",
        "Differences are paired by seed: mean [95 % Student-t confidence interval], in mIoU points; a difference "
        f"counts only where the interval excludes 0. L_base's previous row is the adaptation start ({start_name}).",
        "",
        "| model | per seed | mean ± std | vs previous row | counts? | vs L_base | counts? |",
        "|---|---|---:|---:|---|---:|---|",
        f"| source-only | {_seeds(summary['source_only'])} | {pm_text(summary['source_only'])} | | | | |",
        f"| target-trained (oracle) | {_seeds(summary['oracle'])} | {pm_text(summary['oracle'])} | | | | |",
    ]
    if trained_bn:
        lines.append(
            f"| source-only + target BN statistics (AdaBN, no training) | {_seeds(summary['adabn'])} | "
            f"{pm_text(summary['adabn'])} | | | | |"
        )
    by_pair = {(q["row"], q["vs"]): q for q in pairs}
    previous_name = start_name
    for row in summary["rows"]:
        prev_diff, prev_verdict = ci_text(by_pair[(row["row"], previous_name)])
        base = by_pair.get((row["row"], row_names[0])) if row["row"] != row_names[0] else None
        base_diff, base_verdict = ci_text(base) if base else ("", "")
        lines.append(
            f"| {row['row']} | {_seeds(row['miou'])} | {pm_text(row['miou'])} | {prev_diff} | {prev_verdict} | "
            f"{base_diff} | {base_verdict} |"
        )
        previous_name = row["row"]
    lines += [
        "",
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
        lines.append(f"| {label} | {pm_text(t['density'], digits=1)} | {pm_text(t['accuracy'], digits=1)} |")
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
        lines.append(f"| {name} | " + " | ".join(pm_text(d[m], 1.0, 3) for m in DIAG) + " |")
    lines.append("")
    (out / f"{results_name}.md").write_text("\n".join(lines))
    plot_diagnostics(seeds, out / results_name)
    return summary


def plot_diagnostics(seeds: list[dict], folder: Path) -> None:
    """One PNG per Table 3 row: per-class diagnostics of the row against the source-only model (seed mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    p.add_argument("--preset", default="synth2real", help="synth2real (domain BN) or synth2real_paper (frozen BN)")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default 0,1,2)")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (each gets run.threads=1 when > 1)")
    p.add_argument("--runs", default=None, help="folder of the run folders (default runs/)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--results-name", default=None, help="results name (default: table3_seeds / table3_paper_regime)")
    p.add_argument("--summary-only", action="store_true", help="only rebuild the summary from the seed files")
    args = p.parse_args(argv)
    name = args.results_name or RESULTS_NAMES.get(args.preset, f"table3_{args.preset}")
    out = Path(args.out)
    (out / name).mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        for seed in (int(s) for s in args.seeds.split(",") if s.strip()):
            seed_file = out / name / f"seed{seed}.json"
            if seed_file.is_file():
                print(f"seed {seed}: done ({seed_file}), skipped")
                continue
            preset = [] if args.preset == "synth2real" else ["--preset", args.preset]
            words = [*preset, "--seeds", str(seed), "--parallel", str(args.parallel), *args.overrides]
            command = "python benchmarks/synth_tables.py " + " ".join(shlex.quote(w) for w in words)
            result = run_seed(seed, args, command)
            seed_file.write_text(json.dumps(result, indent=1) + "\n")
            print(f"seed {seed}: written {seed_file} ({result['minutes']:.0f} min)")
            summarize(out, name)
    summary = summarize(out, name)
    if summary is not None:
        print((out / f"{name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
