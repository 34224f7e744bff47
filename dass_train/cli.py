"""``dass-train``: run the paper's recipe, evaluate a checkpoint, or write the synthetic benchmark.

A click group; ``dass-train PRESET ...`` is short for ``dass-train run PRESET ...``. ``main(argv) -> int`` never
raises for user mistakes: usage errors and ``UserError``s exit 2 with one line, Ctrl-C exits 130 with one line.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from dass_train.config import Config, available_presets, build_config, save_config
from dass_train.errors import UserError, user_message

STAGE_CHOICES = ("all", "source_only", "adapt", "distill", "oracle")
PRESET_DIR = Path(__file__).parent / "presets"
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}

GROUP_HELP = """Train BiDA (ECCV 2022) domain adaptive segmentation, evaluate checkpoints, or write the
synthetic benchmark.

\b
  dass-train synth2real                    # embedded benchmark: generate, source-only, BiDA, evaluate (CPU)
  dass-train gta2city --stage adapt --init runs/gta2city/source_only/last.pt
  dass-train synthia2city optim.lr=5e-5 stages.adapt_iters=50000
  torchrun --nproc_per_node=4 -m dass_train gta2city
  dass-train eval --checkpoint runs/gta2city/adapt/last.pt --preset gta2city --flip
  dass-train synthesize --out data/synthetic --counts 60,30,10
  dass-train presets
  dass-train config synth2real optim.lr=1e-3

'dass-train PRESET ...' is short for 'dass-train run PRESET ...'. Every config value can be overridden as
section.key=value (see 'dass-train config PRESET'); the resolved config is saved as config.yaml in the run folder.
"""


# ------------------------------------------------------------------------------------------------ option types
def _is_preset_word(word: str) -> bool:
    return word in available_presets() or word.endswith((".yaml", ".yml"))


class PresetType(click.ParamType):
    """A preset name (dass_train/presets/<name>.yaml) or the path of a preset .yaml file."""

    name = "preset"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        value = str(value)
        if value in available_presets():
            return value
        if value.endswith((".yaml", ".yml")):
            if Path(value).is_file():
                return value
            self.fail(f"preset file {value} does not exist", param, ctx)
        self.fail(
            f"unknown preset {value!r} (available: {', '.join(available_presets())}, or a .yaml file)", param, ctx
        )


class NumberList(click.ParamType):
    """Comma-separated numbers, checked here, passed on as text (the config parses ``a,b,c`` into a tuple)."""

    def __init__(self, metavar: str, count: int | None = None, kind: type = float, minimum: float | None = None):
        self.name, self.count, self.kind, self.minimum = metavar, count, kind, minimum

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return self.name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        try:
            numbers = [self.kind(part) for part in text.split(",")]
        except ValueError:
            self.fail(f"{text!r}: expected comma-separated {self.kind.__name__}s like {self.name}", param, ctx)
        if self.count is not None and len(numbers) != self.count:
            self.fail(f"{text!r}: expected {self.count} numbers ({self.name})", param, ctx)
        if self.minimum is not None and min(numbers) < self.minimum:
            self.fail(f"{text!r}: every number must be >= {self.minimum}", param, ctx)
        return ",".join(str(n) for n in numbers)


CHECKPOINT = click.Path(exists=True, dir_okay=False, path_type=Path)


# ------------------------------------------------------------------------------------------------ group
class TrainGroup(click.Group):
    """A group whose unknown first word, when it is a preset (or a .yaml file, or an option), means ``run``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # the order they are defined in: run, eval, synthesize, presets, config

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in (*ctx.help_option_names, "--version"):
            if args[0].startswith("-") or _is_preset_word(args[0]):
                args = ["run", *args]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:  # also when torch re-raised it from a DataLoader worker: user_message cuts it
            raise UserFailure(user_message(exc)) from None

    def resolve_command(self, ctx: click.Context, args: list[str]):
        if args and not args[0].startswith("-") and self.get_command(ctx, args[0]) is None:
            ctx.fail(
                f"{args[0]!r} is neither a command ({', '.join(self.list_commands(ctx))}) nor a preset "
                f"({', '.join(available_presets())}, or a .yaml file)"
            )
        return super().resolve_command(ctx, args)


class UserFailure(click.ClickException):
    """A ``UserError`` as click sees it: ``error: <one line>`` on stderr, exit 2 (in ``main`` and in CliRunner)."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        # red on a terminal; click.echo drops the colour codes when stderr is a file or a pipe
        click.echo(f"{click.style('error:', fg='red', bold=True)} {self.message}", err=True)


class Interrupted(click.ClickException):
    """Ctrl-C inside a command: one line saying what state it left behind, exit 130."""

    exit_code = 130

    def show(self, file: Any = None) -> None:
        click.echo(self.message, err=True)


def interruptible(message: str) -> Callable:
    """Turn KeyboardInterrupt into ``Interrupted(message)`` before click turns it into a bare Abort."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except KeyboardInterrupt:
                raise Interrupted(message) from None

        return inner

    return wrap


