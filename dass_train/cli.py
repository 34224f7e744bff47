"""``dass-train``: run the paper's recipe, evaluate a checkpoint, or write the synthetic benchmark.

    dass-train synth2real                      # embedded benchmark: generate, source-only, BiDA, evaluate (CPU)
    dass-train gta2city --stage adapt --init runs/gta2city/source_only/last.pt
    dass-train synthia2city optim.lr=5e-5 stages.adapt_iters=50000
    torchrun --nproc_per_node=4 -m dass_train gta2city
    dass-train eval --checkpoint runs/gta2city/adapt/last.pt --preset gta2city --flip
    dass-train synthesize --out data/synthetic

Every config value can be overridden as ``section.key=value`` (see the preset files in dass_train/presets/);
the resolved config is saved as ``config.yaml`` in the run folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dass_train.config import Config, available_presets, build_config, save_config
from dass_train.errors import UserError

STAGE_CHOICES = ("all", "source_only", "adapt", "distill", "oracle")


def _parser() -> argparse.ArgumentParser:
    presets = ", ".join(available_presets())
    p = argparse.ArgumentParser(
        prog="dass-train",
        description="Train BiDA (ECCV 2022) domain adaptive segmentation, evaluate checkpoints, or write the "
        f"synthetic benchmark. COMMAND is a preset ({presets}), 'eval' or 'synthesize'.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("command", help=f"a preset ({presets}), a preset .yaml file, 'eval' or 'synthesize'")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value, e.g. optim.lr=1e-4")
    p.add_argument(
        "--stage",
        default="all",
        choices=STAGE_CHOICES,
        help="which stage to run (all = source_only -> adapt -> distill if stages.distill_iters > 0)",
    )
    p.add_argument("--name", default=None, help="run folder name under run.out (default: the preset name)")
    p.add_argument("--resume", action="store_true", help="continue the run in --name from its last checkpoints")
    p.add_argument("--exist-ok", action="store_true", help="reuse an existing run folder without resuming")
    p.add_argument("--init", default=None, help="checkpoint to start the stage from (default: the previous stage's)")
    p.add_argument("--teacher", default=None, help="adapted checkpoint that teaches the distill stage")
    p.add_argument("--checkpoint", default=None, help="(eval) checkpoint to evaluate")
    p.add_argument("--preset", default=None, help="(eval) preset whose target val set and protocol to use")
    p.add_argument("--flip", action="store_true", help="(eval) horizontal-flip test-time augmentation")
    p.add_argument("--scales", default="1.0", help="(eval) comma-separated test scales, e.g. 0.75,1.0,1.25")
    p.add_argument(
        "--target-bn",
        action="store_true",
        help="(eval) re-estimate trainable BN statistics on target-train images first (AdaBN)",
    )
    p.add_argument("--out", default=None, help="(synthesize) output folder (default data.synthetic_root)")
    p.add_argument(
        "--max-iters",
        type=int,
        default=None,
        help="stop each stage after this many iterations (the LR schedule still spans the full stage; "
        "for interruption tests and smoke runs)",
    )
    return p


def _run_dir(cfg: Config, name: str | None, resume: bool, exist_ok: bool) -> Path:
    """runs/<name>, or runs/<name>2, 3, ... so an earlier run is never overwritten."""
    base = Path(cfg.run.out) / (name or cfg.run.name or cfg.preset)
    if resume:
        if not base.is_dir():
            raise UserError(f"--resume: run folder {base} does not exist")
        return base
    if exist_ok or not base.exists():
        return base
    k = 2
    while Path(f"{base}{k}").exists():
        k += 1
    return Path(f"{base}{k}")


def _stages(cfg: Config, stage: str) -> list[str]:
    if stage != "all":
        return [stage]
    plan = []
    if cfg.stages.oracle_iters:
        plan.append("oracle")
    if cfg.stages.source_only_iters:
        plan.append("source_only")
    if cfg.stages.adapt_iters:
        plan.append("adapt")
    if cfg.stages.distill_iters:
        plan.append("distill")
    return plan


def train(args: argparse.Namespace) -> int:
    import torch

    from dass_train import distributed
    from dass_train.trainer import Trainer, ensure_synthetic

    cfg = build_config(args.command, args.overrides)
    info = distributed.setup(cfg.run.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.run.cudnn_benchmark
    run_dir = _run_dir(cfg, args.name, args.resume, args.exist_ok) if info.is_main else None
    run_dir = Path(_broadcast_str(str(run_dir) if run_dir else "", info))
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        print(f"dass-train {cfg.preset}: run folder {run_dir} ({info.world_size} process(es) on {info.device})")
        ensure_synthetic(cfg)
    distributed.barrier()
    start = time.perf_counter()
    results = {}
    previous = Path(args.init) if args.init else None
    adapted = Path(args.teacher) if args.teacher else None
    for stage in _stages(cfg, args.stage):
        init = None if stage in ("source_only", "oracle", "distill") else previous
        if stage == "adapt" and init is None:
            init = run_dir / "source_only" / "last.pt"
            if not init.is_file():
                raise UserError(
                    f"the adapt stage starts from a source-only model: {init} not found "
                    "(run --stage source_only first, or pass --init CKPT)"
                )
        if stage == "distill" and adapted is None:
            adapted = run_dir / "adapt" / "last.pt"
        trainer = Trainer(
            cfg, stage, run_dir, info, init_checkpoint=init, teacher_checkpoint=adapted, max_iters=args.max_iters
        )
        result = trainer.fit(resume=args.resume)
        results[stage] = result
        if stage == "source_only":
            previous = result.last
        if stage == "adapt":
            adapted = result.last
    if info.is_main:
        _summary(cfg, run_dir, results, time.perf_counter() - start)
    distributed.cleanup()
    return 0


def _broadcast_str(value: str, info) -> str:
    if not info.enabled:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _summary(cfg: Config, run_dir: Path, results: dict, seconds: float) -> None:
    from dass_train.labels import CLASS_NAMES
    from dass_train.metrics import format_table

    rows = {}
    print(f"\nSummary of {run_dir} ({seconds / 60:.1f} min)")
    for stage, result in results.items():
        m = result.metrics
        rows[stage] = {
            "miou": m.get("miou"),
            "iou": m.get("iou"),
            "checkpoint": str(result.last),
            "minutes": round(result.seconds / 60, 2),
            **{k: m[k] for k in ("miou16", "miou13") if k in m},
        }
        extra = "".join(f", {k} {100 * m[k]:.2f}" for k in ("miou16", "miou13") if k in m)
        print(f"  {stage:<12} target val mIoU {100 * m.get('miou', float('nan')):6.2f}{extra}   {result.last}")
    if "source_only" in rows and "adapt" in rows:
        gain = rows["adapt"]["miou"] - rows["source_only"]["miou"]
        print(f"  adaptation gain: {100 * gain:+.2f} mIoU points")
    last = list(results.values())[-1].metrics if results else {}
    if last.get("iou"):
        print(format_table(last, CLASS_NAMES))
    (run_dir / "summary.json").write_text(
        json.dumps({"preset": cfg.preset, "stages": rows, "minutes": round(seconds / 60, 2)}, indent=1)
    )


def evaluate_checkpoint(args: argparse.Namespace) -> int:
    import torch

    from dass_train import distributed
    from dass_train.checkpoint import load_model
    from dass_train.labels import CLASS_NAMES
    from dass_train.metrics import format_table
    from dass_train.trainer import ensure_synthetic, eval_dataset, run_evaluation

    if not args.checkpoint:
        raise UserError("eval needs --checkpoint CKPT")
    cfg = build_config(args.preset or "gta2city", args.overrides)
    info = distributed.setup(cfg.run.device)
    model, meta, report = load_model(args.checkpoint, freeze_bn=not args.target_bn)
    for line in report:
        print(f"  {line}")
    model = model.to(info.device)
    ensure_synthetic(cfg)
    try:
        scales = tuple(float(s) for s in args.scales.split(","))
    except ValueError:
        raise UserError(f"--scales {args.scales!r}: expected comma-separated numbers") from None
    ds = eval_dataset(cfg, meta["normalization"])
    if args.target_bn:
        from dass_train.trainer import target_bn_statistics, target_dataset

        n = target_bn_statistics(
            model, target_dataset(cfg, "train", ds.transforms, with_labels=False), 8, info.device, info
        )
        model.eval()
        print(f"  BN statistics re-estimated on {n} target-train images (AdaBN)")
    with torch.no_grad():
        result = run_evaluation(model, ds, cfg, info.device, info, flip=args.flip, scales=scales)
    if info.is_main:
        print(format_table(result, CLASS_NAMES))
        extra = "".join(f", {k} {100 * result[k]:.2f}" for k in ("miou16", "miou13") if k in result)
        print(
            f"{args.checkpoint}: mIoU {100 * result['miou']:.2f}{extra} on {len(ds)} images "
            f"({cfg.preset} {cfg.data.val_split}, eval size {cfg.data.eval_size[0]}x{cfg.data.eval_size[1]})"
        )
    distributed.cleanup()
    return 0


def synthesize(args: argparse.Namespace) -> int:
    from dass_train.data.synthetic import generate
    from dass_train.trainer import synthetic_settings

    cfg = build_config("synth2real", args.overrides)
    out = Path(args.out or cfg.data.synthetic_root)
    summary = generate(out, synthetic_settings(cfg))
    print(f"wrote the synthetic benchmark to {out}: {json.dumps(summary, default=str)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        if args.command == "eval":
            return evaluate_checkpoint(args)
        if args.command == "synthesize":
            return synthesize(args)
        return train(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is intact; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
