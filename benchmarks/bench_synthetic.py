"""Speed of the synthetic GTA5 -> Cityscapes generator on ONE core.

Prints images/s for rendering only (layout + one style per image, half source, half target: what ``generate`` does
per image) and for the full ``generate`` (render + PNG writes of image and label), then writes
``benchmarks/results/synthetic_speed.md``. Rates use the CPU time of this process (``time.process_time``), so a
busy shared machine does not deflate them; wall-clock figures are printed next to them.

    python benchmarks/bench_synthetic.py --images 200 --width 512 --height 256
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from dass_deploy.machine import describe_machine, machine_markdown
from dass_train.data import synthetic as S


def bench_render(n: int, width: int, height: int) -> tuple[float, float, dict[str, float]]:
    """Returns (images/s CPU, images/s wall, ms per stage)."""
    stage = {"layout": 0.0, "source": 0.0, "target": 0.0}
    n_style = {"source": 0, "target": 0}
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(n):
        rng = np.random.default_rng([0, i])
        style = "source" if i % 2 == 0 else "target"
        t0 = time.process_time()
        scene = S.compose_scene(rng, width, height, style)
        t1 = time.process_time()
        (S.render_source if style == "source" else S.render_target)(scene, rng)
        stage["layout"] += t1 - t0
        stage[style] += time.process_time() - t1
        n_style[style] += 1
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    ms = {"layout": 1000 * stage["layout"] / n}
    ms.update({k: 1000 * stage[k] / max(n_style[k], 1) for k in ("source", "target")})
    return n / cpu, n / wall, ms


def bench_generate(n: int, width: int, height: int) -> tuple[float, float]:
    """Full generate (render + PNG writes), n images split 50/25/25 over source / target train / target val."""
    cfg = S.SyntheticConfig(
        width=width, height=height, n_source=n // 2, n_target_train=n // 4, n_target_val=n - n // 2 - n // 4, seed=0
    )
    with tempfile.TemporaryDirectory() as tmp:
        cpu0 = time.process_time()
        summary = S.generate(tmp, cfg, progress=False, workers=1)
        cpu = time.process_time() - cpu0
    return summary["images"] / cpu, summary["images_per_s"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "synthetic_speed.md")
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)  # one core: OpenCV would otherwise spread the blur / JPEG over threads

    S.render_target(S.compose_scene(np.random.default_rng(0), args.width, args.height), np.random.default_rng(0))
    r_cpu, r_wall, ms = bench_render(args.images, args.width, args.height)
    g_cpu, g_wall = bench_generate(args.images, args.width, args.height)
    size = f"{args.width}x{args.height}"
    lines = [
        f"render only (layout + one style), {size}: {r_cpu:.1f} images/s CPU ({r_wall:.1f} wall)",
        f"  per image: layout {ms['layout']:.2f} ms, source style {ms['source']:.2f} ms, target style {ms['target']:.2f} ms",
        f"full generate (render + PNG image + PNG label), {size}: {g_cpu:.1f} images/s CPU ({g_wall:.1f} wall)",
    ]
    print("\n".join(lines))
    command = "python benchmarks/bench_synthetic.py " + " ".join(argv if argv is not None else sys.argv[1:])
    m = describe_machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# Synthetic dataset generator speed (one core)\n\n"
        f"Command: `{command.strip()}`  \n"
        f"{machine_markdown(m)}\n\n"
        f"Generator v{S.GENERATOR_VERSION}, OpenCV threads = 1, {args.images} images per measurement, CPU time of the process "
        "(the machine was shared; wall-clock rates in brackets).\n\n"
        "| measurement | images/s (CPU) | images/s (wall) |\n|---|---:|---:|\n"
        f"| render only: layout + one style per image (half source, half target), {size} | {r_cpu:.1f} | {r_wall:.1f} |\n"
        f"| full `generate` (render + PNG image + PNG label), {size} | {g_cpu:.1f} | {g_wall:.1f} |\n\n"
        f"Per image: layout {ms['layout']:.2f} ms, source style {ms['source']:.2f} ms, "
        f"target style {ms['target']:.2f} ms (CPU).\n\nTarget: >= 50 images/s on one core.\n"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
