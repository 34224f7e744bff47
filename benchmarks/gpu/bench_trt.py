"""TensorRT fp16 / INT8 engines vs ONNX Runtime CUDA vs torch (fp32, bf16, fp16) at 1024x2048 on one CUDA GPU.

    python benchmarks/gpu/bench_trt.py --work runs/gpu_suite --out benchmarks/results/gpu [--repeats 50]

Starts from ``prepare.py``'s random ResNet-101 checkpoint (speed does not depend on the weight values): exports a
TensorRT fp16 plan and an INT8 plan (QDQ, calibrated on the synthetic target-train images) with the real
``export_model``, times every backend through ``dass_deploy.benchmark.run_benchmark`` (batch 1, model only, after
warm-up) and measures label agreement of each engine with torch fp32 on the synthetic target-val images. The goal
it checks: TensorRT fp16 >= 60 FPS at 1024x2048.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
GOAL_FPS = 60.0


def agreement(model_dir: Path, ckpt_model_dir: Path, images: np.ndarray, backend: str) -> float:
    """Fraction of pixels where ``backend`` on ``model_dir`` and torch fp32 (CUDA) give the same class."""
    from dass_deploy.backends import create_backend

    engine = create_backend(model_dir, backend=backend, device="cuda")
    reference = create_backend(ckpt_model_dir, backend="torch", device="cuda")
    same = [(engine.predict(x[None]) == reference.predict(x[None])).mean() for x in images]
    return float(np.mean(same))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--agreement-images", type=int, default=4)
    args = p.parse_args(argv)

    from dass_deploy.benchmark import run_benchmark, save_results
    from dass_deploy.export import export_model, list_images, load_image

    work, out = Path(args.work), Path(args.out)
    prep = json.loads((work / "prepare.json").read_text())
    height, width = prep["export_size"]
    calib = Path(prep["target_root"]) / "leftImg8bit" / "train"
    common = dict(out=work / "models", height=height, width=width, parity_samples=1, overwrite=True)
    fp16 = export_model(prep["checkpoint"], name="trt-fp16", fp16=True, trt=True, **common)
    int8 = export_model(prep["checkpoint"], name="trt-int8", int8=True, calib=calib, calib_max=8, trt=True,
                        force=True, **common)  # fmt: skip

    rows = []
    rows += run_benchmark(
        model=prep["model_dir"], repeats=args.repeats, device="cuda", backends=["onnxruntime", "torch"]
    )
    for result in (fp16, int8):
        rows += run_benchmark(model=result.model_dir, repeats=args.repeats, device="cuda", backends=["tensorrt"])
    val = list_images(Path(prep["target_root"]) / "leftImg8bit" / "val")[: args.agreement_images]
    images = np.stack([load_image(path, height, width) for path in val])
    agree = {
        "tensorrt fp16": agreement(fp16.model_dir, Path(prep["model_dir"]), images, "tensorrt"),
        "tensorrt int8": agreement(int8.model_dir, Path(prep["model_dir"]), images, "tensorrt"),
        "onnxruntime-cuda fp32": agreement(Path(prep["model_dir"]), Path(prep["model_dir"]), images, "onnxruntime"),
    }
    trt_fp16 = [r for r in rows if r["backend"] == "tensorrt" and r["precision"] == "fp16" and "img_per_s" in r]
    notes = [f"Label agreement with torch fp32 (CUDA) on {len(images)} synthetic target-val images: "
             + ", ".join(f"{k} {100 * v:.2f}%" for k, v in agree.items())]  # fmt: skip
    if trt_fp16:
        fps = trt_fp16[0]["img_per_s"]
        notes.append(f"Goal TensorRT fp16 >= {GOAL_FPS:.0f} FPS at {height}x{width}: {fps:.1f} FPS, "
                     f"{'meets' if fps >= GOAL_FPS else 'does NOT meet'} it.")  # fmt: skip
    command = "python benchmarks/gpu/bench_trt.py " + " ".join(argv if argv is not None else sys.argv[1:])
    save_results(rows, "trt_cuda", command, out, notes=notes)
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
