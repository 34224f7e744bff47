"""Issue 20's new-camera benchmark: does ``--adapt-bn`` help a model on a camera no training saw, and at what cost?

    python benchmarks/adapt_bn.py                    # seeds 0,1,2; trains missing checkpoints; resumable
    python benchmarks/adapt_bn.py --seeds 0 --models paper-source-only,paper-bida
    python benchmarks/adapt_bn.py --summary-only     # rebuild adapt_bn.{json,md} from the seed files
    python benchmarks/adapt_bn.py --seeds 1 --train-only  # train now, measure later with --no-train when idle

Per seed S:

- **the models** are the checkpoints ``benchmarks/synth_tables.py`` trains for seed S (runs/tables[-paper]-seed<S>/):
  the source-only model and the full BiDA row (Table 3's last) of ``synth2real`` (BN trained, domain BN in
  adaptation: the recipe of the shipped model) and of ``synth2real_paper`` (frozen BN: the paper's regime). A missing
  one is trained here, by the same stages with the same arguments, so either script reuses the other's runs;
  ``--no-train`` refuses instead.
- **the new camera** is ``data.synthetic_style=newcamera`` (``dass_train/data/synthetic.py``, parameters fixed
  before any measurement, docs/ADAPT_BN.md): the target city from a higher, wider camera through a warmer, darker,
  noisier sensor. It is generated with seed 500 + S (``data/newcamera-seed<500+S>``, 256 train frames without
  labels for the adaptation, 100 val images with labels for the score), so its scenes are not the target scenes
  any adaptation trained on.
- **the operation** is the user's: ``open_adapt_frames`` picks N frames spread evenly over the train folder,
  ``adapt_torch_backend`` re-estimates every BN layer one frame per batch at the run size (128x256), exactly as
  ``dass-segment --checkpoint CKPT --adapt-bn SOURCE --adapt-frames N`` does (the population statistics in the
  default number of passes, ``DEFAULT_ADAPT_PASSES``); N = 16, 64, 256. The seconds are that call's wall time
  (reading, resizing and every pass). Two variants of the largest N compare the estimator with the one the CLI
  used before, ``cumulative_bn_statistics`` (the average of per-frame means and variances), fed one frame per
  batch and in batches of 8 (as ``dass-train eval --target-bn`` runs it).
- **the score** is mIoU at the labels' resolution (as ``dass-segment --eval``), on the new camera's val before and
  after, and on the model's own target val (data/synthetic-seed<S>) before and after adapting to the new camera:
  what the user gives up on the old domain.

Each measured model of a seed writes benchmarks/results/adapt_bn/seed<S>-<model>.json (with the command that
remakes exactly that file) and is skipped on a rerun, so the table grows model by model and seed by seed, across
sessions, as the checkpoints appear. The summary (adapt_bn.json / .md) pairs after with before by seed for each model
over the seeds it has (mean difference, Student-t 95 % interval; a change counts only where the interval excludes 0).
Timings are only comparable on an idle machine; the machine is recorded.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_tables import (  # noqa: E402  (one set of stages for both scripts; it puts the repo on sys.path)
    REPO,
    ROWS,
    ci_text,
    paired_ci,
    pm_text,
    row_arguments,
    run,
    run_stage,
    seed_arguments,
    seed_data,
    seed_runs,
    synthesize,
)

from dass_deploy.machine import describe_machine, machine_key, machine_markdown  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FRAME_COUNTS = (16, 64, 256)
SIZE = (128, 256)  # (H, W): the size the synthetic models are evaluated and exported at
NEWCAMERA_SEED = 500  # + S: the new camera's scenes are not the target scenes of seed S
NEWCAMERA_COUNTS = "0,256,100"
BIDA_ROW = len(ROWS) - 1
#: key -> (label, preset, run name, stage)
MODELS = {
    "source-only": ("source-only, BN trained (synth2real)", "synth2real", "source_only", "source_only"),
    "bida": ("BiDA, domain BN (synth2real, the shipped recipe)", "synth2real", f"row{BIDA_ROW}", "adapt"),
    "paper-source-only": (
        "source-only, frozen BN (synth2real_paper)",
        "synth2real_paper",
        "source_only",
        "source_only",
    ),
    "paper-bida": ("BiDA, frozen BN (synth2real_paper)", "synth2real_paper", f"row{BIDA_ROW}", "adapt"),
}


# ---------------------------------------------------------------------------------------------------- inputs
def _rel(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def frame_counts(text: str) -> list[int]:
    return sorted({int(c) for c in text.split(",") if c.strip()})


def make_newcamera(seed: int, args: argparse.Namespace, log_dir: Path) -> Path:
    """The new camera's frames (train, no labels used) and val (labels) for seed ``seed``; a no-op when present."""
    root = Path(args.newcamera) / f"newcamera-seed{NEWCAMERA_SEED + seed}"
    log_dir.mkdir(parents=True, exist_ok=True)
    words = ["--counts", args.newcamera_counts, "--out", str(root), "--seed", str(NEWCAMERA_SEED + seed)]
    run(
        ["synthesize", "--preset", "synth2real", *args.overrides, "data.synthetic_style=newcamera", *words],
        log_dir / f"newcamera-seed{seed}.log",
    )
    return root


