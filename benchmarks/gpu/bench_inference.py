"""Inference at 1024x2048 on one CUDA GPU: what this machine can run, each timed with its peak memory.

    python benchmarks/gpu/bench_inference.py --work runs/gpu_suite --out benchmarks/results/gpu [--repeats 50]
    python benchmarks/gpu/bench_inference.py --probe     # which GPU runtimes are installed (no GPU needed)
    python benchmarks/gpu/bench_inference.py --work W --out O --device cpu --repeats 2   # a smoke run, no figures

Starts from ``prepare.py``'s random ResNet-101 checkpoint and its ONNX export (speed does not depend on the weight
values). Always, through the real backends: torch eager fp32 / fp16 / bf16 (``dass_deploy.benchmark.run_benchmark``)
and ``torch.compile`` fp32 / fp16 (``TorchBackend(compile=True)``, compile time recorded, timed last and saved
row by row, so a compile that runs past the suite's limit keeps every other figure). Where installed: TensorRT
fp16 / INT8 plans built by the real ``export_model`` and ONNX Runtime's CUDA provider. A runtime that is not there
is a row saying so, not a failure: a bare CUDA machine has neither TensorRT nor onnxruntime-gpu. Label agreement of
each engine with torch fp32 on the synthetic target-val images goes into the notes, and so does the goal the README
names (TensorRT fp16 >= 60 FPS), when TensorRT ran.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
GOAL_FPS = 60.0
COMPILE_PRECISIONS = ("fp32", "fp16")


def runtimes() -> dict[str, str]:
    """``{runtime: "available" | "unavailable: why"}`` for the GPU runtimes beside torch; imports neither."""
    found = {}
    if importlib.util.find_spec("tensorrt") is None:
        found["tensorrt"] = "unavailable: the 'tensorrt' package is not installed (pip install 'dass[gpu]')"
    else:
        found["tensorrt"] = "available"
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        found["onnxruntime-cuda"] = "available"
    else:
        found["onnxruntime-cuda"] = (
            f"unavailable: onnxruntime {ort.__version__} has no CUDAExecutionProvider (pip install 'dass[gpu]')"
        )
    return found


def time_compiled(checkpoint: str, precision: str, size: tuple[int, int], repeats: int, device: str) -> dict[str, Any]:
    """``torch.compile`` of the torch backend: compile time (the first calls), then latency and peak memory."""
    import torch

    from dass_deploy.backends.torch_backend import TorchBackend

    row: dict[str, Any] = {"backend": f"torch-{device} compile", "precision": precision, "device": device,
                           "size": f"{size[0]}x{size[1]}", "threads": 0}  # fmt: skip
    cuda = device == "cuda"
    try:
        start = time.perf_counter()
        backend = TorchBackend(checkpoint, device=device, precision=precision, compile=True)
        x = np.random.default_rng(0).uniform(0, 255, (1, 3, *size)).astype(np.float32)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(3):  # the first call compiles; the next ones settle the autotuner's choices
            backend.predict(x)
        row["compile_s"] = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            backend.predict(x)
            times.append((time.perf_counter() - t0) * 1000.0)
    except Exception as exc:  # inductor needs Triton and a C compiler: a machine without them records why
        row["skipped"] = f"failed: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
        return row
    ms = np.asarray(times)
    row.update(p50_ms=float(np.percentile(ms, 50)), p95_ms=float(np.percentile(ms, 95)), mean_ms=float(ms.mean()),
               img_per_s=float(1000.0 / ms.mean()), repeats=repeats,
               peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0,
               memory_kind="cuda max allocated" if cuda else "not measured")  # fmt: skip
    return row


def agreement(engine: Any, reference: Any, images: np.ndarray) -> float:
    """Fraction of pixels where two backends give the same class."""
    return float(np.mean([(engine.predict(x[None]) == reference.predict(x[None])).mean() for x in images]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", help="the suite's work folder (prepare.json)")
    p.add_argument("--out", help="results folder")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--agreement-images", type=int, default=4)
    p.add_argument("--probe", action="store_true", help="print which GPU runtimes are installed (JSON) and exit")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke run of this script only")
    args = p.parse_args(argv)
    found = runtimes()
    if args.probe:
        print(json.dumps(found, indent=1))
        return 0
    if not args.work or not args.out:
        p.error("--work and --out are required (or --probe)")

    from dass_deploy.backends import create_backend
    from dass_deploy.benchmark import run_benchmark, save_results
    from dass_deploy.export import export_model, list_images, load_image

    work, out = Path(args.work), Path(args.out)
    prep = json.loads((work / "prepare.json").read_text())
    height, width = prep["export_size"]
    model_dir = Path(prep["model_dir"])
    cuda = args.device == "cuda"
    rows = run_benchmark(model=model_dir, repeats=args.repeats, device=args.device, backends=["torch"], progress=False)

    engines: dict[str, Any] = {}
    if cuda and found["onnxruntime-cuda"] == "available":
        rows += run_benchmark(model=model_dir, repeats=args.repeats, device="cuda", backends=["onnxruntime"])
        engines["onnxruntime-cuda fp32"] = create_backend(model_dir, backend="onnxruntime", device="cuda")
    else:
        rows.append({"backend": "onnxruntime-cuda", "precision": "fp32", "device": "cuda",
                     "size": f"{height}x{width}", "skipped": found["onnxruntime-cuda"]})  # fmt: skip
    if cuda and found["tensorrt"] == "available":
        calib = Path(prep["target_root"]) / "leftImg8bit" / "train"
        common = dict(out=work / "models", height=height, width=width, parity_samples=1, overwrite=True)
        fp16 = export_model(prep["checkpoint"], name="trt-fp16", fp16=True, trt=True, **common)
        int8 = export_model(prep["checkpoint"], name="trt-int8", int8=True, calib=calib, calib_max=8, trt=True,
                            force=True, **common)  # fmt: skip
        for label, result in (("tensorrt fp16", fp16), ("tensorrt int8", int8)):
            rows += run_benchmark(model=result.model_dir, repeats=args.repeats, device="cuda", backends=["tensorrt"])
            engines[label] = create_backend(result.model_dir, backend="tensorrt", device="cuda")
    else:
        for precision in ("fp16", "int8"):
            rows.append({"backend": "tensorrt", "precision": precision, "device": "cuda",
                         "size": f"{height}x{width}", "skipped": found["tensorrt"]})  # fmt: skip

    for precision in ("fp16", "bf16") if cuda else ():  # autocast runs on CUDA only
        engines[f"torch eager {precision} autocast"] = create_backend(
            model_dir, backend="torch", device="cuda", precision=precision
        )
    reference = create_backend(model_dir, backend="torch", device=args.device, precision="fp32")
    val = list_images(Path(prep["target_root"]) / "leftImg8bit" / "val")[: args.agreement_images]
    images = np.stack([load_image(path, height, width) for path in val])
    agree = {label: agreement(engine, reference, images) for label, engine in engines.items()}
    notes = [f"Label agreement with torch eager fp32 on {len(images)} synthetic target-val images: "
             + ", ".join(f"{k} {100 * v:.2f}%" for k, v in agree.items())]  # fmt: skip
    trt_fp16 = [r for r in rows if r["backend"] == "tensorrt" and r["precision"] == "fp16" and "img_per_s" in r]
    if trt_fp16:
        fps = trt_fp16[0]["img_per_s"]
        notes.append(f"Goal TensorRT fp16 >= {GOAL_FPS:.0f} FPS at {height}x{width}: {fps:.1f} FPS, "
                     f"{'meets' if fps >= GOAL_FPS else 'does NOT meet'} it.")  # fmt: skip
    command = "python benchmarks/gpu/bench_inference.py " + " ".join(argv if argv is not None else sys.argv[1:])
    save_results(rows, "gpu_inference", command, out, notes=notes)  # saved before compiling: a timeout keeps these
    for precision in COMPILE_PRECISIONS if cuda else ("fp32",):
        row = time_compiled(prep["checkpoint"], precision, (height, width), args.repeats, args.device)
        rows.append(row)
        if "compile_s" in row:
            notes.append(f"torch.compile {precision}: compiled in {row['compile_s']:.0f} s")
        save_results(rows, "gpu_inference", command, out, notes=notes)
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
