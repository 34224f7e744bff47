"""``export_model``: checkpoint -> graph -> precision -> parity -> runtime files -> Triton folder, renamed into place.

Every export is first written as an fp32 *logits* graph; the shipped variant is derived from it (fp16 weights,
INT8 QDQ, ArgMax tail). That keeps one torch trace and lets the parity check compare logits with torch even when
the shipped graph only returns labels. Everything is written to a temporary folder next to the destination and
renamed into place only after the parity check passed, so a failed export never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from dass_deploy.adapt_bn import Adaptation, adapt_bn, bn_training, model_card
from dass_deploy.adapt_frames import DEFAULT_ADAPT_FRAMES, DEFAULT_ADAPT_PASSES, AdaptFrames, open_adapt_frames
from dass_deploy.errors import DeployError
from dass_deploy.export.graph import (
    INPUT_NAME,
    LABELS_NAME,
    LOGITS_NAME,
    MAX_BATCH,
    OPSET,
    ExportGraph,
    _simplify,
    _torch_export,
    append_argmax,
)
from dass_deploy.export.images import IMAGE_SUFFIXES, list_images, load_image, synthetic_images
from dass_deploy.export.openvino import IR_FILE, require_openvino, write_openvino_ir
from dass_deploy.export.parity import (
    INT8_MAX_MIOU_DROP,
    _median_ms,
    compare_with_torch,
    evaluate_miou_pair,
    ort_session,
)
from dass_deploy.export.precision import (
    CALIBRATIONS,
    KEEP_FLOAT,
    convert_to_fp16,
    default_int8_method,
    float_convs,
    quantize_int8,
    require_quantiser,
)
from dass_deploy.export.tensorrt import build_trt_engine, require_tensorrt
from dass_deploy.export.triton import _class_table, _versions
from dass_deploy.repository import ONNX_FILE, PLAN_FILE, VERSION, check_model_name, write_triton_config
from dass_train.checkpoint import file_sha256


@dataclass
class ExportResult:
    """What ``export_model`` wrote: the model folder, its meta.json content and the human-readable summary."""

    model_dir: Path
    meta: dict
    summary: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # for stderr: what the user should know before using it


def _validate(
    height: int,
    width: int,
    output: str,
    fp16: bool,
    int8: bool,
    calib,
    int8_val,
    name,
    trt: bool = False,
    dynamic: bool = False,
    keep_bn: bool = False,
) -> None:
    if height < 8 or width < 8:
        raise DeployError(f"--height/--width must be at least 8, got {height}x{width}")
    if output not in ("labels", "logits"):
        raise DeployError(f"--output must be 'labels' or 'logits', got {output!r}")
    if trt and dynamic:
        raise DeployError(
            "--trt builds a plan for one input size, and config.pbtxt cannot state a TensorRT profile's size range: "
            "drop --dynamic (export the dynamic ONNX model to its own folder without --trt)"
        )
    if fp16 and int8:
        raise DeployError("choose one of --fp16 and --int8 (with --trt, --int8 also enables fp16 kernels)")
    if keep_bn and (fp16 or int8):
        raise DeployError(
            "--keep-bn keeps float32 BatchNormalization nodes for a runtime to re-estimate; export it in fp32 "
            "(without --fp16 / --int8)"
        )
    if int8 and calib is None:
        raise DeployError("--int8 needs --calib DIR with target-domain images")
    if calib is not None and not int8:
        raise DeployError("--calib is only used with --int8")
    if int8_val is not None and not int8:
        raise DeployError("--int8-val is only used with --int8")
    if calib is not None and not Path(calib).is_dir():
        raise DeployError(f"--calib folder not found: {calib}")
    if int8_val is not None and not Path(int8_val).is_dir():
        raise DeployError(f"--int8-val folder not found: {int8_val}")
    if name is not None:
        try:  # before any work: Triton's rules, the same check the repository writer makes
            check_model_name(name)
        except DeployError as exc:
            raise DeployError(f"--name: {exc}") from None


def export_model(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike = "models",
    name: str | None = None,
    height: int = 512,
    width: int = 1024,
    dynamic: bool = False,
    output: str = "labels",
    fp16: bool = False,
    int8: bool = False,
    calib: str | os.PathLike | None = None,
    trt: bool = False,
    source: str = "auto",
    stem: str | None = None,
    overwrite: bool = False,
    force: bool = False,
    parity_samples: int = 3,
    progress: bool = True,
    int8_val: str | os.PathLike | None = None,
    calib_max: int = 64,
    openvino: bool = False,
    int8_calibration: str | None = None,
    int8_keep_float: Sequence[str] | None = None,
    adapt_bn_source: str | None = None,
    adapt_frames: int = DEFAULT_ADAPT_FRAMES,
    adapt_passes: int = DEFAULT_ADAPT_PASSES,
    keep_bn: bool = False,
) -> ExportResult:
    """Export ``checkpoint`` to ``<out>/<name>/`` (Triton layout), check parity with torch, rename into place.

    ``int8_calibration`` / ``int8_keep_float`` left at None take ``default_int8_method`` (NNCF on CPU, ONNX
    Runtime's percentile calibration for TensorRT; benchmarks/results/int8.md measures the choices).

    ``adapt_bn_source`` (``--adapt-bn``): re-estimate every BatchNorm layer's statistics on up to ``adapt_frames``
    frames of that source at the export size, in ``adapt_passes`` passes, before tracing (``dass_deploy.adapt_bn``); meta.json records it as
    ``adapt_bn`` and a model card (README.md) says what was done. The frames are read and the statistics estimated
    before anything is written. ``keep_bn`` (``--keep-bn``): the graph keeps its BatchNormalization nodes instead of
    folding them into the convolutions, so that ``dass-segment --model M --adapt-bn SOURCE`` can re-estimate them
    without PyTorch (``dass_deploy.adapt_bn_onnx``); fp32 only.

    Raises ``DeployError`` for bad options, an existing destination, a missing TensorRT / GPU and failed parity
    (unless ``force``), and ``dass_train.errors.CheckpointError`` for unreadable checkpoints.
    """
    from dass_train.checkpoint import load_model

    def step(message: str) -> None:
        if progress:
            print(f"dass-export: {message}", file=sys.stderr, flush=True)

    _validate(height, width, output, fp16, int8, calib, int8_val, name, trt, dynamic, keep_bn)
    int8_calibration, int8_keep_float = default_int8_method(int8_calibration, int8_keep_float, trt)
    if int8_calibration not in CALIBRATIONS:
        raise DeployError(f"--int8-calibration must be one of {', '.join(CALIBRATIONS)}, got {int8_calibration!r}")
    if set(int8_keep_float) - set(KEEP_FLOAT):
        raise DeployError(f"--int8-keep-float takes {', '.join(KEEP_FLOAT)}, got {', '.join(int8_keep_float)}")
    if int8:
        require_quantiser(int8_calibration, symmetric=trt, val_root=int8_val)  # fail before the slow part
    checkpoint = Path(checkpoint)
    precision = "int8" if int8 else "fp16" if fp16 else "fp32"
    if name is None:
        name = f"{checkpoint.stem}-{precision}" + ("-trt" if trt else "")
        try:
            check_model_name(name)
        except DeployError:
            raise DeployError(
                f"the default model name {name!r} (from the checkpoint's file name) is not a valid Triton model "
                "name: pass --name"
            ) from None
    out = Path(out)
    dest = out / name
    if dest.exists() and not overwrite:
        raise DeployError(f"{dest} already exists; pass --overwrite to replace it")
    calib_paths: list[Path] = []
    if int8:
        calib_paths = list_images(calib)[:calib_max]
        if not calib_paths:
            raise DeployError(f"--calib {calib}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    if trt:
        require_tensorrt()  # fail before the slow part
    if openvino:
        require_openvino()
    frames = open_adapt_frames(adapt_bn_source, adapt_frames) if adapt_bn_source is not None else None

    step(f"loading {checkpoint}")
    kwargs = {} if stem is None else {"stem": stem}
    model, ckpt_meta, report = load_model(checkpoint, source=source, **kwargs)
    model.eval()
    num_classes = int(ckpt_meta["num_classes"])
    if num_classes > 255:
        raise DeployError(
            f"{checkpoint}: {num_classes} classes do not fit the uint8 labels output; use --output logits"
        )
    normalization = ckpt_meta["normalization"]
    adaptation = None
    if frames is not None:
        step(f"re-estimating BatchNorm statistics on {frames.selection} of {frames.spec} at {height}x{width}")
        adaptation = _adapt(model, ckpt_meta, frames, height, width, progress, adapt_passes)

    created_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=out))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_dir, 0o777 & ~umask)  # mkdtemp's 0700 would survive the rename
    try:
        with tempfile.TemporaryDirectory(prefix="dass-export-") as work_str:
            work = Path(work_str)
            result = _export_into(
                tmp_dir, work, step, model, ckpt_meta, report, checkpoint, name, dest, height, width, dynamic,
                output, precision, calib_paths, trt, source, stem, force, parity_samples, int8_val, normalization,
                openvino=openvino, int8_method=(int8_calibration, tuple(int8_keep_float)), progress=progress,
                adaptation=adaptation, keep_bn=keep_bn,
            )  # fmt: skip
        if dest.exists():  # --overwrite: swap, then delete the old folder
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=out))
            os.replace(dest, old / name)
            os.replace(tmp_dir, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_dir, dest)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if created_out and not any(out.iterdir()):
            out.rmdir()
        raise
    result.model_dir = dest
    return result


def _adapt(
    model: nn.Module, ckpt_meta: dict, frames: AdaptFrames, height: int, width: int, progress: bool, passes: int
) -> Adaptation:
    """``--adapt-bn``: the statistics re-estimated through the export graph's own normalisation, at the export size."""
    from dass_train.checkpoint import upsampling_align_corners

    graph = ExportGraph(model, ckpt_meta["normalization"], align_corners=upsampling_align_corners(ckpt_meta))
    return adapt_bn(
        model, frames, (height, width), torch.from_numpy, forward=graph, training=bn_training(ckpt_meta),
        progress=progress, passes=passes,
    )  # fmt: skip


def _export_into(
    tmp_dir: Path,
    work: Path,
    step: Callable[[str], None],
    model: nn.Module,
    ckpt_meta: dict,
    report: list[str],
    checkpoint: Path,
    name: str,
    dest: Path,
    height: int,
    width: int,
    dynamic: bool,
    output: str,
    precision: str,
    calib_paths: list[Path],
    trt: bool,
    source: str,
    stem: str | None,
    force: bool,
    parity_samples: int,
    int8_val: str | os.PathLike | None,
    normalization: dict,
    openvino: bool = False,
    int8_method: tuple[str, tuple[str, ...]] = ("nncf", ()),
    progress: bool = False,
    adaptation: Adaptation | None = None,
    keep_bn: bool = False,
) -> ExportResult:
    """The export proper, writing into ``tmp_dir``; ``export_model`` owns the temp-folder / rename protocol."""
    from dass_train.checkpoint import upsampling_align_corners

    align_corners = upsampling_align_corners(ckpt_meta)
    graph = ExportGraph(model, normalization, output="logits", align_corners=align_corners).eval()

    step(f"tracing to ONNX (opset {OPSET}, {height}x{width}{', dynamic' if dynamic else ''})")
    raw_path = work / "logits_raw.onnx"
    with torch.inference_mode():
        _torch_export(graph, raw_path, height, width, dynamic, keep_bn)
    fp32_logits = _simplify(onnx.load(str(raw_path)), keep_bn)
    onnx.checker.check_model(fp32_logits)
    batchnorm = _batchnorm_record(model, fp32_logits, ckpt_meta, keep_bn)

    # The shipped logits graph of the requested precision.
    extra: dict = {}
    if precision == "fp16":
        step("converting to fp16")
        logits_model = convert_to_fp16(fp32_logits)
    elif precision == "int8":
        step(f"INT8 calibration on {len(calib_paths)} images")
        calibration, keep_float = int8_method
        logits_model = quantize_int8(
            fp32_logits, work / "int8.onnx", calib_paths, height, width, symmetric=trt, calibration=calibration,
            keep_float=keep_float, progress=progress, val_root=Path(int8_val) if int8_val is not None else None,
        )  # fmt: skip
    else:
        logits_model = fp32_logits
    shipped = append_argmax(logits_model) if output == "labels" else logits_model
    onnx.checker.check_model(shipped)

    # Parity: torch fp32 vs ORT (logits of the shipped precision, and the shipped graph's own output).
    step(f"parity check on {parity_samples} inputs (ONNX Runtime CPU vs torch)")
    images = synthetic_images(max(1, parity_samples), height, width)
    # one real input: a calibration image, or a frame of the camera the model is adapted to
    real = [load_image(path, height, width) for path in calib_paths[:1]]
    if not real and adaptation is not None and adaptation.sample is not None:
        real = [adaptation.sample]
    if real:
        images[-1] = real[0]
    parity, failures, shipped_session = compare_with_torch(
        graph, logits_model, shipped, images, output, precision, real_images=len(real)
    )

    if precision == "int8":
        step("timing fp32 vs int8 on CPU")
        fp32_session = ort_session(append_argmax(fp32_logits) if output == "labels" else fp32_logits)
        fp32_ms = _median_ms(fp32_session, images[:1])
        int8_ms = _median_ms(shipped_session, images[:1])
        extra["int8"] = {"fp32_ms": fp32_ms, "int8_ms": int8_ms, "cpu_speedup": fp32_ms / int8_ms}
        extra["int8"]["calibration_images"] = len(calib_paths)
        extra["int8"]["method"] = {
            "format": "QDQ",
            "weights": "int8 per-channel symmetric",
            "bias_correction": int8_method[0].startswith("nncf"),
            "activations": "int8 symmetric" if trt else "uint8 asymmetric",
            "quantiser": _quantiser_version(int8_method[0]),
            "calibration": int8_method[0],
            "float_layers": list(int8_method[1]),
            # convolutions left in float (by --int8-keep-float, or returned to float by nncf-accuracy) of all
            "float_convs": float_convs(logits_model),
            "convs": sum(1 for n in logits_model.graph.node if n.op_type == "Conv"),
        }
        # What the model lost on the gate (<= INT8_MAX_MIOU_DROP points on target val); null when not measured.
        extra["int8"]["gate"] = {"max_miou_drop": INT8_MAX_MIOU_DROP, "miou_drop": None, "passed": None,
                                 "measured_on": None}  # fmt: skip
        if int8_val is not None:
            step(f"mIoU fp32 vs int8 on {int8_val}")
            val = evaluate_miou_pair(ort_session(fp32_logits), ort_session(logits_model), Path(int8_val), height, width)
            extra["int8"].update(val)
            extra["int8"]["gate"].update(
                miou_drop=val["miou_drop"], passed=val["miou_drop"] <= INT8_MAX_MIOU_DROP,
                measured_on=f"{val['val_images']} images of {int8_val}",
            )  # fmt: skip
            if val["miou_drop"] > INT8_MAX_MIOU_DROP:
                failures.append(f"INT8 mIoU drop {val['miou_drop']:.2f} > {INT8_MAX_MIOU_DROP} points")
        method = extra["int8"]["method"]
        if method["calibration"] == "nncf-accuracy" and method["float_convs"] == method["convs"]:
            failures.append(
                f"nncf-accuracy returned all {method['convs']} convolutions to float to hold the gate, so nothing of "
                "INT8 is left (export fp32 or fp16)"
            )
    parity["passed"] = not failures
    parity["forced"] = bool(failures and force)
    if failures and not force:
        raise DeployError(f"parity check failed for {name} ({precision}): {'; '.join(failures)}; nothing written "
                          "(use --force to export anyway)")  # fmt: skip

    # Files.
    version_dir = tmp_dir / VERSION
    version_dir.mkdir()
    onnx_path = version_dir / ONNX_FILE
    onnx.save(shipped, str(onnx_path))
    trt_info = None
    if trt:
        step("building TensorRT engine")
        trt_info = build_trt_engine(onnx_path, version_dir / PLAN_FILE, height, width,
                                    fp16=precision == "fp16", int8=precision == "int8")  # fmt: skip

    openvino_info = None
    if openvino:
        step("converting to OpenVINO IR")
        openvino_info = write_openvino_ir(onnx_path, version_dir / IR_FILE)

    k = int(ckpt_meta["num_classes"])
    spatial = [-1, -1] if dynamic else [height, width]
    out_dims = spatial if output == "labels" else [k, *spatial]
    write_triton_config(
        tmp_dir / "config.pbtxt",
        name=dest.name,
        platform="tensorrt_plan" if trt else "onnxruntime_onnx",
        input_dims=[3, *spatial],
        output_name=LABELS_NAME if output == "labels" else LOGITS_NAME,
        output_dtype="uint8" if output == "labels" else "float32",
        output_dims=out_dims,
        max_batch_size=MAX_BATCH,
    )

    class_names, palette, train_to_label = _class_table(ckpt_meta, k)
    meta = {
        "name": dest.name,
        "num_classes": k,
        "class_names": class_names,
        "palette": palette,
        "train_id_to_label_id": train_to_label,
        "input": {
            "name": INPUT_NAME,
            "format": "rgb255",
            "layout": "NCHW",
            "dtype": "float32",
            "height": height,
            "width": width,
            "dynamic": dynamic,
        },
        "output": {
            "name": LABELS_NAME if output == "labels" else LOGITS_NAME,
            "kind": output,
            "dtype": "uint8" if output == "labels" else "float32",
            "full_resolution": True,
        },
        "normalization": normalization,
        "upsampling": {"mode": "bilinear", "align_corners": align_corners},
        "precision": precision,
        "source_checkpoint": {"path": str(checkpoint), "sha256": file_sha256(checkpoint)},
        "backbone": ckpt_meta.get("backbone"),
        # what the demo needs to pair a source-only and an adapted model of the same benchmark
        "stage": ckpt_meta.get("stage"),
        "benchmark": ckpt_meta.get("benchmark"),
        "export": {
            "opset": OPSET,
            "max_batch_size": MAX_BATCH,
            "dynamic_axes": ["batch", "height", "width"] if dynamic else ["batch"],
            "upsample": f"bilinear, align_corners={align_corners}",
            "source": source,
            "stem": stem,
            "load_report": list(report),
            "checkpoint_stage": ckpt_meta.get("stage"),
            "checkpoint_iteration": ckpt_meta.get("iteration"),
            "int8": extra.get("int8"),
            "tensorrt": trt_info,
            "openvino": openvino_info,
            "batchnorm": batchnorm,
        },
        "parity": parity,
        "versions": _versions(),
        # --adapt-bn: the BatchNorm statistics re-estimated on the user's frames (dass_deploy.adapt_bn)
        "adapt_bn": adaptation.record if adaptation is not None else None,
    }
    if ckpt_meta.get("metrics") and adaptation is None:
        meta["metrics"] = ckpt_meta["metrics"]
    elif ckpt_meta.get("metrics"):  # measured before --adapt-bn changed the model: not this model's figures
        meta["export"]["checkpoint_metrics"] = ckpt_meta["metrics"]
    (tmp_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if adaptation is not None:
        (tmp_dir / "README.md").write_text(model_card(meta))

    size_mb = onnx_path.stat().st_size / 1e6
    line = (
        f"Exported {dest} ({precision}, {height}x{width}{', dynamic' if dynamic else ''}, {output}) parity: "
        f"max|Δlogit| {parity['max_abs_logit_diff']:.1e}, argmax agree {100 * parity['argmax_agreement']:.2f}%"
        f"{' (FORCED)' if parity['forced'] else ''} -> {VERSION}/{ONNX_FILE} {size_mb:.1f} MB"
    )
    summary = [*report, line]
    if adaptation is not None:
        summary += [adaptation.summary, *(f"note: {note}" for note in adaptation.notes)]
    if "int8" in extra:
        i8 = extra["int8"]
        text = f"INT8 on CPU: {i8['fp32_ms']:.0f} ms -> {i8['int8_ms']:.0f} ms ({i8['cpu_speedup']:.2f}x)"
        if "miou_int8" in i8:
            text += f", mIoU {i8['miou_fp32']:.2f} -> {i8['miou_int8']:.2f} on {i8['val_images']} val images"
        else:
            text += "; mIoU gate not measured (pass --int8-val DIR)"
        summary.append(text)
    if openvino_info:
        summary.append(f"OpenVINO {openvino_info['openvino']} IR -> {VERSION}/{IR_FILE}")
    if trt_info:
        summary.append(f"TensorRT {trt_info['tensorrt']} plan -> {VERSION}/{PLAN_FILE} (profile {trt_info['profile']})")
    warnings = adaptation.warnings if adaptation is not None else []
    return ExportResult(model_dir=dest, meta=meta, summary=summary, warnings=warnings)


def _batchnorm_record(model: nn.Module, graph: onnx.ModelProto, ckpt_meta: dict, keep_bn: bool) -> dict:
    """meta.json's ``export.batchnorm``: whether the graph kept its BatchNormalization nodes (checked: one per BN
    layer, or a runtime could not re-estimate them all) and how the checkpoint's BN trained."""
    from dass_train.bn_statistics import batchnorm_layers

    layers = len(batchnorm_layers(model, include_frozen=True))
    nodes = sum(1 for n in graph.graph.node if n.op_type == "BatchNormalization")
    if keep_bn and nodes != layers:
        raise DeployError(f"--keep-bn: the ONNX graph has {nodes} BatchNormalization nodes for {layers} BN layers")
    return {"nodes": "kept" if keep_bn else "folded", "layers": layers, "training": bn_training(ckpt_meta)}


def _quantiser_version(calibration: str) -> str:
    """Which quantiser wrote the QDQ graph, with its version (meta.json)."""
    from importlib.metadata import version

    return f"nncf {version('nncf')}" if calibration.startswith("nncf") else f"onnxruntime {version('onnxruntime')}"
