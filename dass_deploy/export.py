"""Checkpoint -> ONNX (fp32 / fp16 / INT8) and optionally a TensorRT plan, in a Triton model-repository folder.

The exported graph is self-contained so that runtimes need no torch and no knowledge of the training recipe:

    image RGB float32 0..255 [N,3,H,W]
      -> colour swap / mean / std of the checkpoint (Caffe BGR for AdaptSegNet-lineage weights)
      -> DeepLab-V2 logits [N,K,H/8,W/8]
      -> bilinear upsample to [N,K,H,W] (align_corners=False, as in training and evaluation)
      -> ArgMax over K -> Cast uint8 -> "labels" [N,H,W]      (default; ``output="logits"`` stops before ArgMax)

Every export is first written as an fp32 *logits* graph; the shipped variant is derived from it (fp16 weights,
INT8 QDQ, ArgMax tail). That keeps one torch trace and lets the parity check compare logits with torch even when
the shipped graph only returns labels. Everything is written to a temporary folder next to the destination and
renamed into place only after the parity check passed, so a failed export never leaves a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform as _platform
import shutil
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from dass_deploy.errors import DeployError
from dass_deploy.repository import ONNX_FILE, PLAN_FILE, VERSION, write_triton_config

OPSET = 17
INPUT_NAME = "image"
LOGITS_NAME = "logits"
LABELS_NAME = "labels"
MAX_BATCH = 8  # Triton max_batch_size and the TensorRT profile's largest batch
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

#: Parity thresholds: fraction of pixels whose class agrees with torch fp32, and for fp32 the max abs logit error,
#: 1e-3 for logits up to 10 and relative (1e-4 of the largest logit) beyond, since the float32 rounding error grows
#: with the magnitude (random-init ResNet-101s reach |logit| ~ 1e5).
FP32_MAX_ABS = 1e-3
FP32_REL_SCALE = 10.0
MIN_AGREEMENT = {"fp32": 0.999, "fp16": 0.995}
INT8_MAX_MIOU_DROP = 1.0  # points


@dataclass
class ExportResult:
    """What ``export_model`` wrote: the model folder, its meta.json content and the human-readable summary."""

    model_dir: Path
    meta: dict
    summary: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# The traced graph


class ExportGraph(nn.Module):
    """Wraps DeepLab-V2 with the input normalisation and the full-resolution output.

    ``forward(image [N,3,H,W] RGB 0..255) -> logits [N,K,H,W]`` float, or ``labels [N,H,W]`` uint8.
    """

    def __init__(self, model: nn.Module, normalization: dict, output: str = "logits") -> None:
        super().__init__()
        self.model = model.eval()
        self.output = output
        bgr = normalization.get("color", "RGB").upper() == "BGR"
        # mean / std are given in the model's colour order, so swap first, then normalise.
        self.register_buffer("perm", torch.tensor([2, 1, 0] if bgr else [0, 1, 2]), persistent=False)
        self.bgr = bgr
        mean = torch.tensor(normalization["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(normalization.get("std", [1.0, 1.0, 1.0]), dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("inv_std", 1.0 / std, persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image[:, self.perm] if self.bgr else image
        x = (x - self.mean) * self.inv_std
        logits = self.model(x)
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        if self.output == "labels":
            return logits.argmax(dim=1).to(torch.uint8)
        return logits


def _torch_export(graph: ExportGraph, path: Path, height: int, width: int, dynamic: bool) -> None:
    """Trace ``graph`` to ONNX with a dynamic batch axis (and dynamic H, W when ``dynamic``).

    The TorchScript exporter (``dynamo=False``) is tried first: it is fast and handles this plain CNN; torch
    versions without it fall back to the dynamo exporter.
    """
    dummy = torch.zeros(1, 3, height, width)
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
    out_axes = dict(axes) if graph.output == "logits" else {k - 1 if k > 0 else 0: v for k, v in axes.items()}
    out_name = LOGITS_NAME if graph.output == "logits" else LABELS_NAME
    kwargs = dict(input_names=[INPUT_NAME], output_names=[out_name], opset_version=OPSET)
    try:
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice is expected here
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                graph,
                (dummy,),
                str(path),
                dynamo=False,
                do_constant_folding=True,
                dynamic_axes={INPUT_NAME: axes, out_name: out_axes},
                **kwargs,
            )
    except (TypeError, NotImplementedError):  # TorchScript exporter removed
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        shapes = {0: batch}
        if dynamic:
            shapes.update({2: torch.export.Dim("height", min=64), 3: torch.export.Dim("width", min=64)})
        program = torch.onnx.export(graph, (dummy,), dynamo=True, dynamic_shapes={"image": shapes}, **kwargs)
        program.save(str(path))


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding and dead-node removal with onnxslim; the unsimplified graph is kept if slim fails."""
    try:
        import onnxslim

        slim = onnxslim.slim(model)
        if slim is not None:
            onnx.checker.check_model(slim)
            return slim
    except Exception as e:  # a slimming bug must not break an otherwise valid export
        print(f"dass-export: onnxslim skipped ({type(e).__name__}: {e})", file=sys.stderr)
    return model


