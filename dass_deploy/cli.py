"""``dass-segment`` (images, folders, globs, videos, cameras, streams; ``--benchmark``) and ``dass-export``.

click commands. User mistakes never end in a traceback: a bad option is a usage error (exit 2); a bad input is
skipped with a one-line warning and counted in the summary (exit 1); a bad setup prints ``error: ...`` (exit 2);
Ctrl-C prints the summary of what was done (exit 130), SIGTERM likewise (exit 143).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import rich_click as click

from dass_deploy.backends import BACKENDS, DEVICES
from dass_deploy.cli_common import (
    SOME_FAILED,
    Signals,
    adapt_frames_option,
    adapt_frames_value,
    adapt_passes_option,
    adapt_passes_value,
    fail,
    finish,
    require_extra,
    run_command,
)
from dass_deploy.errors import DeployError
from dass_train.extras import MISSING_EXTRA_EXIT, missing_extra

if TYPE_CHECKING:
    from dass_deploy.adapt_frames import AdaptFrames
    from dass_deploy.segmenter import Segmenter

CITYSCAPES_NAME = re.compile(r"([A-Za-z]+_\d{6}_\d{6})")
RUNS_DIR = Path("runs/segment")
BENCHMARK_RUNS_DIR = Path("runs/benchmark")

EPILOG = (
    "Exit status: 0 ok, 1 some inputs failed (or the extra a runtime needs is not installed), 2 usage or setup "
    "error, 130 Ctrl-C, 143 SIGTERM."
)
#: --backend -> the extra that brings its runtime (ONNX Runtime comes with the base install).
BACKEND_EXTRAS = {"torch": "train", "openvino": "openvino", "tensorrt": "gpu"}


def export_main(argv: Sequence[str] | None = None) -> int:
    """``dass-export`` lives in ``dass_deploy.cli_export``; imported lazily so ``dass-segment`` never loads torch.
    Without the ``train`` extra (torch, onnx) it prints the one line naming it and returns 1."""
    message = missing_extra("dass-export", "train")
    if message:
        click.echo(message, err=True)
        return MISSING_EXTRA_EXIT
    from dass_deploy.cli_export import export_main as main

    return main(argv)


def _size_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Check ``--size HxW`` while parsing, so a typo is a usage error before any model loads."""
    from dass_deploy.segmenter import parse_size

    if value is not None:
        try:
            parse_size(value)
        except DeployError as exc:
            raise click.BadParameter(f"{value!r}: " + str(exc).split(": ", 1)[-1]) from None
    return value


def _sizes_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        for part in value.split(","):
            _size_option(ctx, param, part)
    return value


def _model_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | None:
    """``--model NAME|DIR``: a folder as given, else a model name looked up in the user's and the bundled models."""
    from dass_deploy.repository import find_model

    if value is None:
        return None
    try:
        return find_model(value)
    except DeployError as exc:
        raise click.BadParameter(str(exc)) from None


