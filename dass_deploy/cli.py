"""``dass-segment`` (images, folders, globs, videos, cameras, streams; ``--benchmark``) and ``dass-export``.

User mistakes (missing files, bad options, corrupt inputs) never end in a traceback: a bad input is skipped with a
one-line warning and counted in the summary (exit 1); a bad setup prints ``error: ...`` (exit 2).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from dass_deploy.backends import BACKENDS, DEVICES
from dass_deploy.errors import DeployError

CITYSCAPES_NAME = re.compile(r"([A-Za-z]+_\d{6}_\d{6})")
RUNS_DIR = Path("runs/segment")


def export_main(argv: list[str] | None = None) -> int:
    """``dass-export`` lives in ``dass_deploy.cli_export``; imported lazily so ``dass-segment`` never loads torch."""
    from dass_deploy.cli_export import export_main as main

    return main(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dass-segment",
        description="Segment street scenes with an exported dass model (19 Cityscapes classes). SOURCE is an image, "
        "a folder (searched recursively), a glob ('data/**/*.png'), a video file (mp4, avi, mov, mkv), a camera "
        "index (0) or a stream URL (rtsp://..., http(s)://...). Outputs go to --out in the input's folder layout.",
        epilog="examples:\n  dass-segment street.png\n  dass-segment photos/ --save overlay,labels --legend\n"
        "  dass-segment drive.mp4 --backend onnxruntime\n  dass-segment leftImg8bit/val --eval gtFine/val --save labelids\n"
        "  dass-segment --benchmark --sizes 512x1024 --repeats 10",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="images, folders, globs, videos, camera index, URLs")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--model", help="exported model folder models/<name> (default: models/DEFAULT or $DASS_MODEL)")
    m.add_argument("--checkpoint", help="training checkpoint (.pt), run with PyTorch instead of an exported model")
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="runtime; auto = TensorRT if a plan, the package and a GPU exist, else ONNX Runtime "
        "(torch for --checkpoint)",
    )
    p.add_argument("--device", default="cpu", choices=DEVICES, help="where to run (default: cpu)")
    p.add_argument("--out", type=Path, help="output folder (default: runs/segment/expN, the next free N)")
    p.add_argument(
        "--save",
        default="overlay,color",
        help="comma list of outputs per image: overlay (JPEG blend), color (PNG mask), labels (trainId "
        "PNG), labelids (Cityscapes labelId PNG for the test server); default: overlay,color. "
        "Videos always get an overlay video",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the mask, 0..1 (default 0.5)")
    p.add_argument("--size", help="run at HxW (e.g. 512x1024); only a dynamic model accepts sizes other than its own")
    p.add_argument("--batch", type=int, default=1, help="images (or video frames) per inference call (default 1)")
    p.add_argument("--legend", action="store_true", help="draw a legend of the classes present on overlays")
    p.add_argument(
        "--eval",
        metavar="GT_DIR",
        type=Path,
        help="score predictions against *_gtFine_labelIds.png / *_labelTrainIds.png in GT_DIR, matched "
        "by Cityscapes name (<city>_<seq>_<frame>); prints and saves the mIoU table",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    p.add_argument("--threads", type=int, help="CPU threads for the runtime (default: one per physical core)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    b = p.add_argument_group("benchmark (--benchmark; no SOURCE needed)")
    b.add_argument(
        "--benchmark",
        action="store_true",
        help="time every available backend x precision x size; saves markdown + JSON in benchmarks/results/",
    )
    b.add_argument("--sizes", default=None, help="benchmark sizes HxW, comma separated (default: the model's)")
    b.add_argument("--repeats", type=int, default=20, help="timed runs per configuration (default 20)")
    return p


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


def segment_main(argv: list[str] | None = None) -> int:
    """Entry point of ``dass-segment``; returns the exit status (0 ok, 1 some inputs failed, 2 setup error,
    130 interrupted by Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        if args.benchmark:
            from dass_deploy.benchmark import benchmark_main

            return benchmark_main(args, argv if argv is not None else sys.argv[1:])
        if not args.sources:
            build_parser().error("give at least one SOURCE (or --benchmark)")
        return _segment(args)
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from dass_train.errors import UserError  # torch-free

        if isinstance(exc, UserError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


def _segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dass_deploy.pipeline import run_video
    from dass_deploy.segmenter import Segmenter
    from dass_deploy.sinks import ImageSink, Renderer, VideoSink, parse_save
    from dass_deploy.sources import collect_sources, open_video, read_image

    save = parse_save(args.save)
    if args.batch < 1:
        raise DeployError(f"--batch {args.batch}: must be >= 1")
    found = collect_sources(args.sources)
    failures = list(found.failures)
    for line in failures:
        _warn(line)
    if not found.images and not found.videos:
        print(f"nothing to segment; {len(failures)} failed", file=sys.stderr)
        return 1

    start = time.perf_counter()
    seg = Segmenter(
        args.checkpoint or args.model, backend=args.backend, device=args.device, size=args.size, threads=args.threads
    )
    out_dir = args.out or next_run_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    renderer = Renderer(seg.class_names, seg.palette, alpha=args.alpha, with_legend=args.legend)
    evaluator = Evaluator(args.eval, seg.num_classes) if args.eval else None
    size = f"{seg.size[0]}x{seg.size[1]}" if seg.size else "native size"
    print(f"model {seg.meta.get('name', '?')} on {seg.backend_name} ({args.device}, {size}) -> {out_dir}")

    images_done = 0
    sink = ImageSink(out_dir, save, renderer, overwrite=args.overwrite)
    bar = tqdm(total=len(found.images), desc="images", unit="img", disable=args.quiet or not found.images)
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
                sink.write(item, rgb, labels)
                if evaluator is not None:
                    evaluator.add(item.path, labels)
                images_done += 1
            except DeployError as exc:
                failures.append(str(exc))
                bar.write(f"warning: {exc}", file=sys.stderr)
            bar.update(1)
    bar.close()

    videos_done, frames_done, interrupted = 0, 0, False
    if found.videos:
        print("note: audio, if any, is not copied to the output videos")
    for item in found.videos:
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
                target.unlink(missing_ok=True)
                raise DeployError(f"{item.source}: no frame could be decoded")
            videos_done += 1
            frames_done += stats.frames
            if stats.interrupted:
                interrupted = True
                break
        except DeployError as exc:
            failures.append(str(exc))
            _warn(str(exc))

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
    return 130 if interrupted else 1 if failures else 0


def main() -> None:
    sys.exit(segment_main())


if __name__ == "__main__":
    main()
