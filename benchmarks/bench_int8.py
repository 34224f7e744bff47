"""INT8 vs fp32 ONNX on CPU: latency (same run, same inputs, median of repeats) and mIoU change on a labelled val set.

    python benchmarks/bench_int8.py --model-checkpoint runs/synthetic/final.pt --data-root data/synthetic/target \
        [--calib DIR] [--height 256 --width 512] [--repeats 10] [--threads 2]

``--data-root`` is a Cityscapes-layout folder (``leftImg8bit/val/...`` + ``gtFine/val/...``); calibration uses
``leftImg8bit/train`` under it unless ``--calib`` is given. Writes ``benchmarks/results/int8.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dass_deploy.errors import DeployError
from dass_deploy.export import evaluate_miou_pair, export_model, list_images, load_image

RESULTS = Path(__file__).resolve().parent / "results"


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _latency_ms(sessions: dict[str, ort.InferenceSession], image: np.ndarray, repeats: int) -> dict[str, float]:
    """Median latency per session; runs are interleaved so both see the same machine load."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, {"image": image})  # warm-up
    for _ in range(repeats):
        for key, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {"image": image})
            times[key].append((time.perf_counter() - start) * 1000)
    return {k: float(np.median(v)) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-checkpoint", required=True, help="trained checkpoint (.pt)")
    p.add_argument("--data-root", required=True, help="Cityscapes-layout target data (leftImg8bit/, gtFine/)")
    p.add_argument("--calib", default=None, help="calibration images (default: <data-root>/leftImg8bit/train)")
    p.add_argument("--height", type=int, default=256, help="export height (default: 256)")
    p.add_argument("--width", type=int, default=512, help="export width (default: 512)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per model (default: 10)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default: 2)")
    p.add_argument("--out", default=str(RESULTS), help="results folder (default: benchmarks/results)")
    args = p.parse_args(argv)

    root = Path(args.data_root)
    calib = Path(args.calib) if args.calib else root / "leftImg8bit" / "train"
    try:
        with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
            common = dict(out=tmp, height=args.height, width=args.width, output="logits", progress=True)
            fp32 = export_model(args.model_checkpoint, name="fp32", **common)
            int8 = export_model(args.model_checkpoint, name="int8", int8=True, calib=calib, force=True, **common)
            fp32_path, int8_path = (r.model_dir / "1" / "model.onnx" for r in (fp32, int8))
            sessions = {"fp32": _session(fp32_path, args.threads), "int8": _session(int8_path, args.threads)}
            val_images = list_images(root / "leftImg8bit" / "val") or list_images(root / "leftImg8bit")
            if not val_images:
                raise DeployError(f"--data-root {root}: no images under leftImg8bit/")
            image = load_image(val_images[0], args.height, args.width)[None]
            latency = _latency_ms(sessions, image, args.repeats)
            miou = evaluate_miou_pair(sessions["fp32"], sessions["int8"], root, args.height, args.width)
            size_mb = {k: path.stat().st_size / 1e6 for k, path in (("fp32", fp32_path), ("int8", int8_path))}
            agreement = int8.meta["parity"]["argmax_agreement"]
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    command = "python benchmarks/bench_int8.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    result = {
        "command": command,
        "checkpoint": str(args.model_checkpoint),
        "size": [args.height, args.width],
        "threads": args.threads,
        "repeats": args.repeats,
        "latency_ms": latency,
        "speedup": latency["fp32"] / latency["int8"],
        "model_mb": size_mb,
        "argmax_agreement_vs_torch": agreement,
        **miou,
        "onnxruntime": ort.__version__,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "int8.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "# INT8 (ONNX Runtime static QDQ) vs fp32, CPU",
        "",
        f"Command: `{command}`",
        "",
        f"Input {args.height}x{args.width}, ONNX Runtime {ort.__version__} CPU, {args.threads} threads, "
        f"median of {args.repeats} interleaved runs on the same input.",
        "",
        "| model | latency (ms) | size (MB) | mIoU (val, export size) |",
        "|---|---|---|---|",
        f"| fp32 | {latency['fp32']:.1f} | {size_mb['fp32']:.1f} | {miou['miou_fp32']:.2f} |",
        f"| int8 | {latency['int8']:.1f} | {size_mb['int8']:.1f} | {miou['miou_int8']:.2f} |",
        "",
        f"Speed-up {result['speedup']:.2f}x, mIoU change {-miou['miou_drop']:+.2f} points on {miou['val_images']} "
        f"val images, argmax agreement with torch fp32 {100 * agreement:.2f}%.",
    ]
    (out / "int8.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