def _save_option(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from dass_deploy.sinks import parse_save

    try:
        parse_save(value)
    except DeployError as exc:
        raise click.BadParameter(str(exc).split(": ", 1)[-1]) from None
    return value


@click.command(
    "dass-segment",
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.argument("sources", nargs=-1, metavar="[SOURCE]...")
@click.option(
    "--model",
    callback=_model_option,
    metavar="NAME|DIR",
    help="Exported model: a folder, or the name of one in ./models ($DASS_MODELS if set), then in the bundled models "
    "(default: $DASS_MODEL, else the model named by DEFAULT there).",
)
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, dir_okay=False),
    help="Training checkpoint (.pt), run with PyTorch instead of an exported model.",
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="auto",
    show_default=True,
    help="Runtime; auto = TensorRT if a plan, the package and a GPU exist, else ONNX Runtime (torch for --checkpoint).",
)
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True, help="Where to run.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder (default: runs/segment/expN, the next free N; with --benchmark, runs/benchmark/expN).",
)
@click.option(
    "--save",
    default="overlay,color",
    show_default=True,
    callback=_save_option,
    help="Comma list of outputs per image: overlay (JPEG blend), color (PNG mask), labels (trainId PNG), labelids "
    "(Cityscapes labelId PNG for the test server). Videos always get an overlay video.",
)
@click.option(
    "--alpha", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True, help="Overlay opacity of the mask."
)
@click.option(
    "--size",
    callback=_size_option,
    metavar="HxW",
    help="Run at HxW (e.g. 512x1024); only a dynamic model accepts sizes other than its own.",
)
@click.option(
    "--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Images (or frames) per inference call."
)
@click.option("--legend", is_flag=True, help="Draw a legend of the classes present on overlays.")
@click.option(
    "--eval",
    "gt_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    metavar="GT_DIR",
    help="Score predictions against *_gtFine_labelIds.png / *_labelTrainIds.png in GT_DIR, matched by Cityscapes "
    "name (<city>_<seq>_<frame>); prints and saves the mIoU table.",
)
@click.option(
    "--adapt-bn",
    metavar="SOURCE",
    help="First re-estimate the BatchNorm statistics on unlabelled frames of SOURCE (image folder, glob, video, "
    "camera, stream) at the run size, in memory: in PyTorch with --checkpoint, with ONNX Runtime for a model "
    "exported with --keep-bn. Measured to help trainable-BN models; warns for frozen-BN ones (docs/ADAPT_BN.md).",
)
@adapt_frames_option
@adapt_passes_option
@click.option("--overwrite", is_flag=True, help="Replace existing outputs in --out.")
@click.option(
    "--threads", type=click.IntRange(min=1), help="CPU threads for the runtime (default: one per physical core)."
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option(
    "--benchmark",
    is_flag=True,
    help="Time every available backend x precision x size (no SOURCE needed); saves the table as markdown + JSON "
    "(segment_<device>.md, .json) in --out (default: runs/benchmark/expN, the next free N).",
)
@click.option("--sizes", callback=_sizes_option, metavar="HxW,...", help="Benchmark sizes (default: the model's).")
@click.option(
    "--repeats", type=click.IntRange(min=1), default=20, show_default=True, help="Benchmark: timed runs per setup."
)
@click.option(
    "--json",
    "json_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Benchmark: also merge the rows (backend, precision, size, p50_ms, p95_ms, ...) and this machine's "
    "description (CPU model, instruction sets, runtime versions, threads) into FILE; rows of other machines stay.",
)
@click.option(
    "--precision",
    type=click.Choice(("fp32", "bf16")),
    default="fp32",
    show_default=True,
    help="Compute precision of the runtime where it has a choice: bf16 runs OpenVINO in bfloat16 (faster on CPUs "
    "with AVX512_BF16 / AMX, labels may differ slightly); other backends run the exported graph as it is.",
)
@click.pass_context
def segment(ctx: click.Context, **params: object) -> None:
    """Segment street scenes with an exported dass model (19 Cityscapes classes).

    SOURCE is an image, a folder (searched recursively), a glob ('data/**/*.png'), a video file (mp4, avi, mov,
    mkv), a camera index (0) or a stream URL (rtsp://..., http(s)://...). Outputs go to --out in the input's
    folder layout.

    \b
    Examples:
      dass-segment street.png
      dass-segment photos/ --save overlay,labels --legend
      dass-segment drive.mp4 --backend onnxruntime
      dass-segment leftImg8bit/val --eval gtFine/val --save labelids
      dass-segment --benchmark --sizes 512x1024 --repeats 10 --json bench.json
      dass-segment street.png --backend openvino --precision bf16
      dass-segment drive.mp4 --checkpoint last.pt --adapt-bn drive.mp4
    """
    args = argparse.Namespace(**params)
    args.eval = args.gt_dir
    args.json = args.json_file
    if args.json and not args.benchmark:
        raise click.UsageError("--json FILE is for --benchmark")
    if args.model and args.checkpoint:
        raise click.UsageError("--model and --checkpoint are mutually exclusive: give one")
    if not args.benchmark and not args.sources:
        raise click.UsageError("give at least one SOURCE (or --benchmark)")
    args.adapt_frames = adapt_frames_value(args.adapt_bn, args.adapt_frames)
    args.adapt_passes = adapt_passes_value(args.adapt_bn, args.adapt_passes)
    if args.adapt_bn is not None and args.benchmark:
        raise click.UsageError("--adapt-bn is not used with --benchmark")
    if args.adapt_bn is not None and not args.checkpoint and args.backend not in ("auto", "onnxruntime"):
        raise click.UsageError(
            "--adapt-bn with an exported model re-estimates and runs it with ONNX Runtime: use --backend onnxruntime "
            "(or --checkpoint CKPT for PyTorch)"
        )
    if args.checkpoint:
        require_extra("dass-segment --checkpoint", "train")
    elif args.backend in BACKEND_EXTRAS:
        require_extra(f"dass-segment --backend {args.backend}", BACKEND_EXTRAS[args.backend])
    from dass_train.errors import UserError  # torch-free

    with Signals() as signals:
        try:
            if args.benchmark:
                from dass_deploy.benchmark import benchmark_main

                args.out = args.out or next_run_dir(BENCHMARK_RUNS_DIR)  # created when the table is saved
                argv = (ctx.obj or {}).get("argv", sys.argv[1:])
                code = benchmark_main(args, argv)
            else:
                code = _segment(args, signals)
        except (DeployError, UserError) as exc:
            fail(str(exc))
        except KeyboardInterrupt:  # before any input was done (e.g. while the model loads)
            click.echo("interrupted", err=True)
            code = signals.exit_code
    finish(code)


def segment_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dass-segment``; returns the exit status (0 ok, 1 some inputs failed, 2 setup error, 130
    Ctrl-C, 143 SIGTERM). ``--help`` and usage errors exit like argparse did (``SystemExit``)."""
    return run_command(segment, argv, "dass-segment")


def next_run_dir(root: Path = RUNS_DIR) -> Path:
    """``root/expN`` for the smallest N >= 1 that does not exist yet (earlier runs are never touched)."""
    n = 1
    while (root / f"exp{n}").exists():
        n += 1
    return root / f"exp{n}"


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class Evaluator:
    """Accumulates a confusion matrix over predictions whose ground truth is found in GT_DIR by Cityscapes name."""

    def __init__(self, gt_dir: Path, num_classes: int):
        if not gt_dir.is_dir():
            raise DeployError(f"--eval {gt_dir}: folder not found")
        self.num_classes = num_classes
        self.gt: dict[str, Path] = {}
        for path in sorted(gt_dir.rglob("*.png")):
            match = CITYSCAPES_NAME.search(path.name)
            if not match:
                continue
            # labelIds are the official files; prefer them when both exist.
            if path.name.endswith("_gtFine_labelIds.png") or (
                path.name.endswith("_labelTrainIds.png") and match.group(1) not in self.gt
            ):
                self.gt[match.group(1)] = path
        if not self.gt:
            raise DeployError(f"--eval {gt_dir}: no *_gtFine_labelIds.png or *_labelTrainIds.png files")
        self.conf = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.matched: list[str] = []

    def add(self, image_path: Path, labels: np.ndarray) -> None:
        from dass_train.labels import label_ids_to_train_ids
        from dass_train.metrics import confusion_matrix

        match = CITYSCAPES_NAME.search(image_path.name)
        gt_path = self.gt.get(match.group(1)) if match else None
        if gt_path is None:
            return
        gt = cv2.imread(str(gt_path), cv2.IMREAD_UNCHANGED)
        if gt is None or gt.ndim != 2:
            raise DeployError(f"{gt_path}: cannot read a single-channel label PNG")
        if gt_path.name.endswith("_labelIds.png"):
            gt = label_ids_to_train_ids(gt)
        if gt.shape != labels.shape:
            labels = cv2.resize(labels, (gt.shape[1], gt.shape[0]), interpolation=cv2.INTER_NEAREST)
        self.conf += confusion_matrix(labels, gt, self.num_classes)
        self.matched.append(match.group(1))

    def report(self, class_names: list[str], out_dir: Path) -> str:
        from dass_train.metrics import format_table, scores

        result = scores(self.conf)
        (out_dir / "eval.json").write_text(
            json.dumps({"images": self.matched, "confusion": self.conf.tolist(), **result}, indent=1)
        )
        return f"eval on {len(self.matched)} image(s):\n" + format_table(result, class_names)


def _segmenter(args: argparse.Namespace, frames: AdaptFrames | None) -> Segmenter:
    """The segmenter of the options; with ``--adapt-bn`` its model's BN statistics re-estimated on ``frames`` first:
    in PyTorch for ``--checkpoint``, with ONNX Runtime for an exported model kept with its BN nodes."""
    from dass_deploy.segmenter import Segmenter, parse_size

    options = dict(device=args.device, size=args.size, threads=args.threads, precision=args.precision)
    if frames is None:
        return Segmenter(args.checkpoint or args.model, backend=args.backend, **options)
    if args.checkpoint:
        from dass_deploy.adapt_bn import adapt_torch_backend

        seg = Segmenter(args.checkpoint, backend=args.backend, **options)
        adaptation = adapt_torch_backend(seg.backend, frames, seg.size, not args.quiet, args.adapt_passes)
    else:
        from dass_deploy.adapt_bn_onnx import adapt_exported_model
        from dass_deploy.repository import default_model_dir

        backend, adaptation = adapt_exported_model(
            args.model or default_model_dir(),
            frames,
            parse_size(args.size),
            args.device,
            args.threads,
            not args.quiet,
            args.adapt_passes,
        )
        seg = Segmenter(backend, **options)
    print(adaptation.summary)
    for note in adaptation.notes:
        print(f"note: {note}")
    for warning in adaptation.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return seg


def _segment(args: argparse.Namespace, signals: Signals) -> int:
    from tqdm import tqdm

    from dass_deploy.pipeline import run_video
    from dass_deploy.sinks import ImageSink, Renderer, VideoSink, parse_save
    from dass_deploy.sources import collect_sources, open_video, read_image

    save = parse_save(args.save)
    found = collect_sources(args.sources)
    failures = list(found.failures)
    for line in failures:
        _warn(line)
    if not found.images and not found.videos:
        print(f"nothing to segment; {len(failures)} failed", file=sys.stderr)
        return 1

    start = time.perf_counter()
    frames = None
    if args.adapt_bn is not None:  # checked before the model loads; read and used before anything is written
        from dass_deploy.adapt_frames import open_adapt_frames

        frames = open_adapt_frames(args.adapt_bn, args.adapt_frames)
    seg = _segmenter(args, frames)
    out_dir = args.out or next_run_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    renderer = Renderer(seg.class_names, seg.palette, alpha=args.alpha, with_legend=args.legend)
    evaluator = Evaluator(args.eval, seg.num_classes) if args.eval else None
    size = f"{seg.size[0]}x{seg.size[1]}" if seg.size else "native size"
    print(f"model {seg.meta.get('name', '?')} on {seg.backend_name} ({args.device}, {size}) -> {out_dir}")

    images_done, interrupted = 0, False
    sink = ImageSink(out_dir, save, renderer, overwrite=args.overwrite)
    bar = tqdm(total=len(found.images), desc="images", unit="img", disable=args.quiet or not found.images)
    try:
        for i in range(0, len(found.images), args.batch):
            batch, pixels = [], []
            for item in found.images[i : i + args.batch]:
                try:
                    sink.check(item)
                    pixels.append(read_image(item.path))
                    batch.append(item)
                except DeployError as exc:
                    failures.append(str(exc))
                    bar.write(f"warning: {exc}", file=sys.stderr)
                    bar.update(1)
            if not batch:
                continue
            for item, rgb, labels in zip(batch, pixels, seg.predict_batch(pixels), strict=True):
                try:
                    with signals.deferred():  # all of an image's outputs, or none
                        sink.write(item, rgb, labels)
                        images_done += 1
                    if evaluator is not None:
                        evaluator.add(item.path, labels)
                except DeployError as exc:
                    failures.append(str(exc))
                    bar.write(f"warning: {exc}", file=sys.stderr)
                bar.update(1)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep what is written, report it, skip the rest
        interrupted = True
    bar.close()

    videos_done, frames_done = 0, 0
    if found.videos and not interrupted:
        print("note: audio, if any, is not copied to the output videos")
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # VideoSink reports write failures itself
    for item in found.videos if not interrupted else []:
        suffix = ".avi" if str(item.source).lower().endswith(".avi") else ".mp4"
        target = out_dir / f"{item.name}_overlay{suffix}"
        try:
            if target.exists() and not args.overwrite:
                raise DeployError(f"{target} exists (use --overwrite to replace it)")
            capture, info = open_video(item)
            video_sink = VideoSink(target, info.fps, info.width, info.height)
            stats = run_video(
                seg,
                capture,
                video_sink,
                renderer,
                total=info.frames,
                batch=args.batch,
                progress=not args.quiet,
                desc=str(item.name),
            )
            if stats.frames == 0:
                raise DeployError(f"{item.source}: no frame could be decoded")
            videos_done += 1
            frames_done += stats.frames
            if stats.interrupted:
                interrupted = True
                break
        except DeployError as exc:
            failures.append(str(exc))
            _warn(str(exc))
        except KeyboardInterrupt:  # between videos, or while one opens
            interrupted = True
            break

    seconds = time.perf_counter() - start
    parts = [f"{images_done} image{'s' * (images_done != 1)}"]
    if found.videos:
        parts.append(f"{videos_done} video{'s' * (videos_done != 1)} ({frames_done} frames)")
    summary = f"{', '.join(parts)} in {seconds:.1f} s"
    if failures:
        summary += f"; {len(failures)} failed: " + "; ".join(failures)
    if interrupted:
        summary += " (interrupted)"
    if evaluator is not None:
        if evaluator.matched:
            print(evaluator.report(seg.class_names, out_dir))
        else:
            failures.append(f"--eval {args.eval}: no prediction matched a ground-truth file by Cityscapes name")
            _warn(failures[-1])
    print(summary)
    print(f"results in {out_dir}")
    return signals.exit_code if interrupted else SOME_FAILED if failures else 0


def main() -> None:
    sys.exit(segment_main())


if __name__ == "__main__":
    main()
