"""Video pipeline rate vs model-only rate: how much of the model's speed survives decode + overlay + encode.

This used to be a ratio asserted in ``tests/test_video.py``; a speed depends on the machine and its load, so it is
measured here and recorded with the machine instead. The model is a random-init DeepLab-V2 (speed does not depend on
the weights) exported with the real ``export_model``; the clip pans over the real street sample. Writes
``benchmarks/results/video_pipeline.{md,json}`` with the command and the machine (``dass_deploy.machine``: CPU model,
cores, instruction sets, library versions, thread settings).

    python benchmarks/bench_video.py [--frames 120] [--size 128x256] [--backbone resnet18] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dass_deploy.machine import describe_machine, machine_markdown  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
STREET = REPO / "tests" / "data" / "cityscapes" / "street_1024x512.png"


def make_clip(path: Path, frames: int, height: int, width: int) -> Path:
    import cv2

    street = cv2.imread(str(STREET))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (width, height))
    for t in range(frames):
        x0 = int(512 * (t % 50) / 50)
        writer.write(cv2.resize(street[:, x0 : x0 + 512], (width, height), interpolation=cv2.INTER_AREA))
    writer.release()
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=120)
    p.add_argument("--size", default="128x256", help="HxW of the model and the clip")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: its own choice)")
    args = p.parse_args()

    import numpy as np
    import torch

    from dass_deploy.export import export_model
    from dass_deploy.pipeline import run_video
    from dass_deploy.segmenter import Segmenter, parse_size
    from dass_deploy.sinks import Renderer, VideoSink
    from dass_deploy.sources import VideoItem, open_video
    from dass_train.checkpoint import checkpoint_meta_default, save_checkpoint
    from dass_train.network import deeplab_v2

    height, width = parse_size(args.size)
    host = describe_machine()  # before the run: the load average says how busy the (shared) machine was
    load = [round(v, 2) for v in os.getloadavg()]
    command = "python benchmarks/bench_video.py " + shlex.join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="dass-bench-video-") as tmp_str:
        tmp = Path(tmp_str)
        torch.manual_seed(0)
        ckpt = tmp / "random.pt"
        meta = checkpoint_meta_default(backbone=args.backbone, stage="random-init (benchmark)")
        model = deeplab_v2(num_classes=19, backbone=args.backbone)
        save_checkpoint(ckpt, {"format": "dass-checkpoint", "version": 1, "model": model.state_dict(), "meta": meta})
        model_dir = export_model(
            ckpt, out=tmp / "models", name="bench", height=height, width=width, parity_samples=1, progress=False
        ).model_dir
        seg = Segmenter(model_dir, backend="onnxruntime", threads=args.threads)
        x = np.random.default_rng(0).uniform(0, 255, (1, 3, height, width)).astype(np.float32)
        for _ in range(5):  # warm-up
            seg.backend.predict(x)

        def model_only_fps() -> float:
            start = time.perf_counter()
            for _ in range(args.frames):
                seg.backend.predict(x)
            return args.frames / (time.perf_counter() - start)

        before = model_only_fps()

        clip = make_clip(tmp / "clip.mp4", args.frames, height, width)
        capture, info = open_video(VideoItem(str(clip), "clip", "video"))
        sink = VideoSink(tmp / "out.mp4", info.fps, info.width, info.height)
        render = Renderer(seg.class_names, seg.palette, with_legend=True)
        stats = run_video(seg, capture, sink, render, total=info.frames, progress=False)
        after = model_only_fps()  # timed before and after the pipeline: a shared machine's load drifts
        model_fps = (before + after) / 2

    result = {
        "command": command,
        "model": f"DeepLab-V2 {args.backbone} (random init), ONNX Runtime fp32, {height}x{width}, batch 1",
        "frames": stats.frames,
        "model_only_fps": round(model_fps, 2),
        "model_only_fps_before_after": [round(before, 2), round(after, 2)],
        "pipeline_fps": round(stats.fps, 2),
        "pipeline_over_model": round(stats.fps / model_fps, 3),
        "threads": args.threads,
        "machine": host,
        "load_average_1_5_15min_at_start": load,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "video_pipeline.json").write_text(json.dumps(result, indent=1) + "\n")
    md = (
        "# Video pipeline vs model-only rate\n\n"
        f"Command: `{command}`\n\n"
        f"{machine_markdown(host)} {host['platform']}; load average at start {' / '.join(map(str, load))} "
        "(1 / 5 / 15 min).\n\n"
        f"Model: {result['model']}; {stats.frames} frames\n\n"
        "| model only (fps, mean of before / after) | decode + infer + overlay + encode (fps) | ratio |\n"
        "|---|---|---|\n"
        f"| {result['model_only_fps']} ({before:.2f} / {after:.2f}) | {result['pipeline_fps']} "
        f"| {result['pipeline_over_model']} |\n"
    )
    (RESULTS / "video_pipeline.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
