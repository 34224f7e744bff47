"""INT8 vs fp32 on CPU, per runtime and per quantisation method: latency (same run, interleaved) and the mIoU gate.

    python benchmarks/bench_int8.py --model-checkpoint runs/tables-seed0/row4/adapt/last.pt \
        --data-root data/synthetic/cityscapes [--calib DIR] [--calib-max 300] [--height 128 --width 256] \
        [--repeats 10] [--threads 2] [--methods nncf:none,percentile:first_conv+classifier@64] \
        [--runtimes onnxruntime,openvino]
    python benchmarks/bench_int8.py ... --runtimes openvino --isa-cap AVX2    # INT8 on an AVX2-only CPU, *emulated*

``--data-root`` is a Cityscapes-layout folder (``leftImg8bit/val/...`` + ``gtFine/val/...``); calibration uses
``leftImg8bit/train`` under it unless ``--calib`` is given. Each method is ``calibration:float_layers``
(``dass_deploy.export.precision.CALIBRATIONS`` / ``KEEP_FLOAT``, ``none`` for no float layers), with an optional
``@images`` (calibration images; default ``--calib-max``); ``minmax:none@64`` is the first exporter's method.
Every INT8 model is exported with the real ``export_model`` and ``int8_val``, so its meta.json records the gate
(mIoU drop on the val split, limit 1 point). Latency: the labels graph, batch 1, every runtime x model timed
round-robin (one run of each per round). Results are merged into
``benchmarks/results/int8.{md,json}`` (``--results-name``: another file per model, e.g. ``int8_r101``), keyed by
machine (CPU model + ISA): other machines' rows stay, this machine's earlier rows are replaced.

``--isa-cap AVX2`` re-runs the script with ``ONEDNN_MAX_CPU_ISA=AVX2``: OpenVINO's CPU plugin (oneDNN) then stops at
AVX2 (no AVX-512, no VNNI of either width), which is how INT8 is measured for an AVX2-only machine
here. ONNX Runtime's MLAS ignores the cap, so onnxruntime is refused under it. The machine key gets ``| cap AVX2``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dass_deploy.backends import create_backend  # noqa: E402
from dass_deploy.benchmark import BLOCK, time_in_blocks, write_json  # noqa: E402
from dass_deploy.errors import DeployError  # noqa: E402
from dass_deploy.export import INT8_MAX_MIOU_DROP, export_model, list_images, load_image  # noqa: E402
from dass_deploy.machine import describe_machine, isa_cap_env, machine_markdown  # noqa: E402
from dass_train.errors import UserError  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_METHODS = (
    "nncf:none,nncf:none@64,percentile:first_conv+classifier,percentile:first_conv+classifier@64,minmax:none@64"
)
Method = tuple[str, tuple[str, ...], int]  # calibration, float layers, calibration images


def parse_methods(text: str, calib_max: int) -> list[Method]:
    """``calibration:layers[@images]``; without ``@images`` a method uses ``calib_max`` images."""
    methods = []
    for item in text.split(","):
        item, _, images = item.partition("@")
        calibration, _, layers = item.partition(":")
        keep = () if layers in ("", "none") else tuple(layers.split("+"))
        methods.append((calibration, keep, int(images) if images else calib_max))
    return methods


def method_name(method: Method) -> str:
    return f"{method[0]}:{'+'.join(method[1]) or 'none'}@{method[2]}"


def time_interleaved(backends: dict, image: np.ndarray, repeats: int) -> dict:
    """Latency (ms) of each backend's ``predict``: one warm-up each, then round-robin blocks (``time_in_blocks``)."""
    for b in backends.values():
        b.predict(image)
    calls = [lambda b=b: b.predict(image) for b in backends.values()]
    return dict(zip(backends, time_in_blocks(calls, repeats), strict=True))