@click.group("dass-train", cls=TrainGroup, context_settings=CONTEXT, help=GROUP_HELP)
@click.version_option(package_name="dass", prog_name="dass-train", message="%(prog)s %(version)s")
def cli() -> None:
    pass


# ------------------------------------------------------------------------------------------------ run
@cli.command("run", context_settings=CONTEXT, short_help="Train a preset (source-only, BiDA adaptation, distillation).")
@click.argument("preset", type=PresetType())
@click.argument("overrides", nargs=-1, metavar="[SECTION.KEY=VALUE]...")
@click.option(
    "--stage",
    type=click.Choice(STAGE_CHOICES),
    default="all",
    show_default=True,
    help="Stage to run; 'all' = source_only -> adapt -> distill (each stage whose stages.*_iters > 0).",
)
@click.option("--name", default=None, help="Run folder name under run.out (default: the preset's name).")
@click.option("--resume", is_flag=True, help="Continue the run in --name from its last checkpoints.")
@click.option("--exist-ok", is_flag=True, help="Reuse an existing run folder without resuming (default: NAME2, 3...).")
@click.option(
    "--init",
    type=CHECKPOINT,
    default=None,
    help="Checkpoint to start the adapt stage from [default: this run's source_only/last.pt].",
)
@click.option("--teacher", type=CHECKPOINT, default=None, help="Adapted checkpoint that teaches the distill stage.")
@click.option(
    "--max-iters",
    type=click.IntRange(min=1),
    default=None,
    help="Stop each stage after this many iterations; the LR schedule still spans the full stage "
    "(for interruption tests and smoke runs).",
)
@interruptible("interrupted: the last checkpoint is intact; continue with --resume")
def run_command(
    preset: str,
    overrides: tuple[str, ...],
    stage: str,
    name: str | None,
    resume: bool,
    exist_ok: bool,
    init: Path | None,
    teacher: Path | None,
    max_iters: int | None,
) -> int:
    """Train PRESET (gta2city, synthia2city, synth2real or a .yaml file) with optional config overrides.

    Overrides are section.key=value (e.g. optim.lr=1e-4 data.crop=512,512; 'dass-train config PRESET' shows every
    key). The run folder is run.out/NAME; an existing one is never overwritten (NAME2, NAME3, ... are used).

    \b
      dass-train run synth2real --name demo
      dass-train run gta2city --stage adapt --init runs/gta2city/source_only/last.pt optim.lr=1e-4
      dass-train gta2city ...     (short form)
    """
    return train(preset, list(overrides), stage, name, resume, exist_ok, init, teacher, max_iters)


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
    plan = []  # the oracle is a measurement, not part of the recipe: it runs only when asked for (--stage oracle)
    if cfg.stages.source_only_iters:
        plan.append("source_only")
    if cfg.stages.adapt_iters:
        plan.append("adapt")
    if cfg.stages.distill_iters:
        plan.append("distill")
    return plan


