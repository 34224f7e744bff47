"""Is the synthetic proxy in the real task's regime? (before anyone reads Table 3 off it)

Trains (or reuses) the source-only and the target-trained (oracle) models of a preset for one seed, then measures
what decides whether self-training has anything to work with, as the paper reports it for GTA5 -> Cityscapes
(Table 4, section 4.1):

- the static labels the adaptation stage starts from: exactly what the adapt stage does first (with
  ``model.domain_bn``: target BN statistics re-estimated, ``engine.target_bn_statistics``; with frozen BN, the
  paper's regime: nothing is re-estimated; then CBST labels by ``pseudo_labels.generate_static_labels`` with the
  preset's ``method.cbst_portion`` / ``method.image_portion``), scored against the target-TRAIN ground truth, which
  training never reads: accuracy (correct / labelled) and density (labelled / valid pixels), overall and per class
  (paper: 98.5 % at 20.1 %);
- source-only and oracle mIoU on target val and their ratio (paper: about 0.55), per-class IoU, and the mIoU of the
  model adaptation starts from (with domain BN: source-only + target BN statistics; with frozen BN: source-only).

The oracle trains ``stages.oracle_iters`` iterations (0: as long as source-only). With ``--scratch`` (frozen-BN
presets only) the two models are trained from random init with trainable BN instead of the pretrained backbone,
and the adaptation start keeps the source-only model's BN statistics frozen: the from-scratch variant of the
paper's regime.

    python benchmarks/proxy_regime.py                                  # synth2real, seed 0
    python benchmarks/proxy_regime.py --preset synth2real_paper --seed 1
    python benchmarks/proxy_regime.py --preset synth2real_paper --scratch
    python benchmarks/proxy_regime.py --tag short stages.source_only_iters=400 data.synthetic_counts=300,200,100

Runs go to runs/proxy-<name>-seed<S>/ (a rerun reuses finished stages), data to data/synthetic-seed<S> (shared with
synth_tables.py); results to benchmarks/results/proxy_regime[-<preset>][-scratch][-<tag>][-seed<S>].{md,json}
(seed 0 of synth2real writes proxy_regime.{md,json}).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_tables import run, seed_data  # noqa: E402  (one subprocess runner for both scripts; it puts the repo on sys.path)

from dass_deploy.machine import describe_machine, machine_markdown  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"label_accuracy": 0.90, "label_density": 0.15, "ratio": (0.45, 0.70)}


def static_label_quality(cfg, ckpt: Path, out_dir: Path) -> dict:
    """The adapt stage's first static labels from ``ckpt``, scored on target-train ground truth."""
    import numpy as np
    import torch

    from dass_train.checkpoint import load_checkpoint
    from dass_train.data.datasets import read_index_png
    from dass_train.data.domains import SizedTarget, eval_dataset, target_dataset
    from dass_train.data.transforms import EvalTransform, TransformConfig
    from dass_train.distributed import DistInfo
    from dass_train.engine import build_model, normalization_of, run_evaluation, target_bn_statistics
    from dass_train.labels import IGNORE_INDEX, NUM_CLASSES
    from dass_train.pseudo_labels import generate_static_labels, label_path

    device = torch.device("cpu")
    info = DistInfo(device=device)
    model = build_model(cfg, device)
    model.load_state_dict(load_checkpoint(ckpt)["model"], strict=True)
    norm = normalization_of(cfg)
    tf = EvalTransform(TransformConfig(eval_size=tuple(cfg.data.eval_size)), norm)
    domain_bn = cfg.model.domain_bn and not cfg.model.freeze_bn
    if domain_bn:  # what AdaptStage.refresh_static_labels does first (never with frozen BN)
        target_bn_statistics(
            model, target_dataset(cfg, "train", tf, False, seed=cfg.run.seed + 1), cfg.optim.batch_size, device, info
        )
    start_miou = run_evaluation(model, eval_dataset(cfg, norm), cfg, device, info, progress=False)["miou"]
    base = target_dataset(cfg, "train", tf, with_labels=False, seed=cfg.run.seed + 1)
    result = generate_static_labels(
        model,
        SizedTarget(base),
        out_dir,
        num_classes=NUM_CLASSES,
        portion=cfg.method.cbst_portion,
        image_portion=cfg.method.image_portion,
        excluded_classes=tuple(cfg.method.excluded_classes),
        device=device,
        progress=False,
    )
    # per class (of the label): labelled and correct pixels; per class (of the truth): valid pixels
    labelled, correct, valid = (np.zeros(NUM_CLASSES, np.int64) for _ in range(3))
    truth = target_dataset(cfg, "train", tf, with_labels=True)  # never read by training
    for name, gt_file in zip(truth.names, truth.label_files, strict=True):
        gt = truth._decode_label(gt_file)
        pl = read_index_png(label_path(out_dir, name))
        ok = gt != IGNORE_INDEX
        lab = ok & (pl != IGNORE_INDEX)
        valid += np.bincount(gt[ok], minlength=NUM_CLASSES)
        labelled += np.bincount(pl[lab], minlength=NUM_CLASSES)
        correct += np.bincount(pl[lab & (pl == gt)], minlength=NUM_CLASSES)
    return {
        "accuracy": float(correct.sum() / max(labelled.sum(), 1)),
        "density": float(labelled.sum() / max(valid.sum(), 1)),
        "density_all_pixels": result.density,
        "per_class_accuracy": [float(c / n) if n else None for c, n in zip(correct, labelled, strict=True)],
        "per_class_labelled_share": [float(n / max(labelled.sum(), 1)) for n in labelled],
        "per_class_gt_share": [float(v / max(valid.sum(), 1)) for v in valid],
        "thresholds": result.thresholds,
        "images": result.images,
        "domain_bn": domain_bn,
        "start_model_miou": start_miou,
    }