def target_root(seed: int, overrides: list[str]) -> Path:
    """The seed's synthetic benchmark (whose target val is the old domain): where synth_tables puts it, unless an
    override moves it."""
    key = "data.synthetic_root="
    moved = [o.removeprefix(key) for o in overrides if o.startswith(key)]
    return Path(moved[-1]) if moved else REPO / seed_data(seed).removeprefix(key)


def checkpoint_path(key: str, seed: int, runs_root: str | None) -> Path:
    _, preset, name, stage = MODELS[key]
    return seed_runs(preset, seed, runs_root) / name / stage / "last.pt"


def train_missing(keys: list[str], seed: int, args: argparse.Namespace) -> None:
    """Train the seed's missing checkpoints with synth_tables' stages (same folders and arguments), one chain per
    preset (source-only, then BiDA from it), the chains side by side when ``--parallel`` > 1."""
    presets = sorted({MODELS[k][1] for k in keys if not checkpoint_path(k, seed, args.runs).is_file()})
    if not presets:
        return
    if args.no_train:
        missing = [str(checkpoint_path(k, seed, args.runs)) for k in keys]
        raise SystemExit(f"--no-train: missing {', '.join(missing)} (run benchmarks/synth_tables.py for seed {seed})")

    def chain(preset: str) -> None:
        runs = seed_runs(preset, seed, args.runs)
        common = seed_arguments(seed, runs, args.overrides, args.parallel)
        src = run_stage(preset, runs, "source_only", "source_only", common, [])
        if any(MODELS[k][1] == preset and MODELS[k][2] != "source_only" for k in keys):
            run_stage(preset, runs, f"row{BIDA_ROW}", "adapt", common, row_arguments(BIDA_ROW, src / "last.pt"))

    for preset in presets:  # the data first, before parallel runs could race on it
        synthesize(preset, seed, seed_runs(preset, seed, args.runs), args.overrides)
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        for future in [pool.submit(chain, p) for p in presets]:
            future.result()