def append_argmax(model: onnx.ModelProto) -> onnx.ModelProto:
    """logits graph -> labels graph: ``ArgMax(axis=1)`` + ``Cast(uint8)`` after the logits output.

    Kept in float after quantisation / fp16 conversion: the class decision is made on the dequantised logits.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    logits = graph.output[0]
    dims = [d for d in logits.type.tensor_type.shape.dim]
    graph.node.extend(
        [
            helper.make_node("ArgMax", [logits.name], ["labels_int64"], axis=1, keepdims=0, name="labels_argmax"),
            helper.make_node("Cast", ["labels_int64"], [LABELS_NAME], to=TensorProto.UINT8, name="labels_cast"),
        ]
    )
    shape = [d.dim_param or d.dim_value for i, d in enumerate(dims) if i != 1] if dims else None
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(LABELS_NAME, TensorProto.UINT8, shape))
    return model


# ----------------------------------------------------------------------------------------------------------------
# fp16: weights and the convolutional body in half precision, IO and normalisation / resize / argmax in float32

_FP16_OPS = {"Conv", "Relu", "Add", "Sum", "MaxPool", "BatchNormalization", "Concat"}


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Run the CNN body (``_FP16_OPS``) in float16 with Casts at its borders; graph IO stays float32.

    Written here instead of pulling in onnxconverter-common: the body of DeepLab-V2 has only a handful of op types,
    and keeping the normalisation and the bilinear resize in float32 is what protects the argmax.
    """
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    types.update({init.name: init.data_type for init in graph.initializer})
    # Only float tensors of the body go to half; shape arithmetic (int64 Add / Concat) is left alone.
    is_half = [
        node.op_type in _FP16_OPS and all(types.get(name) == TensorProto.FLOAT for name in node.input if name)
        for node in graph.node
    ]
    consumers: dict[str, list[int]] = defaultdict(list)
    for i, node in enumerate(graph.node):
        for name in node.input:
            consumers[name].append(i)
    half_tensors = {out for i, node in enumerate(graph.node) if is_half[i] for out in node.output}
    for init in graph.initializer:
        if (
            init.data_type == TensorProto.FLOAT
            and consumers[init.name]
            and all(is_half[i] for i in consumers[init.name])
        ):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
            half_tensors.add(init.name)

    # Graph outputs computed in half: rename the tensor, cast back to the original name at the end.
    tail = []
    for out in graph.output:
        if out.name in half_tensors:
            inner = out.name + "_fp16"
            for node in graph.node:
                node.output[:] = [inner if o == out.name else o for o in node.output]
                node.input[:] = [inner if o == out.name else o for o in node.input]
            half_tensors.add(inner)
            tail.append(helper.make_node("Cast", [inner], [out.name], to=TensorProto.FLOAT, name=out.name + "_cast"))

    casts: dict[tuple[str, int], str] = {}
    nodes = []
    for i, node in enumerate(list(graph.node)):
        want = TensorProto.FLOAT16 if is_half[i] else TensorProto.FLOAT
        for k, name in enumerate(node.input):
            if not name or (name in half_tensors) == is_half[i]:
                continue
            key = (name, want)
            if key not in casts:
                casts[key] = f"{name}_to_{'fp16' if is_half[i] else 'fp32'}"
                nodes.append(helper.make_node("Cast", [name], [casts[key]], to=want, name=casts[key] + "_cast"))
            node.input[k] = casts[key]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes + tail)
    del graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model)