def train(
    preset: str,
    overrides: list[str],
    stage: str = "all",
    name: str | None = None,
    resume: bool = False,
    exist_ok: bool = False,
    init: Path | None = None,
    teacher: Path | None = None,
    max_iters: int | None = None,
) -> int:
    import torch

    from dass_train import distributed
    from dass_train.trainer import Trainer, ensure_synthetic

    cfg = build_config(preset, overrides)
    info = distributed.setup(cfg.run.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.run.cudnn_benchmark
    run_dir = _run_dir(cfg, name, resume, exist_ok) if info.is_main else None
    run_dir = Path(_broadcast_str(str(run_dir) if run_dir else "", info))
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        print(f"dass-train {cfg.preset}: run folder {run_dir} ({info.world_size} process(es) on {info.device})")
        ensure_synthetic(cfg)
    distributed.barrier()
    start = time.perf_counter()
    results = {}
    previous = Path(init) if init else None
    adapted = Path(teacher) if teacher else None
    for current in _stages(cfg, stage):
        start_from = None if current in ("source_only", "oracle", "distill") else previous
        if current == "adapt" and start_from is None:
            start_from = run_dir / "source_only" / "last.pt"
            if not start_from.is_file():
                raise UserError(
                    f"the adapt stage starts from a source-only model: {start_from} not found "
                    "(run --stage source_only first, or pass --init CKPT)"
                )
        if current == "distill" and adapted is None:
            adapted = run_dir / "adapt" / "last.pt"
        trainer = Trainer(
            cfg, current, run_dir, info, init_checkpoint=start_from, teacher_checkpoint=adapted, max_iters=max_iters
        )
        result = trainer.fit(resume=resume)
        results[current] = result
        if current == "source_only":
            previous = result.last
        if current == "adapt":
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


# ------------------------------------------------------------------------------------------------ eval
@cli.command("eval", context_settings=CONTEXT, short_help="Evaluate a checkpoint on a preset's target val split.")
@click.argument("overrides", nargs=-1, metavar="[SECTION.KEY=VALUE]...")
@click.option("--checkpoint", type=CHECKPOINT, required=True, help="Checkpoint to evaluate (ours or a foreign one).")
@click.option(
    "--preset",
    type=PresetType(),
    default=None,
    help="Preset whose target val set and protocol to use [default: the preset recorded in the checkpoint, "
    "else gta2city].",
)
@click.option("--flip", is_flag=True, help="Horizontal-flip test-time augmentation.")
@click.option(
    "--scales",
    type=NumberList("S1,S2,...", minimum=0.01),
    default="1.0",
    show_default=True,
    help="Comma-separated test scales, e.g. 0.75,1.0,1.25.",
)
@click.option("--target-bn", is_flag=True, help="Re-estimate trainable BN statistics on target-train images (AdaBN).")
@interruptible("interrupted: evaluation stopped, nothing was written")
def eval_command(
    overrides: tuple[str, ...], checkpoint: Path, preset: str | None, flip: bool, scales: str, target_bn: bool
) -> int:
    """Evaluate a checkpoint on a preset's target val split (mIoU over the 19 classes, plus 16/13 for SYNTHIA).

    \b
      dass-train eval --checkpoint runs/synth2real/adapt/last.pt
      dass-train eval --checkpoint runs/gta2city/adapt/last.pt --preset gta2city --flip --scales 0.75,1.0,1.25
    """
    return evaluate_checkpoint(
        checkpoint, preset, list(overrides), flip, tuple(map(float, scales.split(","))), target_bn
    )


def _recorded_preset(meta: dict) -> str:
    preset = (meta.get("config") or {}).get("preset")
    return preset if isinstance(preset, str) and preset in available_presets() else "gta2city"


def evaluate_checkpoint(
    checkpoint: Path,
    preset: str | None,
    overrides: list[str],
    flip: bool = False,
    scales: tuple[float, ...] = (1.0,),
    target_bn: bool = False,
) -> int:
    import torch

    from dass_train import distributed
    from dass_train.checkpoint import load_model, upsampling_align_corners
    from dass_train.labels import CLASS_NAMES
    from dass_train.metrics import format_table
    from dass_train.trainer import ensure_synthetic, eval_dataset, run_evaluation

    model, meta, report = load_model(checkpoint, freeze_bn=not target_bn)
    cfg = build_config(preset or _recorded_preset(meta), overrides)
    # the logit upsampling is part of the model, like its normalisation: the checkpoint's, not the preset's
    cfg.model.align_corners = upsampling_align_corners(meta)
    info = distributed.setup(cfg.run.device)
    for line in report:
        print(f"  {line}")
    print(f"  logit upsampling: bilinear, align_corners={cfg.model.align_corners} (from the checkpoint)")
    model = model.to(info.device)
    ensure_synthetic(cfg)
    ds = eval_dataset(cfg, meta["normalization"])
    if target_bn:
        from dass_train.trainer import target_bn_statistics, target_dataset

        n = target_bn_statistics(
            model, target_dataset(cfg, "train", ds.transforms, with_labels=False), 8, info.device, info
        )
        model.eval()
        print(f"  BN statistics re-estimated on {n} target-train images (AdaBN)")
    with torch.no_grad():
        result = run_evaluation(model, ds, cfg, info.device, info, flip=flip, scales=scales)
    if info.is_main:
        print(format_table(result, CLASS_NAMES))
        extra = "".join(f", {k} {100 * result[k]:.2f}" for k in ("miou16", "miou13") if k in result)
        print(
            f"{checkpoint}: mIoU {100 * result['miou']:.2f}{extra} on {len(ds)} images "
            f"({cfg.preset} {cfg.data.val_split}, eval size {cfg.data.eval_size[0]}x{cfg.data.eval_size[1]})"
        )
    distributed.cleanup()
    return 0


# ------------------------------------------------------------------------------------------------ synthesize
@cli.command("synthesize", context_settings=CONTEXT, short_help="Generate the synthetic benchmark into a folder.")
@click.argument("overrides", nargs=-1, metavar="[SECTION.KEY=VALUE]...")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder [default: the preset's data.synthetic_root].",
)
@click.option(
    "--preset", type=PresetType(), default="synth2real", show_default=True, help="Preset to read defaults from."
)
@click.option(
    "--counts",
    type=NumberList("SOURCE,TRAIN,VAL", count=3, kind=int, minimum=0),
    default=None,
    help="Images per split: source, target train, target val [default: data.synthetic_counts].",
)
@click.option(
    "--size",
    type=NumberList("W,H", count=2, kind=int, minimum=1),
    default=None,
    help="Image size [default: data.synthetic_size].",
)
@click.option("--seed", type=int, default=None, help="Generator seed [default: run.seed].")
@click.option(
    "--style-shift",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Global target-style strength, 0..1 [default: data.synthetic_style_shift].",
)
@click.option(
    "--class-shift",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Class-conditional target shift (road / sidewalk colours), 0..1 [default: data.synthetic_class_shift].",
)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Generator processes.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@interruptible("interrupted: the synthetic benchmark is incomplete (no synthetic.json); run the command again")
def synthesize_command(
    overrides: tuple[str, ...],
    out: Path | None,
    preset: str,
    counts: str | None,
    size: str | None,
    seed: int | None,
    style_shift: float | None,
    class_shift: float | None,
    workers: int,
    progress: bool,
) -> int:
    """Generate the embedded synthetic benchmark (GTA5 + Cityscapes layouts) into a folder.

    An identical benchmark already there (same synthetic.json settings) is reused, one with other settings is
    regenerated (as a training run does); a folder with gta5/ or cityscapes/ data but no synthetic.json (a real
    dataset) is never touched.

    \b
      dass-train synthesize --out data/synthetic
      dass-train synthesize --out /tmp/syn --counts 60,30,10 --size 256,128 --seed 1 --style-shift 0.8
    """
    options = {
        "data.synthetic_counts": counts,
        "data.synthetic_size": size,
        "run.seed": seed,
        "data.synthetic_style_shift": style_shift,
        "data.synthetic_class_shift": class_shift,
    }
    extra = [f"{key}={value}" for key, value in options.items() if value is not None]
    return synthesize(preset, [*overrides, *extra], out, workers, progress)


def synthesize(preset: str, overrides: list[str], out: Path | None, workers: int = 1, progress: bool = True) -> int:
    from dataclasses import asdict

    from dass_train.data.synthetic import ensure_dataset
    from dass_train.trainer import synthetic_settings

    cfg = build_config(preset, overrides)
    out = Path(out or cfg.data.synthetic_root)
    settings = synthetic_settings(cfg)
    recorded = out / "synthetic.json"
    try:
        old = json.loads(recorded.read_text()) if recorded.is_file() else None
    except (OSError, ValueError):
        old = None  # ensure_dataset names the unreadable file
    if isinstance(old, dict):
        changed = [f"{k} {old.get(k)} -> {v}" for k, v in asdict(settings).items() if old.get(k) != v]
        if changed:  # generated data is a cache of its settings, as when a training run needs other settings
            print(f"replacing the synthetic benchmark in {out}: settings changed ({'; '.join(changed)})")
    start = time.perf_counter()
    ensure_dataset(out, settings, progress=progress, workers=workers)
    n = settings.n_source + settings.n_target_train + settings.n_target_val
    print(
        f"synthetic benchmark in {out}: {settings.n_source} source, {settings.n_target_train} target-train, "
        f"{settings.n_target_val} target-val images of {settings.width}x{settings.height}, seed {settings.seed} "
        f"({n} images ready after {time.perf_counter() - start:.1f} s)"
    )
    return 0


# ------------------------------------------------------------------------------------------------ presets, config
def preset_description(name: str) -> str:
    """The first comment line of the preset file: what the preset is, in one line."""
    for line in (PRESET_DIR / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip().rstrip(",;:")
    return ""


@cli.command("presets", context_settings=CONTEXT, short_help="List the presets.")
def presets_command() -> int:
    """List the presets with their one-line description."""
    names = available_presets()
    width = max(map(len, names), default=0)
    for name in names:
        click.echo(f"{name:<{width}}  {preset_description(name)}")
    return 0


@cli.command("config", context_settings=CONTEXT, short_help="Print a preset's resolved config as YAML.")
@click.argument("preset", type=PresetType())
@click.argument("overrides", nargs=-1, metavar="[SECTION.KEY=VALUE]...")
def config_command(preset: str, overrides: tuple[str, ...]) -> int:
    """Print the resolved config of PRESET with overrides applied, as YAML (what a run saves as config.yaml)."""
    import yaml

    cfg = build_config(preset, list(overrides))
    click.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False), nl=False)
    return 0


# ------------------------------------------------------------------------------------------------ entry point
def main(argv: list[str] | None = None) -> int:
    """Run ``dass-train``; returns the exit code (0, 2 for usage and user errors, 130 for Ctrl-C)."""
    try:
        code = cli.main(args=argv, prog_name="dass-train", standalone_mode=False)
    except click.ClickException as exc:  # usage errors, UserFailure, Interrupted: each shows its one line
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:  # Ctrl-C while click itself was running (parsing, prompting)
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as exc:  # raised outside a command (never expected; kept as the last line of defence)
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