# ---------------------------------------------------------------------------------------------------- measuring
def evaluate(seg, root: Path) -> float:
    """mIoU of ``seg`` on ``root``'s Cityscapes-layout val split, at the labels' resolution (``dass-segment --eval``)."""
    from dass_deploy.cli import Evaluator
    from dass_deploy.sources import read_image
    from dass_train.metrics import scores

    images = sorted((root / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"))
    evaluator = Evaluator(root / "cityscapes" / "gtFine" / "val", seg.num_classes)
    for start in range(0, len(images), 8):
        chunk = images[start : start + 8]
        for path, labels in zip(chunk, seg.predict_batch([read_image(p) for p in chunk]), strict=True):
            evaluator.add(path, labels)
    return float(scores(evaluator.conf)["miou"])


def read_frames(frames_spec: str, count: int) -> list:
    """The ``count`` frames ``--adapt-bn`` would use, as the model sees them (``FrameFeed``: ``float32 [1,3,H,W]``)."""
    from dass_deploy.adapt_bn import FrameFeed
    from dass_deploy.adapt_frames import open_adapt_frames

    return list(FrameFeed(open_adapt_frames(frames_spec, count), SIZE, progress=False, passes=1))


def per_frame_average(backend, frames: list, batch: int) -> None:
    """The variants: the estimator the CLI used before (``cumulative_bn_statistics``: the average of the batch means
    and of the batch variances) on ``frames`` (``read_frames``) in batches of ``batch``."""
    import numpy as np

    from dass_train.bn_statistics import batchnorm_layers, cumulative_bn_statistics

    batches = [backend.prepare(np.concatenate(frames[i : i + batch])) for i in range(0, len(frames), batch)]
    layers = list(batchnorm_layers(backend.network, include_frozen=True).values())
    cumulative_bn_statistics(backend.network, batches, layers)


def measure_model(key: str, ckpt: Path, seed: int, newcam: Path, target: Path, counts: list[int]) -> dict:
    from dass_deploy.adapt_bn import adapt_torch_backend, bn_training
    from dass_deploy.adapt_frames import open_adapt_frames
    from dass_deploy.segmenter import Segmenter
    from dass_train.checkpoint import file_sha256

    seg = Segmenter(str(ckpt), backend="torch", size=SIZE)
    network = seg.backend.network
    original = {k: v.clone() for k, v in network.state_dict().items()}
    frames_spec = str(newcam / "cityscapes" / "leftImg8bit" / "train")
    label, preset, _, _ = MODELS[key]
    row = {
        "model": key,
        "label": label,
        "preset": preset,
        "bn": bn_training(seg.backend.checkpoint_meta),
        # where the recorded command (no --runs) finds it; the sha256 says which file it was wherever it lay
        "checkpoint": _rel(checkpoint_path(key, seed, None)),
        "sha256": file_sha256(ckpt),
        "before": {"newcamera": evaluate(seg, newcam), "target": evaluate(seg, target)},
        "adapted": [],
    }
    for count in counts:
        network.load_state_dict(original)
        start = time.perf_counter()
        adaptation = adapt_torch_backend(seg.backend, open_adapt_frames(frames_spec, count), SIZE, progress=False)
        seconds = time.perf_counter() - start
        row["adapted"].append(
            {
                "frames": adaptation.record["frames"],
                "seconds": seconds,
                "newcamera": evaluate(seg, newcam),
                "target": evaluate(seg, target),
                "shift": adaptation.record["shift"],
                "movement": adaptation.record["movement"],
                "passes": adaptation.record["passes"],
            }
        )
        print(f"  seed {seed} {key}: N={count} new camera {row['adapted'][-1]['newcamera']:.4f} ({seconds:.1f} s)")
    row["passes"] = row["adapted"][-1]["passes"]  # what ran (the CLI's default), as the adaptation record says
    frames = read_frames(frames_spec, counts[-1])
    for name, batch in (("per_frame_average", 1), ("batches_of_8", 8)):
        network.load_state_dict(original)
        per_frame_average(seg.backend, frames, batch)
        row[name] = {"frames": counts[-1], "newcamera": evaluate(seg, newcam)}
    network.load_state_dict(original)
    return row


def result_file(out: Path, seed: int, key: str) -> Path:
    return out / "adapt_bn" / f"seed{seed}-{key}.json"


def command_for(seed: int, key: str, args: argparse.Namespace) -> str:
    """The command that remakes exactly one result file (one seed, one model)."""
    words = ["--seeds", str(seed), "--models", key]
    if frame_counts(args.frames) != list(FRAME_COUNTS):
        words += ["--frames", args.frames]
    if args.newcamera_counts != NEWCAMERA_COUNTS:
        words += ["--newcamera-counts", args.newcamera_counts]
    return "python benchmarks/adapt_bn.py " + " ".join(shlex.quote(w) for w in [*words, *args.overrides])


def prepare_seed(seed: int, keys: list[str], args: argparse.Namespace) -> Path:
    """The seed's new camera and its missing checkpoints (all that ``--train-only`` does); returns the camera."""
    newcam = make_newcamera(seed, args, Path(args.runs or REPO / "runs") / "adapt_bn")
    train_missing(keys, seed, args)
    return newcam


def run_seed(seed: int, keys: list[str], args: argparse.Namespace, out: Path) -> None:
    """Measure ``keys`` for one seed (training what is missing first), one result file per model as it finishes."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    newcam = prepare_seed(seed, keys, args)
    target = target_root(seed, args.overrides)
    counts = frame_counts(args.frames)
    for key in keys:
        start = time.perf_counter()
        row = measure_model(key, checkpoint_path(key, seed, args.runs), seed, newcam, target, counts)
        record = {
            "seed": seed,
            "command": command_for(seed, key, args),
            "machine": describe_machine(),
            "threads": torch.get_num_threads(),
            "size": list(SIZE),
            "frame_counts": counts,
            "newcamera": {"root": _rel(newcam), "seed": NEWCAMERA_SEED + seed, "counts": args.newcamera_counts},
            "target": _rel(target),
            "model": row,
            "minutes": (time.perf_counter() - start) / 60,
        }
        path = result_file(out, seed, key)
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"seed {seed} {key}: written {_rel(path)} ({record['minutes']:.1f} min)")


# ---------------------------------------------------------------------------------------------------- summary
def _diff(p: dict) -> str:
    """synth_tables' paired difference, with whether the adaptation helps or hurts where its interval excludes 0."""
    text, _ = ci_text(p)
    if p["ci95"] is None:
        return f"{text} (one seed)"
    lo, hi = p["ci95"]
    return text + ("" if lo <= 0 <= hi else (" **helps**" if lo > 0 else " **hurts**"))


def summarize(out: Path) -> dict | None:
    """Every result file, grouped by model (in MODELS' order); each model is paired over the seeds it has."""
    records = [json.loads(f.read_text()) for f in sorted((out / "adapt_bn").glob("seed*-*.json"))]
    if not records:
        return None
    stale = [r for r in records if "passes" not in r["model"]]
    if stale:  # measured with the per-frame estimator the CLI had before (benchmarks/results/adapt_bn_per_frame/)
        raise SystemExit(
            f"{out / 'adapt_bn'}: seed {stale[0]['seed']} {stale[0]['model']['model']} predates the "
            "population estimator; move it aside and rerun"
        )
    counts = records[0]["frame_counts"]
    if any(r["frame_counts"] != counts for r in records):
        raise SystemExit(f"{out / 'adapt_bn'}: the result files measured different frame counts; rerun them alike")
    table = []
    for key in MODELS:
        mine = sorted((r for r in records if r["model"]["model"] == key), key=lambda r: r["seed"])
        if not mine:
            continue
        rows = [r["model"] for r in mine]
        before_new = [r["before"]["newcamera"] for r in rows]
        before_old = [r["before"]["target"] for r in rows]
        entry = {
            "model": key,
            "label": rows[0]["label"],
            "bn": sorted({r["bn"] for r in rows}),
            "seeds": [r["seed"] for r in mine],
            "n": len(rows),
            "before": {"newcamera": before_new, "target": before_old},
            "adapted": [],
        }
        for i, count in enumerate(counts):
            new = [r["adapted"][i]["newcamera"] for r in rows]
            old = [r["adapted"][i]["target"] for r in rows]
            entry["adapted"].append(
                {
                    "frames": count,
                    "newcamera": new,
                    "target": old,
                    "seconds": [r["adapted"][i]["seconds"] for r in rows],
                    "newcamera_gain": paired_ci(new, before_new),
                    "target_change": paired_ci(old, before_old),
                }
            )
        cli = [r["adapted"][-1]["newcamera"] for r in rows]
        entry["passes"] = sorted({r["passes"] for r in rows})
        for name in ("per_frame_average", "batches_of_8"):
            old = [r[name]["newcamera"] for r in rows]
            entry[name] = {"newcamera": old, "cli_minus_this": paired_ci(cli, old)}
        table.append(entry)
    summary = {
        "benchmark": "new camera (data.synthetic_style=newcamera), BN statistics re-estimated by --adapt-bn",
        "commands": sorted({r["command"] for r in records}),
        "seeds": sorted({r["seed"] for r in records}),
        "frame_counts": counts,
        "size": list(SIZE),
        "machines": [r["machine"] for r in records],
        "models": table,
    }
    (out / "adapt_bn.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "adapt_bn.md").write_text(markdown(summary))
    return summary


def _table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown section: title, then a table whose first column is the model."""
    return [
        "",
        title,
        "",
        "| model | " + " | ".join(header) + " |",
        "|---|" + "---:|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def markdown(summary: dict) -> str:
    counts, models = summary["frame_counts"], summary["models"]
    per_n = [f"N = {c}" for c in counts]
    lines = [
        "# `--adapt-bn` on a camera no training saw (issue 20)",
        "",
        *(f"    {c}" for c in summary["commands"]),
        "",
        f"Seeds {', '.join(map(str, summary['seeds']))} (each model's own in the first table); mIoU (%) mean ± sd "
        "over seeds at "
        f"{summary['size'][0]}x{summary['size'][1]}; N frames of the new camera's train split, spread evenly, one "
        "frame per batch, population statistics in the CLI's default passes. Differences are paired by seed: mean [95 % Student-t interval]; **helps** / **hurts** only "
        "where the interval excludes 0. docs/ADAPT_BN.md explains the domain and the estimate.",
        *_table(
            "## New camera val",
            ["BN", "seeds", "before", *per_n],
            [
                [
                    m["label"],
                    "/".join(m["bn"]),
                    ",".join(map(str, m["seeds"])),
                    pm_text(m["before"]["newcamera"]),
                    *(pm_text(a["newcamera"]) for a in m["adapted"]),
                ]
                for m in models
            ],
        ),
        *_table(
            "Gain over before:",
            per_n,
            [[m["label"], *(_diff(a["newcamera_gain"]) for a in m["adapted"])] for m in models],
        ),
        *_table(
            "## The old domain: the model's own target val, after adapting to the new camera",
            ["before", *per_n],
            [
                [
                    m["label"],
                    pm_text(m["before"]["target"]),
                    *(f"{pm_text(a['target'])} ({_diff(a['target_change'])})" for a in m["adapted"]),
                ]
                for m in models
            ],
        ),
        *_table(
            f"## The estimator, N = {counts[-1]}, new camera val: the CLI's population statistics against the "
            "average of per-frame statistics (the CLI before), one frame per batch and in batches of 8",
            ["CLI (passes)", "per-frame average", "CLI minus it", "batches of 8", "CLI minus it"],
            [
                [
                    m["label"],
                    f"{pm_text(m['adapted'][-1]['newcamera'])} ({'/'.join(map(str, m['passes']))})",
                    pm_text(m["per_frame_average"]["newcamera"]),
                    _diff(m["per_frame_average"]["cli_minus_this"]),
                    pm_text(m["batches_of_8"]["newcamera"]),
                    _diff(m["batches_of_8"]["cli_minus_this"]),
                ]
                for m in models
            ],
        ),
        *_table(
            "## Cost: seconds of the adaptation call on CPU (reading, resizing, a forward pass per frame and pass)",
            per_n,
            [[m["label"], *(pm_text(a["seconds"], scale=1.0, digits=1) for a in m["adapted"])] for m in models],
        ),
        "",
        "Machines:",
        "",
        *(f"- {machine_markdown(m)}" for m in {machine_key(m): m for m in summary["machines"]}.values()),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides for training missing models (section.key=value)")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default 0,1,2)")
    p.add_argument("--frames", default=",".join(map(str, FRAME_COUNTS)), help="comma list of N (default 16,64,256)")
    p.add_argument("--newcamera", default=str(REPO / "data"), help="folder of the newcamera-seed<500+S> sets")
    p.add_argument("--newcamera-counts", default=NEWCAMERA_COUNTS, help="its source,train,val image counts")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--runs", default=None, help="folder of synth_tables' run folders (default runs/)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--parallel", type=int, default=2, help="training runs at a time for missing checkpoints")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the measurement (default: all)")
    p.add_argument("--no-train", action="store_true", help="refuse instead of training missing checkpoints")
    p.add_argument(
        "--train-only",
        action="store_true",
        help="train the missing checkpoints (and make the new camera) and stop: train on a busy machine, then "
        "measure with --no-train on an idle one, where the seconds mean something",
    )
    p.add_argument("--summary-only", action="store_true", help="only rebuild the summary from the seed files")
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        p.error(f"--models: unknown {', '.join(unknown)} (choose from {', '.join(MODELS)})")
    if args.train_only and (args.no_train or args.summary_only):
        p.error("--train-only: cannot be combined with --no-train or --summary-only")
    out = Path(args.out)
    (out / "adapt_bn").mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.train_only:
        for seed in seeds:
            prepare_seed(seed, keys, args)
            print(f"seed {seed}: {', '.join(_rel(checkpoint_path(k, seed, args.runs)) for k in keys)} trained")
        return 0
    if not args.summary_only:
        for seed in seeds:
            done = [k for k in keys if result_file(out, seed, k).is_file()]
            for key in done:
                print(f"seed {seed} {key}: done ({_rel(result_file(out, seed, key))}), skipped")
            todo = [k for k in keys if k not in done]
            if todo:
                run_seed(seed, todo, args, out)
    summary = summarize(out)
    if summary is not None:
        print((out / "adapt_bn.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
