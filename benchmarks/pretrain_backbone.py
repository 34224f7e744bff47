"""The paper-regime backbone: pretrain DeepLab-V2 ResNet-18 on the style-randomised pretext domain, ship it.

The paper adapts a network whose backbone was pretrained (ImageNet classification + COCO segmentation) and whose
BatchNorm stays frozen at those statistics. The synthetic benchmark has no such network, so this script makes its
analogue: the ``synth2real_pretrain`` preset trains the network for segmentation, from scratch with trainable BN,
on a third synthetic domain that is neither the source nor the target style (``data.synthetic_style: pretrain``:
a random palette, lighting, texture and camera per image, its own seed). Then it writes

- ``weights/synth-pretrain-r18.safetensors``: the backbone only (the classifier is relearned, as with ImageNet
  weights), BN statistics included, with its provenance in the safetensors metadata;
- ``weights/synth-pretrain-r18.md``: the card (data, command, iterations, its own val mIoU, machine, time, sha256);
- ``benchmarks/results/pretrain_backbone.json``: the same record.

    python benchmarks/pretrain_backbone.py                         # the preset as shipped (resumes a stopped run)
    python benchmarks/pretrain_backbone.py --max-iters 1000            # the first 1000 iterations of that schedule
    python benchmarks/pretrain_backbone.py --from-checkpoint runs/pretrain/pretrain/source_only/iter_001000.pt
                                                          # ship a kept snapshot of a run (the same weights)

The shipped weights are the iteration-1000 snapshot of the preset's 3000-iteration schedule (the card says so): on
2 CPU cores shared with other work the full schedule did not fit the session that made them (about 1 s an
iteration on an idle 2-core machine, 4-5 s while shared).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_tables import run  # noqa: E402  (one subprocess runner for every table script; puts the repo on sys.path)

from dass_deploy.machine import describe_machine, machine_markdown  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRESET = "synth2real_pretrain"
WEIGHTS = REPO / "weights" / "synth-pretrain-r18.safetensors"


def train(args: argparse.Namespace) -> Path:
    """Train (or resume, or reuse) the pretext run; returns its last checkpoint."""
    runs = Path(args.runs)
    run_dir = runs / args.name
    summary = run_dir / "summary.json"
    snapshot = run_dir / "source_only" / f"iter_{args.max_iters or 0:06d}.pt"
    if args.max_iters and snapshot.is_file():  # a longer run already passed N: its kept snapshot is those weights
        return snapshot
    if summary.is_file() and "source_only" in json.loads(summary.read_text())["stages"]:
        return run_dir / "source_only" / "last.pt"
    runs.mkdir(parents=True, exist_ok=True)
    common = [f"run.out={runs}", "run.progress=false", *args.overrides]
    run(["synthesize", "--preset", PRESET, "--workers", "2", *common], runs / f"{args.name}-synthesize.log")
    resume = ["--resume"] if (run_dir / "source_only" / "last.pt").is_file() else ["--exist-ok"]
    stop = ["--max-iters", str(args.max_iters)] if args.max_iters else []
    run([PRESET, "--name", args.name, *resume, *stop, "--stage", "source_only", *common], runs / f"{args.name}.log")
    return run_dir / "source_only" / "last.pt"


def minutes_to(ckpt: Path) -> float | None:
    """Wall time from the start of its run to ``ckpt``: the stage's own record for a finished run's last.pt, file
    times (config.yaml is written when the run starts) for a kept snapshot; None outside a run folder."""
    summary = ckpt.parent.parent / "summary.json"
    if ckpt.name == "last.pt" and summary.is_file():
        minutes = json.loads(summary.read_text())["stages"].get("source_only", {}).get("minutes")
        if minutes is not None:
            return minutes
    config = ckpt.parent.parent / "config.yaml"
    return (ckpt.stat().st_mtime - config.stat().st_mtime) / 60 if config.is_file() else None


def ship(ckpt: Path, weights: Path, command: str, minutes: float | None) -> dict:
    """Write the backbone of ``ckpt`` as safetensors, and its card and record."""
    import torch

    from dass_train.checkpoint import file_sha256, load_checkpoint, save_backbone_weights
    from dass_train.config import config_from_dict
    from dass_train.data.domains import synthetic_settings
    from dass_train.engine import build_model

    payload = load_checkpoint(ckpt)
    meta = payload["meta"]
    cfg = config_from_dict(meta["config"])
    model = build_model(cfg, torch.device("cpu"))
    model.load_state_dict(payload["model"], strict=True)
    metrics = meta.get("metrics") or {}
    if "miou" not in metrics:  # a kept snapshot carries no evaluation: measure it on the pretext val split
        from dass_train.distributed import DistInfo
        from dass_train.engine import eval_dataset, normalization_of, run_evaluation

        metrics = run_evaluation(
            model, eval_dataset(cfg, normalization_of(cfg)), cfg, torch.device("cpu"), DistInfo(), progress=False
        )
    s = cfg.stages
    info = {
        "pretext": "segmentation of style-randomised synthetic street scenes (data.synthetic_style=pretrain)",
        "generator": {k: v for k, v in vars(synthetic_settings(cfg)).items()},
        "iterations": int(meta["iteration"]),
        "schedule_iterations": s.source_only_iters,
        "batch_size": s.source_only_batch_size or cfg.optim.batch_size,
        "crop": list(s.source_only_crop),
        "lr": s.source_only_lr,
        "normalization": meta["normalization"],
        "pretext_val_miou": metrics["miou"],
        "command": command,
        "checkpoint": str(ckpt.relative_to(REPO) if ckpt.is_relative_to(REPO) else ckpt),
    }
    save_backbone_weights(weights, model, info)
    record = {
        **info,
        "weights": str(weights.relative_to(REPO) if weights.is_relative_to(REPO) else weights),
        "bytes": weights.stat().st_size,
        "sha256": file_sha256(weights),
        "minutes": minutes,
        "pretext_val_iou": metrics.get("iou"),
        "machine": describe_machine(),
    }
    weights.with_suffix(".md").write_text(card(record))
    return record


def card(r: dict) -> str:
    from dass_train.labels import CLASS_NAMES

    g = r["generator"]
    time_line = (
        f"{r['minutes']:.0f} min from the start of the run to this checkpoint (file times; the machine's other load "
        "is in the line below)"
        if r["minutes"] is not None
        else "not known (a checkpoint outside its run folder)"
    )
    lines = [
        f"# {Path(r['weights']).name}: the synthetic benchmark's pretrained backbone",
        "",
        "DeepLab-V2 ResNet-18 backbone (no classifier), the ImageNet / COCO analogue of the embedded benchmark: "
        "`model.init` of the `synth2real_paper` preset, which keeps its BatchNorm statistics frozen in every stage, "
        "as DeepLab-V2 keeps ImageNet's.",
        "",
        "| | |",
        "|---|---|",
        f"| pretext | {r['pretext']} |",
        f"| data | generator v{__import__('dass_train.data.synthetic', fromlist=['x']).GENERATOR_VERSION}, "
        f"style `{g['style']}`, seed {g['seed']}, {g['n_source']} train + {g['n_target_val']} val images at "
        f"{g['width']}x{g['height']}; neither the source nor the target style, no target image |",
        f"| training | {r['iterations']} iterations (of a {r['schedule_iterations']}-iteration poly schedule), batch "
        f"{r['batch_size']}, crop {r['crop'][0]}x{r['crop'][1]}, SGD LR {r['lr']}, trainable BN, random init |",
        f"| its own val mIoU | **{100 * r['pretext_val_miou']:.2f}** (19 classes, pretext val split) |",
        f"| input | {r['normalization']['color']}, mean {r['normalization']['mean']}, std {r['normalization']['std']} |",
        f"| file | {r['bytes'] / 2**20:.1f} MiB safetensors (conv weights float16, BN float32), sha256 "
        f"`{r['sha256']}` |",
        f"| cost | {time_line} |",
        f"| command | `{r['command']}` |",
        "",
        machine_markdown(r["machine"]),
        "",
        "Per-class IoU on the pretext val split (%):",
        "",
        "| " + " | ".join(CLASS_NAMES) + " |",
        "|" + "---:|" * len(CLASS_NAMES),
        "| " + " | ".join("n/a" if v != v else f"{100 * v:.1f}" for v in (r["pretext_val_iou"] or [])) + " |",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides of the pretext run (section.key=value)")
    p.add_argument("--runs", default=str(REPO / "runs" / "pretrain"), help="folder of the pretext run")
    p.add_argument("--name", default="pretrain", help="run folder name under --runs")
    p.add_argument("--weights", type=Path, default=WEIGHTS, help="the safetensors file to write (its card beside it)")
    p.add_argument(
        "--max-iters",
        type=int,
        default=None,
        help="stop the pretext after this many iterations (the LR schedule still spans the preset's; the weights "
        "are then the same as the run's iter_<N>.pt snapshot)",
    )
    p.add_argument("--from-checkpoint", type=Path, default=None, help="ship this checkpoint instead of training")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "pretrain_backbone.json")
    args = p.parse_args(argv)
    words = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/pretrain_backbone.py " + " ".join(shlex.quote(w) for w in words)
    if args.from_checkpoint is not None:
        if not args.from_checkpoint.is_file():
            raise SystemExit(f"error: checkpoint not found: {args.from_checkpoint}")
        ckpt = args.from_checkpoint
    else:
        ckpt = train(args)
    record = ship(ckpt, args.weights, command, minutes_to(ckpt))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=1) + "\n")
    print(args.weights.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