# ----------------------------------------------------------------------------------------------------------------
# Images: calibration, parity, validation


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted)."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_image(path: Path, height: int, width: int) -> np.ndarray:
    """Image file -> float32 ``[3,H,W]`` RGB 0..255 resized (bilinear) to the export size."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DeployError(f"cannot read image {path}")
    rgb = cv2.cvtColor(cv2.resize(bgr, (width, height), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)


def synthetic_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``n`` smooth random RGB images float32 ``[n,3,H,W]`` 0..255: coarse colour blobs plus mild noise, closer to
    photos than white noise (which drives every logit to the same class)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, height, width), dtype=np.float32)
    for i in range(n):
        coarse = rng.uniform(0, 255, size=(max(2, height // 16), max(2, width // 16), 3)).astype(np.float32)
        smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
        out[i] = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).transpose(2, 0, 1)
    return out


class ImageFolderReader:
    """ONNX Runtime ``CalibrationDataReader``: one ``{"image": [1,3,H,W]}`` per calibration image."""

    def __init__(self, paths: Sequence[Path], height: int, width: int) -> None:
        self.paths, self.height, self.width = list(paths), height, width
        self._iter: Iterator[Path] = iter(self.paths)

    def get_next(self) -> dict | None:
        path = next(self._iter, None)
        return None if path is None else {INPUT_NAME: load_image(path, self.height, self.width)[None]}

    def rewind(self) -> None:
        self._iter = iter(self.paths)


def _find_val_pairs(root: Path) -> list[tuple[Path, Path]]:
    """Cityscapes layout ``leftImg8bit/val/<city>/*_leftImg8bit.png`` + ``gtFine/val/<city>/*_gtFine_label*.png``."""
    images_root = root / "leftImg8bit" / "val" if (root / "leftImg8bit" / "val").is_dir() else root / "leftImg8bit"
    if not images_root.is_dir():
        raise DeployError(f"--int8-val {root}: no leftImg8bit/ folder (Cityscapes layout expected)")
    pairs = []
    for image in sorted(images_root.rglob("*_leftImg8bit.png")):
        rel = image.relative_to(root / "leftImg8bit")
        base = root / "gtFine" / rel.parent / image.name.replace("_leftImg8bit.png", "_gtFine_")
        for suffix in ("labelTrainIds.png", "labelIds.png"):
            label = Path(str(base) + suffix)
            if label.is_file():
                pairs.append((image, label))
                break
    if not pairs:
        raise DeployError(f"--int8-val {root}: no image/label pairs found under leftImg8bit/ and gtFine/")
    return pairs


def _load_train_ids(path: Path, height: int, width: int) -> np.ndarray:
    from dass_train.labels import label_ids_to_train_ids

    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise DeployError(f"cannot read label {path}")
    if label.ndim == 3:
        label = label[..., 0]
    if path.name.endswith("_labelIds.png"):
        label = label_ids_to_train_ids(label)
    return cv2.resize(label.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)


# ----------------------------------------------------------------------------------------------------------------
# ONNX Runtime helpers


def ort_session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    """Run one image at a time (fixed-batch exports accept any batch too, but this bounds memory)."""
    return np.concatenate([session.run(None, {INPUT_NAME: images[i : i + 1]})[0] for i in range(len(images))])


def _median_ms(session: ort.InferenceSession, image: np.ndarray, repeats: int = 3) -> float:
    session.run(None, {INPUT_NAME: image})  # warm-up: allocations, kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {INPUT_NAME: image})
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def quantize_int8(
    logits_model: onnx.ModelProto,
    out_path: Path,
    calib_images: Sequence[Path],
    height: int,
    width: int,
    symmetric: bool = False,
) -> onnx.ModelProto:
    """Static INT8 quantisation (QDQ, per-channel weights) of the *logits* graph, calibrated on target images.

    Only the CNN body (Conv, Add, MaxPool) is quantised; the normalisation in front and the bilinear resize behind
    stay float. ``symmetric=True`` gives the signed, zero-point-free tensors that TensorRT's explicit quantisation
    expects; unsigned activations are faster with ONNX Runtime's CPU kernels.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    work = out_path.parent
    src, pre = work / "int8_src.onnx", work / "int8_pre.onnx"
    onnx.save(logits_model, src)
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
    quantize_static(
        str(pre),
        str(out_path),
        ImageFolderReader(calib_images, height, width),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv", "Add", "MaxPool"],
        per_channel=True,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
    )
    return onnx.load(str(out_path))


# ----------------------------------------------------------------------------------------------------------------
# TensorRT

GPU_EXTRA = "pip install 'dass[gpu]'"


def require_tensorrt() -> None:
    """``DeployError`` naming what the TensorRT build lacks: the ``tensorrt`` package and/or a CUDA GPU."""
    import importlib.util

    missing = []
    if importlib.util.find_spec("tensorrt") is None:
        missing.append("the 'tensorrt' Python package is not installed")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    if missing:
        raise DeployError(f"--trt needs TensorRT and a CUDA GPU, but {' and '.join(missing)}; install with {GPU_EXTRA}")


def build_trt_engine(
    onnx_path: Path,
    plan_path: Path,
    height: int,
    width: int,
    dynamic: bool,
    fp16: bool = False,
    int8: bool = False,
    max_batch: int = MAX_BATCH,
    workspace_gib: float = 4.0,
) -> dict:
    """Build a serialised TensorRT engine from the exported ONNX graph; returns the build settings for meta.json.

    One optimisation profile: batch 1 / 1 / ``max_batch``; with ``dynamic`` the spatial size ranges from half to
    twice the export size with the export size as the optimum. INT8 uses the graph's QDQ nodes (explicit
    quantisation: the calibration already happened in ``quantize_int8``). A timing cache next to the plan makes
    rebuilds for the same GPU fast.
    """
    require_tensorrt()
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DeployError(f"TensorRT cannot parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16 or int8:
        config.set_flag(trt.BuilderFlag.FP16)  # INT8 layers fall back to fp16 (not fp32) where INT8 has no kernel
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)

    if dynamic:
        lo, hi = (max(8, height // 2), max(8, width // 2)), (height * 2, width * 2)
    else:
        lo = hi = (height, width)
    shapes = {"min": (1, 3, *lo), "opt": (1, 3, height, width), "max": (max_batch, 3, *hi)}
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)

    cache_path = plan_path.with_suffix(".timing.cache")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DeployError(f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)")
    plan_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {
        "tensorrt": trt.__version__,
        "fp16": bool(fp16 or int8),
        "int8": bool(int8),
        "profile": {k: list(v) for k, v in shapes.items()},
        "timing_cache": cache_path.name,
        "gpu": torch.cuda.get_device_name(0),
    }


# ----------------------------------------------------------------------------------------------------------------
# Export


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _versions() -> dict:
    import dass_deploy

    versions = {
        "dass": dass_deploy.__version__,
        "python": _platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
    }
    try:
        import onnxslim

        versions["onnxslim"] = onnxslim.__version__
    except Exception:
        pass
    return versions


def _class_table(meta: dict, num_classes: int) -> tuple[list[str], list[list[int]], list[int]]:
    """class names, palette and trainId -> Cityscapes labelId; the Cityscapes tables when the classes are those."""
    from dass_train.labels import CLASS_NAMES, PALETTE, TRAIN_ID_TO_LABEL_ID

    names = list(meta.get("class_names") or [])
    if not names and num_classes == len(CLASS_NAMES):
        names = list(CLASS_NAMES)
    if len(names) != num_classes:
        names = [f"class_{i}" for i in range(num_classes)]
    if names == list(CLASS_NAMES):
        return names, PALETTE.tolist(), TRAIN_ID_TO_LABEL_ID[:num_classes].tolist()
    rng = np.random.default_rng(num_classes)  # a fixed, distinct colour per class for foreign class sets
    palette = rng.integers(0, 256, size=(num_classes, 3)).tolist()
    return names, palette, list(range(num_classes))


def _validate(height: int, width: int, output: str, fp16: bool, int8: bool, calib, int8_val, name) -> None:
    if height < 8 or width < 8:
        raise DeployError(f"--height/--width must be at least 8, got {height}x{width}")
    if output not in ("labels", "logits"):
        raise DeployError(f"--output must be 'labels' or 'logits', got {output!r}")
    if fp16 and int8:
        raise DeployError("choose one of --fp16 and --int8 (with --trt, --int8 also enables fp16 kernels)")
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
    if name is not None and (not name or name.startswith(".") or any(c in name for c in "/\\ ")):
        raise DeployError(f"--name must be a plain folder name (no slashes, spaces or leading dot), got {name!r}")


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
) -> ExportResult:
    """Export ``checkpoint`` to ``<out>/<name>/`` (Triton layout), check parity with torch, rename into place.

    Raises ``DeployError`` for bad options, an existing destination, a missing TensorRT / GPU and failed parity
    (unless ``force``), and ``dass_train.errors.CheckpointError`` for unreadable checkpoints.
    """
    from dass_train.checkpoint import load_model

    def step(message: str) -> None:
        if progress:
            print(f"dass-export: {message}", file=sys.stderr, flush=True)

    _validate(height, width, output, fp16, int8, calib, int8_val, name)
    checkpoint = Path(checkpoint)
    precision = "int8" if int8 else "fp16" if fp16 else "fp32"
    name = name or f"{checkpoint.stem}-{precision}" + ("-trt" if trt else "")
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
) -> ExportResult:
    """The export proper, writing into ``tmp_dir``; ``export_model`` owns the temp-folder / rename protocol."""
    graph = ExportGraph(model, normalization, output="logits").eval()

    step(f"tracing to ONNX (opset {OPSET}, {height}x{width}{', dynamic' if dynamic else ''})")
    raw_path = work / "logits_raw.onnx"
    with torch.inference_mode():
        _torch_export(graph, raw_path, height, width, dynamic)
    fp32_logits = _simplify(onnx.load(str(raw_path)))
    onnx.checker.check_model(fp32_logits)

    # The shipped logits graph of the requested precision.
    extra: dict = {}
    if precision == "fp16":
        step("converting to fp16")
        logits_model = convert_to_fp16(fp32_logits)
    elif precision == "int8":
        step(f"INT8 calibration on {len(calib_paths)} images")
        logits_model = quantize_int8(fp32_logits, work / "int8.onnx", calib_paths, height, width, symmetric=trt)
    else:
        logits_model = fp32_logits
    shipped = append_argmax(logits_model) if output == "labels" else logits_model
    onnx.checker.check_model(shipped)

    # Parity: torch fp32 vs ORT (logits of the shipped precision, and the shipped graph's own output).
    step(f"parity check on {parity_samples} inputs (ONNX Runtime CPU vs torch)")
    images = synthetic_images(max(1, parity_samples), height, width)
    real = calib_paths[:1]
    if real:
        images[-1] = load_image(real[0], height, width)
    with torch.inference_mode():
        ref = torch.cat([graph(torch.from_numpy(images[i : i + 1])) for i in range(len(images))]).numpy()
    ort_logits = _run(ort_session(logits_model), images)
    shipped_session = ort_session(shipped)
    ort_out = _run(shipped_session, images) if output == "labels" else ort_logits
    ref_labels = ref.argmax(1)
    ort_labels = ort_out if output == "labels" else ort_out.argmax(1)
    diff = np.abs(ort_logits.astype(np.float64) - ref)
    parity = {
        "reference": "torch fp32 (CPU)",
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "samples": len(images),
        "real_images": len(real),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "max_abs_logit": float(np.abs(ref).max()),
        "argmax_agreement": float((ort_labels == ref_labels).mean()),
        "thresholds": {"argmax_agreement": MIN_AGREEMENT[precision]} if precision in MIN_AGREEMENT else {},
    }
    failures = []
    if precision == "fp32":
        tol = FP32_MAX_ABS * max(1.0, parity["max_abs_logit"] / FP32_REL_SCALE)
        parity["thresholds"]["max_abs_logit_diff"] = tol
        if parity["max_abs_logit_diff"] > tol:
            failures.append(f"max|Δlogit| {parity['max_abs_logit_diff']:.2e} > {tol:.1e}")
    # INT8 is judged by its mIoU change on a labelled val set (when given); agreement alone is only reported.
    if precision != "int8" and parity["argmax_agreement"] < MIN_AGREEMENT[precision]:
        failures.append(f"argmax agreement {100 * parity['argmax_agreement']:.2f}% < {100 * MIN_AGREEMENT[precision]}%")

    if precision == "int8":
        step("timing fp32 vs int8 on CPU")
        fp32_session = ort_session(append_argmax(fp32_logits) if output == "labels" else fp32_logits)
        fp32_ms = _median_ms(fp32_session, images[:1])
        int8_ms = _median_ms(shipped_session, images[:1])
        extra["int8"] = {"fp32_ms": fp32_ms, "int8_ms": int8_ms, "cpu_speedup": fp32_ms / int8_ms}
        extra["int8"]["calibration_images"] = len(calib_paths)
        if int8_val is not None:
            step(f"mIoU fp32 vs int8 on {int8_val}")
            val = evaluate_miou_pair(ort_session(fp32_logits), ort_session(logits_model), Path(int8_val), height, width)
            extra["int8"].update(val)
            if val["miou_drop"] > INT8_MAX_MIOU_DROP:
                failures.append(f"INT8 mIoU drop {val['miou_drop']:.2f} > {INT8_MAX_MIOU_DROP} points")
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
        trt_info = build_trt_engine(onnx_path, version_dir / PLAN_FILE, height, width, dynamic,
                                    fp16=precision == "fp16", int8=precision == "int8")  # fmt: skip

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
        "precision": precision,
        "source_checkpoint": {"path": str(checkpoint), "sha256": _sha256(checkpoint)},
        "backbone": ckpt_meta.get("backbone"),
        # what the demo needs to pair a source-only and an adapted model of the same benchmark
        "stage": ckpt_meta.get("stage"),
        "benchmark": ckpt_meta.get("benchmark"),
        "export": {
            "opset": OPSET,
            "max_batch_size": MAX_BATCH,
            "dynamic_axes": ["batch", "height", "width"] if dynamic else ["batch"],
            "upsample": "bilinear, align_corners=False",
            "source": source,
            "stem": stem,
            "load_report": list(report),
            "checkpoint_stage": ckpt_meta.get("stage"),
            "checkpoint_iteration": ckpt_meta.get("iteration"),
            "int8": extra.get("int8"),
            "tensorrt": trt_info,
        },
        "parity": parity,
        "versions": _versions(),
    }
    if ckpt_meta.get("metrics"):
        meta["metrics"] = ckpt_meta["metrics"]
    (tmp_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    size_mb = onnx_path.stat().st_size / 1e6
    line = (
        f"Exported {dest} ({precision}, {height}x{width}{', dynamic' if dynamic else ''}, {output}) parity: "
        f"max|Δlogit| {parity['max_abs_logit_diff']:.1e}, argmax agree {100 * parity['argmax_agreement']:.2f}%"
        f"{' (FORCED)' if parity['forced'] else ''} -> {VERSION}/{ONNX_FILE} {size_mb:.1f} MB"
    )
    summary = [*report, line]
    if "int8" in extra:
        i8 = extra["int8"]
        text = f"INT8 on CPU: {i8['fp32_ms']:.0f} ms -> {i8['int8_ms']:.0f} ms ({i8['cpu_speedup']:.2f}x)"
        if "miou_int8" in i8:
            text += f", mIoU {i8['miou_fp32']:.2f} -> {i8['miou_int8']:.2f} on {i8['val_images']} val images"
        summary.append(text)
    if trt_info:
        summary.append(f"TensorRT {trt_info['tensorrt']} plan -> {VERSION}/{PLAN_FILE} (profile {trt_info['profile']})")
    return ExportResult(model_dir=dest, meta=meta, summary=summary)


def evaluate_miou_pair(
    reference: ort.InferenceSession, candidate: ort.InferenceSession, root: Path, height: int, width: int
) -> dict:
    """mIoU (in points) of two logits sessions on a Cityscapes-layout val set, both at the export size."""
    from dass_train.metrics import confusion_matrix, scores

    pairs = _find_val_pairs(root)
    confs = [None, None]
    for image_path, label_path in pairs:
        image = load_image(image_path, height, width)[None]
        gt = _load_train_ids(label_path, height, width)
        for j, session in enumerate((reference, candidate)):
            logits = session.run(None, {INPUT_NAME: image})[0][0]  # [K,H,W]
            conf = confusion_matrix(logits.argmax(0).astype(np.uint8), gt, logits.shape[0])
            confs[j] = conf if confs[j] is None else confs[j] + conf
    miou_ref, miou_cand = (100 * scores(c)["miou"] for c in confs)
    return {"val_images": len(pairs), "miou_fp32": miou_ref, "miou_int8": miou_cand, "miou_drop": miou_ref - miou_cand}
