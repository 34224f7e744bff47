"""Precision conversion of the fp32 logits graph: fp16 body, INT8 (QDQ) static quantisation."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dass_deploy.errors import DeployError
from dass_deploy.export.graph import INPUT_NAME
from dass_deploy.export.images import ImageFolderReader, load_image

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


#: Calibration methods. ``nncf``: NNCF's post-training quantisation (activation ranges from the calibration images,
#: then a bias correction that restores each layer's mean output, which rounding shifts); the others are ONNX Runtime's
#: static quantiser: ``minmax`` (the observed range; one outlier pixel widens every step), ``percentile`` (the
#: 99.999th percentile of |activation|: clips rare outliers, finer steps for the rest), ``entropy`` (KL-optimal range).
#: benchmarks/results/int8.md measures them on the shipped model: only ``nncf`` stays within the gate there.
#: ``nncf-accuracy`` is NNCF's accuracy-controlled quantisation: ``nncf``, then the layers whose rounding costs the
#: most mIoU on ``--int8-val`` go back to float, a few at a time, until the drop is within the gate (for models with
#: activation ranges 8 bits cannot hold, such as benchmarks/results/int8_r101.md's).
CALIBRATIONS = ("nncf", "nncf-accuracy", "minmax", "percentile", "entropy")
#: Layers that may be kept in float: ``first_conv`` sees the raw normalised image, ``classifier`` (ASPP) writes
#: the logits the argmax decides on; both are small in FLOPs and the most sensitive to rounding.
KEEP_FLOAT = ("first_conv", "classifier")
NNCF_EXTRA = "pip install 'dass[int8]'"


def default_int8_method(
    calibration: str | None, keep_float: Sequence[str] | None, trt: bool
) -> tuple[str, tuple[str, ...]]:
    """The INT8 method when the user names none: NNCF with every layer quantised for the CPU runtimes; for TensorRT,
    ONNX Runtime's percentile calibration (signed symmetric QDQ, which TensorRT's explicit quantisation needs), with
    the first conv and the classifier in float (the best ORT method on the gate, int8.md)."""
    if calibration is None:
        calibration = "percentile" if trt else "nncf"
    if keep_float is None:
        keep_float = () if calibration.startswith("nncf") else KEEP_FLOAT
    return calibration, tuple(keep_float)


def require_quantiser(calibration: str, symmetric: bool = False, val_root: str | os.PathLike | None = None) -> None:
    """``DeployError`` when ``calibration`` cannot run as asked: the NNCF methods need the ``nncf`` package and
    write QDQ for the CPU runtimes, not TensorRT's signed symmetric QDQ (``symmetric``); ``nncf-accuracy`` also needs
    the val set whose mIoU it keeps within the gate. The exporter calls it before the slow part, ``quantize_int8``
    again for direct callers."""
    if not calibration.startswith("nncf"):
        return
    if symmetric:
        raise DeployError("--int8-calibration nncf writes QDQ for the CPU runtimes; with --trt use percentile")
    if importlib.util.find_spec("nncf") is None:
        raise DeployError(f"--int8-calibration nncf needs the 'nncf' package; install it with {NNCF_EXTRA}")
    if calibration == "nncf-accuracy" and val_root is None:
        raise DeployError("--int8-calibration nncf-accuracy needs --int8-val (the mIoU it keeps within the gate)")


def float_convs(model: onnx.ModelProto) -> int:
    """Convolutions of a QDQ graph that run in float (their input does not come from a DequantizeLinear)."""
    producer = {out: n.op_type for n in model.graph.node for out in n.output}
    return sum(1 for n in model.graph.node if n.op_type == "Conv" and producer.get(n.input[0]) != "DequantizeLinear")


def int8_float_nodes(model: onnx.ModelProto, keep: Sequence[str]) -> list[str]:
    """Names of the Conv nodes ``keep`` names: the first Conv of the graph and/or the classifier, i.e. the Convs that
    reach the logits output through non-Conv nodes only (the ASPP branches and their sum)."""
    unknown = set(keep) - set(KEEP_FLOAT)
    if unknown:
        raise ValueError(f"unknown int8 float layers {sorted(unknown)}; choose from {', '.join(KEEP_FLOAT)}")
    graph = model.graph
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    names: list[str] = []
    convs = [n for n in graph.node if n.op_type == "Conv"]
    if "first_conv" in keep and convs:
        names.append(convs[0].name)
    if "classifier" in keep:
        producer = {out: n for n in graph.node for out in n.output}
        stack, seen = [o.name for o in graph.output], set()
        while stack:
            node = producer.get(stack.pop())
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            if node.op_type == "Conv":
                names.append(node.name)
            else:
                stack.extend(node.input)
    return list(dict.fromkeys(names))


def quantize_int8(
    logits_model: onnx.ModelProto,
    out_path: Path,
    calib_images: Sequence[Path],
    height: int,
    width: int,
    symmetric: bool = False,
    calibration: str = "nncf",
    keep_float: Sequence[str] = (),
    progress: bool = False,
    val_root: Path | None = None,
) -> onnx.ModelProto:
    """Static INT8 quantisation (QDQ, per-channel symmetric weights) of the *logits* graph, calibrated on target
    images.

    Only the CNN body is quantised; the normalisation in front and the bilinear resize behind stay float, and so do
    the layers ``keep_float`` names (``KEEP_FLOAT``). ``calibration`` picks the quantiser and how activation ranges
    are set (``CALIBRATIONS``). ``symmetric=True`` gives the signed, zero-point-free tensors that TensorRT's explicit
    quantisation expects (ONNX Runtime's quantiser only); unsigned activations are faster on CPU. ``val_root`` (a
    Cityscapes-layout val folder) is what ``nncf-accuracy`` measures the mIoU drop on.
    """
    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown int8 calibration {calibration!r}; choose from {', '.join(CALIBRATIONS)}")
    require_quantiser(calibration, symmetric, val_root)
    if calibration.startswith("nncf"):
        accuracy = Path(val_root) if calibration == "nncf-accuracy" else None
        return _quantize_nncf(logits_model, out_path, calib_images, height, width, keep_float, progress, accuracy)
    return _quantize_ort(logits_model, out_path, calib_images, height, width, symmetric, calibration, keep_float)


def _quantize_nncf(
    logits_model: onnx.ModelProto,
    out_path: Path,
    calib_images: Sequence[Path],
    height: int,
    width: int,
    keep_float: Sequence[str],
    progress: bool,
    accuracy_val: Path | None = None,
) -> onnx.ModelProto:
    """NNCF post-training quantisation of the ONNX graph (``MIXED`` preset: symmetric per-channel weights, asymmetric
    activations; fast bias correction), over every calibration image. The result is QDQ ONNX, so ONNX Runtime's gate
    and both CPU runtimes read the same file. With ``accuracy_val``, NNCF's accuracy control returns layers to float,
    ranked by what their rounding costs in mIoU on that val set, until the drop is within ``INT8_MAX_MIOU_DROP``."""
    import nncf

    from dass_deploy.export.parity import INT8_MAX_MIOU_DROP, load_val_item, val_items, val_miou

    model = onnx.shape_inference.infer_shapes(logits_model)
    excluded = int8_float_nodes(model, keep_float)
    dataset = nncf.Dataset(list(calib_images), lambda path: {INPUT_NAME: load_image(path, height, width)[None]})
    common = dict(
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(calib_images),
        ignored_scope=nncf.IgnoredScope(names=excluded) if excluded else None,
    )
    # NNCF draws rich progress bars on stdout: on stderr beside the export's own steps, or nowhere with --quiet
    with contextlib.ExitStack() as stack:
        sink = sys.stderr if progress else stack.enter_context(open(os.devnull, "w"))
        stack.enter_context(contextlib.redirect_stdout(sink))
        nncf.set_log_level(logging.WARNING if progress else logging.ERROR)
        if accuracy_val is None:
            quantized = nncf.quantize(model, dataset, **common)
        else:
            items = val_items(accuracy_val, height, width)
            quantized = nncf.quantize_with_accuracy_control(
                model,
                dataset,
                nncf.Dataset(items, lambda item: {INPUT_NAME: load_val_item(item)[0]}),
                val_miou,  # mIoU in [0, 1] of a (candidate) graph on (image, label) items
                max_drop=INT8_MAX_MIOU_DROP / 100,
                drop_type=nncf.DropType.ABSOLUTE,
                **common,
            )
    onnx.save(quantized, str(out_path))
    return quantized


def _quantize_ort(
    logits_model: onnx.ModelProto,
    out_path: Path,
    calib_images: Sequence[Path],
    height: int,
    width: int,
    symmetric: bool,
    calibration: str,
    keep_float: Sequence[str],
) -> onnx.ModelProto:
    """ONNX Runtime's static quantiser: Conv, Add and MaxPool in QDQ, ranges by ``calibration``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    work = out_path.parent
    src, pre = work / "int8_src.onnx", work / "int8_pre.onnx"
    onnx.save(logits_model, src)
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
    prepared = onnx.load(str(pre))
    excluded = int8_float_nodes(prepared, keep_float)
    onnx.save(prepared, str(pre))  # with the node names int8_float_nodes may have filled in
    method = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[calibration]
    extra = {"ActivationSymmetric": symmetric, "WeightSymmetric": True}
    if calibration == "percentile":
        extra.update(CalibPercentile=99.999, CalibTensorRangeSymmetric=symmetric)
    quantize_static(
        str(pre),
        str(out_path),
        ImageFolderReader(calib_images, height, width),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv", "Add", "MaxPool"],
        per_channel=True,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=method,
        nodes_to_exclude=excluded,
        extra_options=extra,
    )
    return onnx.load(str(out_path))