def convert_legacy(path: Path) -> None:
    """Rewrite an int8.json of the one-result format (before machines were recorded) as rows of an unrecorded
    machine in the per-machine format, so that measurement is kept next to the new ones."""
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    if not isinstance(old, dict) or "rows" in old or "latency_ms" not in old:
        return
    key = f"unrecorded machine (ONNX Runtime {old.get('onnxruntime', '?')}, before machines were recorded)"
    h, w = old["size"]
    common = {"backend": "onnxruntime", "size": f"{h}x{w}", "threads": old.get("threads"), "machine": key,
              "command": old["command"]}  # fmt: skip
    rows = [
        {**common, "precision": "fp32", "method": None, "p50_ms": old["latency_ms"]["fp32"], "speedup_vs_fp32": 1.0},
        {**common, "precision": "int8", "method": "minmax:none", "p50_ms": old["latency_ms"]["int8"],
         "speedup_vs_fp32": old["speedup"], "miou_fp32": old["miou_fp32"], "miou_int8": old["miou_int8"],
         "miou_drop": old["miou_drop"], "gate_passed": old["miou_drop"] <= INT8_MAX_MIOU_DROP,
         "val_images": old["val_images"], "checkpoint": old.get("checkpoint")},
    ]  # fmt: skip
    payload = {"format": "dass-benchmark", "version": 1, "machines": {key: {"key": key}}, "rows": rows, "notes": {}}
    path.write_text(json.dumps(payload, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-checkpoint", required=True, help="trained checkpoint (.pt)")
    p.add_argument("--data-root", required=True, help="Cityscapes-layout target data (leftImg8bit/, gtFine/)")
    p.add_argument("--calib", default=None, help="calibration images (default: <data-root>/leftImg8bit/train)")
    p.add_argument("--calib-max", type=int, default=300, help="calibration images per method (default 300)")
    p.add_argument("--height", type=int, default=128, help="export height (default: 128)")
    p.add_argument("--width", type=int, default=256, help="export width (default: 256)")
    p.add_argument(
        "--repeats",
        type=int,
        default=10,
        help="timed runs of each runtime x model, in round-robin blocks (default: 10)",
    )
    p.add_argument("--threads", type=int, default=2, help="runtime intra-op threads (default: 2)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"INT8 methods (default: {DEFAULT_METHODS})")
    p.add_argument("--runtimes", default="onnxruntime,openvino", help="CPU runtimes to time (default: both)")
    p.add_argument(
        "--isa-cap", default=None, help="emulate a CPU limited to this oneDNN ISA (e.g. AVX2; openvino only)"
    )
    p.add_argument("--out", default=str(RESULTS), help="results folder (default: benchmarks/results)")
    p.add_argument("--results-name", default="int8", help="results file stem, one per model (default: int8)")
    args = p.parse_args(argv)
    if args.isa_cap and "onnxruntime" in args.runtimes.split(","):
        p.error("--isa-cap: ONNX Runtime's MLAS kernels ignore ONEDNN_MAX_CPU_ISA; use --runtimes openvino")
    if args.isa_cap and os.environ.get("ONEDNN_MAX_CPU_ISA") != args.isa_cap:
        # oneDNN reads the cap once, when OpenVINO loads it: re-run this script with it set from the start.
        env = {**os.environ, **isa_cap_env(args.isa_cap)}
        return subprocess.call([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env=env)
    results = Path(args.out) / f"{args.results_name}.json"
    convert_legacy(results)  # before the slow part: a bad results file fails fast

    root = Path(args.data_root)
    calib = Path(args.calib) if args.calib else root / "leftImg8bit" / "train"
    methods = parse_methods(args.methods, args.calib_max)
    runtimes = args.runtimes.split(",")
    size = f"{args.height}x{args.width}"
    rows: list[dict] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
            common = dict(out=tmp, height=args.height, width=args.width, progress=True)
            fp32 = export_model(args.model_checkpoint, name="fp32", **common)
            models = {"fp32": fp32}
            for method in methods:
                key = method_name(method)
                models[key] = export_model(
                    args.model_checkpoint, name=key.replace(":", "_").replace("+", "_").replace("@", "_"), int8=True,
                    calib=calib, calib_max=method[2], int8_val=root, force=True,
                    int8_calibration=method[0], int8_keep_float=method[1], **common,
                )  # fmt: skip
            val_images = list_images(root / "leftImg8bit" / "val") or list_images(root / "leftImg8bit")
            if not val_images:
                raise DeployError(f"--data-root {root}: no images under leftImg8bit/")
            image = load_image(val_images[0], args.height, args.width)[None]
            # every runtime x model in one round-robin: cross-runtime figures see the same machine load too
            backends = {
                (runtime, key): create_backend(r.model_dir, backend=runtime, threads=args.threads)
                for runtime in runtimes
                for key, r in models.items()
            }
            times = time_interleaved(backends, image, args.repeats)
            for runtime in runtimes:
                fp32_ms = float(np.median(times[(runtime, "fp32")]))
                for key, result in models.items():
                    ms = np.asarray(times[(runtime, key)])
                    row = {
                        "backend": runtime,
                        "precision": "fp32" if key == "fp32" else "int8",
                        "method": None if key == "fp32" else key,
                        "size": size,
                        "threads": args.threads,
                        "block": BLOCK,
                        "p50_ms": float(np.median(ms)),
                        "p95_ms": float(np.percentile(ms, 95)),
                        "img_per_s": float(1000.0 / ms.mean()),
                        "speedup_vs_fp32": fp32_ms / float(np.median(ms)),
                        "model_mb": (result.model_dir / "1" / "model.onnx").stat().st_size / 1e6,
                    }
                    i8 = result.meta["export"].get("int8")
                    if i8:
                        row.update(
                            miou_fp32=i8["miou_fp32"], miou_int8=i8["miou_int8"], miou_drop=i8["miou_drop"],
                            gate_passed=i8["gate"]["passed"], val_images=i8["val_images"],
                            calibration_images=i8["calibration_images"],
                            argmax_agreement_vs_torch=result.meta["parity"]["argmax_agreement"],
                        )  # fmt: skip
                    rows.append(row)
    except (DeployError, UserError) as e:  # bad options, a missing or unreadable checkpoint: one line
        print(f"error: {e}", file=sys.stderr)
        return 2

    command = "python benchmarks/bench_int8.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    notes = [
        f"Checkpoint {args.model_checkpoint}; input {size}; {args.threads} threads; median of {args.repeats} "
        f"timed runs each, in round-robin blocks of {BLOCK} (the first untimed) over every runtime x model (labels graph, batch 1, one val image); mIoU on the full val split at the export size, "
        f"computed by ONNX Runtime on the logits graphs (the gate: drop <= {INT8_MAX_MIOU_DROP} point). Methods: "
        "quantiser/calibration (nncf: NNCF MIXED preset + fast bias correction | ONNX Runtime minmax | percentile "
        "99.999 | entropy) : layers kept in float (first_conv, classifier) @ calibration images; weights int8 "
        "per-channel symmetric, activations uint8, QDQ.",
    ]
    machine = describe_machine()
    cap = machine["isa_cap"]
    if cap:
        notes.append(
            f"EMULATION of a {cap}-only CPU: ONEDNN_MAX_CPU_ISA={cap} caps OpenVINO's oneDNN kernels (its INT8 "
            "convolutions lose AVX-512 VNNI); the mIoU gate is computed by ONNX Runtime and does not depend on it."
        )
    for r in rows:
        if r["precision"] == "int8":
            verdict = "passes" if r["gate_passed"] else "FAILS"
            notes.append(
                f"{r['backend']} {r['method']}: {r['speedup_vs_fp32']:.2f}x fp32 of the same runtime, mIoU "
                f"{r['miou_fp32']:.2f} -> {r['miou_int8']:.2f} ({-r['miou_drop']:+.2f}), {verdict} the gate."
            )
    convert_legacy(results)
    payload = write_json(rows, results, command, machine=machine, notes=notes)
    results.with_suffix(".md").write_text(_markdown(payload))
    print(machine_markdown(machine))
    print("\n".join(notes))
    return 0


def _markdown(payload: dict) -> str:
    """The generic per-machine tables plus the INT8 columns (method, speed-up, mIoU)."""
    parts = ["# INT8 vs fp32 (CPU): speed per runtime, mIoU gate per method\n"]
    for key, machine in payload["machines"].items():
        rows = [r for r in payload["rows"] if r.get("machine") == key]
        parts.append(f"## {key}\n")
        if "cpu_model" in machine:
            parts.append(machine_markdown(machine) + "\n")
        parts.append(f"`{rows[0]['command'] if rows else ''}`\n")
        parts.append("| runtime | precision | method | size | p50 (ms) | x fp32 (same runtime) | mIoU | drop | gate |")
        parts.append("|---|---|---|---|---:|---:|---:|---:|---|")
        for r in rows:
            if r.get("precision") == "int8":
                gate = "pass" if r.get("gate_passed") else "FAIL"
                parts.append(
                    f"| {r['backend']} | int8 | {r['method']} | {r['size']} | {r['p50_ms']:.1f} | "
                    f"{r['speedup_vs_fp32']:.2f} | {r['miou_int8']:.2f} | {r['miou_drop']:.2f} | {gate} |"
                )
            else:
                parts.append(f"| {r['backend']} | fp32 | | {r['size']} | {r['p50_ms']:.1f} | 1.00 | | | |")
        parts += ["", *payload.get("notes", {}).get(key, []), ""]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.exit(main())