def run_name(args: argparse.Namespace) -> str:
    """proxy_regime[-<preset>][-scratch][-<tag>][-seed<S>]; seed 0 of the default preset is plain proxy_regime."""
    parts = ["proxy_regime"]
    if args.preset != "synth2real":
        parts.append(args.preset.removeprefix("synth2real_"))
    if args.scratch:
        parts.append("scratch")
    if args.tag:
        parts.append(args.tag)
    if args.seed or len(parts) > 1:
        parts.append(f"seed{args.seed}")
    return "-".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides for every run (section.key=value)")
    p.add_argument("--preset", default="synth2real", help="synth2real (domain BN) or synth2real_paper (frozen BN)")
    p.add_argument("--scratch", action="store_true", help="frozen-BN preset, but random init (trainable BN) models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="names the run folder and results file (exploration runs)")
    p.add_argument("--parallel", type=int, default=2, help="trainings at a time (each gets run.threads=1 when > 1)")
    p.add_argument("--runs", default=str(REPO / "runs"), help="folder of the run folders")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/proxy_regime.py " + " ".join(shlex.quote(a) for a in argv)
    import torch

    from dass_train.config import build_config
    from dass_train.data.domains import synthetic_settings
    from dass_train.data.synthetic import ensure_dataset
    from dass_train.errors import UserError
    from dass_train.labels import CLASS_NAMES

    name = run_name(args)
    runs = Path(args.runs) / name.replace("proxy_regime", "proxy", 1)
    data = seed_data(args.seed)  # as synth_tables.py: one data folder per seed
    overrides = [f"run.seed={args.seed}", data, *args.overrides]
    try:
        cfg = build_config(args.preset, overrides)
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.scratch and not cfg.model.freeze_bn:
        raise SystemExit(f"error: --scratch is the from-scratch variant of a frozen-BN preset; {args.preset} trains BN")
    # --scratch: the models train BN from random init; the adaptation start (static labels) keeps their statistics
    scratch = ["model.init=null", "model.freeze_bn=false", "model.domain_bn=false"] if args.scratch else []
    runs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    root = Path(cfg.data.synthetic_root)
    root = root if root.is_absolute() else REPO / root
    ensure_dataset(root, synthetic_settings(cfg), progress=False)  # once, before parallel runs
    common = [*overrides, *scratch, f"run.out={runs}", "run.progress=false", "run.val_every=0"]
    if args.parallel > 1:
        common.append("run.threads=1")

    def stage(stage_name: str) -> Path:
        summary = runs / stage_name / "summary.json"
        if not (summary.is_file() and stage_name in json.loads(summary.read_text())["stages"]):
            run(
                [args.preset, "--name", stage_name, "--exist-ok", "--stage", stage_name, *common],
                runs / f"{stage_name}.log",
            )
        return runs / stage_name / stage_name / "last.pt"

    with ThreadPoolExecutor(args.parallel) as pool:
        src_f = pool.submit(stage, "source_only")
        ora_f = pool.submit(stage, "oracle")
        src_ckpt, ora_ckpt = src_f.result(), ora_f.result()
    train_minutes = (time.perf_counter() - start) / 60

    from dass_train.checkpoint import load_checkpoint

    torch.set_num_threads(max(1, cfg.run.threads or torch.get_num_threads()))
    src = load_checkpoint(src_ckpt)["meta"]["metrics"]
    ora = load_checkpoint(ora_ckpt)["meta"]["metrics"]
    labels = static_label_quality(cfg, src_ckpt, runs / "static_labels")
    ratio = src["miou"] / ora["miou"]
    ratio_start = labels["start_model_miou"] / ora["miou"]
    lo, hi = TARGETS["ratio"]
    checks = {
        "label_accuracy": labels["accuracy"] >= TARGETS["label_accuracy"],
        "label_density": labels["density"] >= TARGETS["label_density"],
        "ratio": lo <= ratio <= hi,
        "ratio_adapt_start": lo <= ratio_start <= hi,
    }
    result = {
        "command": command,
        "seed": args.seed,
        "preset": args.preset,
        "scratch": args.scratch,
        "overrides": args.overrides,
        "machine": describe_machine(),
        "minutes": (time.perf_counter() - start) / 60,
        "train_minutes": train_minutes,
        "generator": {
            **asdict(synthetic_settings(cfg)),
            "version": __import__("dass_train.data.synthetic", fromlist=["GENERATOR_VERSION"]).GENERATOR_VERSION,
        },
        "config": {k: cfg.to_dict()[k] for k in ("data", "model", "stages", "optim", "method")},
        "oracle_iters": cfg.stages.oracle_iters or cfg.stages.source_only_iters,
        "source_only_miou": src["miou"],
        "oracle_miou": ora["miou"],
        "ratio": ratio,
        "adapt_start_miou": labels["start_model_miou"],
        "ratio_adapt_start": ratio_start,
        "source_only_iou": src["iou"],
        "oracle_iou": ora["iou"],
        "static_labels": labels,
        "targets": TARGETS,
        "checks": checks,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text(to_markdown(result, CLASS_NAMES))
    print((out / f"{name}.md").read_text())
    return 0


def pct(v: float | None) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.1f}"


def to_markdown(r: dict, class_names: tuple[str, ...]) -> str:
    m, g, s, c = r["machine"], r["generator"], r["static_labels"], r["config"]
    ok = {True: "yes", False: "**no**"}
    lo, hi = r["targets"]["ratio"]
    lines = [
        f"# Proxy regime: {r.get('preset', 'synth2real')}{' (from scratch)' if r.get('scratch') else ''}, seed {r['seed']}",
        "",
        f"Command: `{r['command']}` ({r['minutes']:.0f} min, of which {r['train_minutes']:.0f} training)  ",
        f"{machine_markdown(m)}  ",  # any stored record shape: proxy_regime*.json files predate describe_machine
        f"Generator v{g['version']}: {g['width']}x{g['height']}, counts {g['n_source']}/{g['n_target_train']}/"
        f"{g['n_target_val']}, style_shift {g['style_shift']}, class_shift {g['class_shift']} "
        "(scene priors: `dass_train.data.synthetic.SCENE_PRIORS`)  ",
        f"Preset {r['preset']} with overrides {r['overrides'] or 'none'}"
        f"{' and random init, trainable BN for both models (--scratch)' if r['scratch'] else ''}: "
        f"model {json.dumps(c['model'])}, source-only {c['stages']['source_only_iters']} it, oracle "
        f"{r['oracle_iters']} it, at crop {c['stages']['source_only_crop']}, batch {c['optim']['batch_size']}, "
        f"CBST portion {c['method']['cbst_portion']}, image portion {c['method']['image_portion']}",
        "",
        "| figure | measured | target | met |",
        "|---|---:|---:|---|",
        f"| static-label accuracy (target-train GT) | {pct(s['accuracy'])} % | >= 90 % | "
        f"{ok[r['checks']['label_accuracy']]} |",
        f"| static-label density (valid GT pixels) | {pct(s['density'])} % | >= 15 % | "
        f"{ok[r['checks']['label_density']]} |",
        f"| source-only mIoU (target val) | {pct(r['source_only_miou'])} | | |",
        f"| oracle (target-trained) mIoU | {pct(r['oracle_miou'])} | | |",
        f"| ratio source-only / oracle | {r['ratio']:.2f} | {lo}-{hi} | {ok[r['checks']['ratio']]} |",
        f"| adapt-stage start model mIoU (source-only{' + target BN statistics' if s['domain_bn'] else ', BN frozen'}) | "
        f"{pct(r['adapt_start_miou'])} | | |",
        f"| ratio adapt start / oracle | {r['ratio_adapt_start']:.2f} | {lo}-{hi} | "
        f"{ok[r['checks']['ratio_adapt_start']]} |",
        "",
        "Paper (GTA5 -> Cityscapes): static labels 98.5 % accurate at 20.1 % density; source-only about 0.55 of a "
        "target-trained model.",
        "",
        "Per class (%): IoU of source-only and oracle on target val; static labels: accuracy, share of the labels, "
        "share of the ground truth.",
        "",
        "| class | source-only IoU | oracle IoU | label accuracy | label share | GT share |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for i, n in enumerate(class_names):
        lines.append(
            f"| {n} | {pct(r['source_only_iou'][i])} | {pct(r['oracle_iou'][i])} | {pct(s['per_class_accuracy'][i])} "
            f"| {pct(s['per_class_labelled_share'][i])} | {pct(s['per_class_gt_share'][i])} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
