"""``dass-segment --model M --adapt-bn SOURCE`` without PyTorch: the BatchNorm statistics of an exported model whose
BatchNormalization nodes were kept (``dass-export --keep-bn``) re-estimated with ONNX Runtime and numpy.

The estimate is the one ``dass_train.bn_statistics.population_bn_statistics`` makes in PyTorch, one frame per run,
in the same passes. For pass 1 a copy of the graph replaces each BatchNormalization by what a BN layer does in train
mode: normalise with the frame's own channel mean and (biased) variance. For every later pass a copy keeps the
nodes, reading the last pass's statistics. Either copy also hands out each node's input mean and variance per
frame as extra outputs; pooled over the frames (the mean, and the unbiased variance of every pixel of every frame)
they are written into the model's own BatchNormalization nodes, each given fresh mean and variance tensors (the
exporter deduplicates equal tensors, so a BN node's statistics may share storage with another node's scale). ONNX
Runtime folds the nodes into the convolutions when it loads the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dass_deploy.adapt_bn import Adaptation, FrameFeed, Statistics, statistics_movement
from dass_deploy.adapt_frames import DEFAULT_ADAPT_PASSES, AdaptFrames
from dass_deploy.errors import DeployError

AXES = [0, 2, 3]  # every axis but the channel: the statistics of BatchNorm over a batch of [N,C,H,W]


@dataclass(frozen=True)
class BatchNormNode:
    """One BatchNormalization node of the graph: its position, layer name, input and parameters (numpy)."""

    index: int
    layer: str
    x: str
    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float


def layer_name(node_name: str, index: int) -> str:
    """The PyTorch module name of a node the torch exporter named by scope: ``/model/layer2/layer2.0/downsample/
    downsample.1/BatchNormalization`` -> ``layer2.0.downsample.1`` (a child of a Sequential repeats its parent's
    name as a prefix); ``bn<index>`` for a node without a scope name."""
    scopes = [part for part in node_name.split("/")[1:-1] if part]
    if scopes and scopes[0] == "model":  # the export graph wraps the network as ``model``
        scopes = scopes[1:]
    parts: list[str] = []
    for part in scopes:
        if parts and part.startswith(parts[-1] + "."):
            parts[-1] = part
        else:
            parts.append(part)
    return ".".join(parts) or f"bn{index}"


def batchnorm_nodes(model: Any) -> list[BatchNormNode]:
    """The graph's inference BatchNormalization nodes whose parameters are float32 initializers."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    nodes = []
    for index, node in enumerate(model.graph.node):
        if node.op_type != "BatchNormalization":
            continue
        params = [initializers.get(name) for name in node.input[1:5]]
        if len(node.output) != 1 or any(p is None for p in params):
            raise DeployError(
                f"BatchNormalization node {node.name!r} is not an inference node with constant statistics"
            )
        scale, bias, mean, var = (numpy_helper.to_array(p) for p in params)
        if any(a.dtype != np.float32 for a in (scale, bias, mean, var)):
            raise DeployError(f"BatchNormalization node {node.name!r} is not float32 (export with --keep-bn in fp32)")
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        layer = layer_name(node.name, len(nodes))
        nodes.append(BatchNormNode(index, layer, node.input[0], scale, bias, mean, var, float(eps)))
    return nodes


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _reduce_mean(x: str, out: str, opset: int, axes_name: str) -> Any:
    """``ReduceMean`` over ``AXES`` keeping dims: axes are an attribute up to opset 17 and an input from 18."""
    from onnx import helper

    if opset >= 18:
        return helper.make_node("ReduceMean", [x, axes_name], [out], keepdims=1)
    return helper.make_node("ReduceMean", [x], [out], axes=AXES, keepdims=1)


def statistics_model(
    model: Any, nodes: list[BatchNormNode], train_mode: bool = True
) -> tuple[Any, list[tuple[str, str, str]]]:
    """A copy of ``model`` that outputs each BatchNormalization node's input statistics per run: returns the model
    and, per node, the names of its (mean, biased variance, input shape). ``train_mode``: the nodes are replaced by
    a normalisation with the batch's own statistics, as BatchNorm in train mode; otherwise they stay as they are."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    stats = onnx.ModelProto()
    stats.CopyFrom(model)
    opset, graph = _opset(model), stats.graph
    axes_name = "adapt_bn/axes"
    graph.initializer.append(numpy_helper.from_array(np.asarray(AXES, dtype=np.int64), axes_name))
    replaced, outputs = {n.index: n for n in nodes}, []
    new_nodes = []
    for index, node in enumerate(graph.node):
        bn = replaced.get(index)
        if bn is None or not train_mode:
            new_nodes.append(node)
        if bn is None:
            continue
        p = f"adapt_bn/{len(outputs)}/"
        shape4 = (1, -1, 1, 1)
        graph.initializer.extend(
            [
                numpy_helper.from_array(bn.scale.reshape(shape4), p + "scale"),
                numpy_helper.from_array(bn.bias.reshape(shape4), p + "bias"),
                numpy_helper.from_array(np.asarray(bn.eps, dtype=np.float32), p + "eps"),
            ]
        )
        new_nodes += [
            _reduce_mean(bn.x, p + "mean", opset, axes_name),
            helper.make_node("Sub", [bn.x, p + "mean"], [p + "centred"]),
            helper.make_node("Mul", [p + "centred", p + "centred"], [p + "squared"]),
            _reduce_mean(p + "squared", p + "var", opset, axes_name),
            helper.make_node("Shape", [bn.x], [p + "shape"]),
        ]
        if train_mode:
            new_nodes += [
                helper.make_node("Add", [p + "var", p + "eps"], [p + "var_eps"]),
                helper.make_node("Sqrt", [p + "var_eps"], [p + "std"]),
                helper.make_node("Div", [p + "centred", p + "std"], [p + "normalised"]),
                helper.make_node("Mul", [p + "normalised", p + "scale"], [p + "scaled"]),
                helper.make_node("Add", [p + "scaled", p + "bias"], [node.output[0]]),
            ]
        outputs.append((p + "mean", p + "var", p + "shape"))
    del graph.node[:]
    graph.node.extend(new_nodes)
    for mean, var, shape in outputs:
        graph.output.extend(
            [
                helper.make_tensor_value_info(mean, TensorProto.FLOAT, None),
                helper.make_tensor_value_info(var, TensorProto.FLOAT, None),
                helper.make_tensor_value_info(shape, TensorProto.INT64, None),
            ]
        )
    return stats, outputs


def pooled_pass(
    model: Any, nodes: list[BatchNormNode], frames: Any, providers: list[str], train_mode: bool
) -> Statistics:
    """One pass: each node's input mean and unbiased variance pooled over every pixel of every frame (float64)."""
    import onnxruntime as ort

    from dass_deploy.backends.onnxruntime import session_options

    stats, outputs = statistics_model(model, nodes, train_mode)
    session = ort.InferenceSession(stats.SerializeToString(), sess_options=session_options(), providers=providers)
    names = [name for triple in outputs for name in triple]
    input_name = session.get_inputs()[0].name
    sums = [np.zeros((2, len(n.mean)), dtype=np.float64) for n in nodes]
    counts = [0] * len(nodes)
    for x in frames:
        values = session.run(names, {input_name: x})
        for k, total in enumerate(sums):
            mean, var, shape = (v.astype(np.float64) for v in values[3 * k : 3 * k + 3])
            n = int(np.prod(shape)) // int(shape[1])  # values per channel: N*H*W
            counts[k] += n
            total[0] += n * mean.reshape(-1)
            total[1] += n * (var.reshape(-1) + mean.reshape(-1) ** 2)
    result = {}
    for node, total, n in zip(nodes, sums, counts, strict=True):
        mean = total[0] / n
        var = np.maximum(total[1] / n - mean**2, 0) * (n / (n - 1))
        result[node.layer] = (mean, var, node.eps)
    return result


def estimate_statistics(
    model: Any, nodes: list[BatchNormNode], feed: FrameFeed, providers: list[str]
) -> tuple[Statistics, list[float]]:
    """The population statistics of ``population_bn_statistics`` in ``feed.passes`` passes over its frames (one
    per run; 0: until a pass changes nothing); returns them and how far each pass after the first moved them."""
    estimate = pooled_pass(model, nodes, feed.pass_frames(), providers, train_mode=True)
    movement = []
    for _ in range(1, feed.passes or len(nodes) + 1):
        now = pooled_pass(with_statistics(model, nodes, estimate), nodes, feed.pass_frames(), providers, False)
        movement.append(statistics_movement(estimate, now))
        estimate, previous = now, estimate
        if not feed.passes and _converged(previous, now):
            break
    return estimate, movement


def _converged(before: Statistics, after: Statistics) -> bool:
    """``dass_train.bn_statistics.converged`` in numpy: no change beyond float rounding (1e-5)."""
    for name, (mean, var, _) in after.items():
        old_mean, old_var, _ = before[name]
        var = np.maximum(var, 1e-12)
        if (np.abs(mean - old_mean) / np.sqrt(var)).max() > 1e-5 or (np.abs(var - old_var) / var).max() > 1e-5:
            return False
    return True


def with_statistics(model: Any, nodes: list[BatchNormNode], statistics: Statistics) -> Any:
    """A copy of ``model`` whose BatchNormalization nodes read the given statistics (fresh tensors per node);
    initializers no node reads any more are dropped."""
    import onnx
    from onnx import numpy_helper

    adapted = onnx.ModelProto()
    adapted.CopyFrom(model)
    graph = adapted.graph
    for k, bn in enumerate(nodes):
        mean, var, _ = statistics[bn.layer]
        node = graph.node[bn.index]
        node.input[3], node.input[4] = f"adapt_bn/{k}/running_mean", f"adapt_bn/{k}/running_var"
        graph.initializer.extend(
            [
                numpy_helper.from_array(mean.astype(np.float32), node.input[3]),
                numpy_helper.from_array(var.astype(np.float32), node.input[4]),
            ]
        )
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return adapted


def adapt_onnx_model(
    onnx_path: Path,
    meta: dict[str, Any],
    frames: AdaptFrames,
    size: tuple[int, int] | None,
    providers: list[str],
    progress: bool = True,
    passes: int = DEFAULT_ADAPT_PASSES,
) -> tuple[Any, Adaptation]:
    """Re-estimate the statistics of the exported model at ``onnx_path`` on ``frames`` at ``size`` in ``passes``
    passes; returns the
    adapted ``onnx.ModelProto`` (not saved) and what was done. A model without BatchNormalization nodes (folded at
    export) is a one-line ``DeployError`` that says how to export one."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    nodes = batchnorm_nodes(model)
    if not nodes:
        raise DeployError(
            f"{onnx_path.parent.parent}: its BatchNorm is folded into the convolutions, so its statistics cannot be "
            "re-estimated without PyTorch; export it with dass-export --keep-bn, or use --checkpoint CKPT --adapt-bn"
        )
    before = {n.layer: (n.mean.astype(np.float64), n.var.astype(np.float64), n.eps) for n in nodes}
    feed = FrameFeed(frames, size, progress, passes)
    try:
        after, movement = estimate_statistics(model, nodes, feed, providers)
    finally:
        feed.close()
    training = ((meta.get("export") or {}).get("batchnorm") or {}).get("training", "unknown")
    adaptation = feed.adaptation(before, after, training, f"onnxruntime {ort.__version__}", movement)
    return with_statistics(model, nodes, after), adaptation


def adapt_exported_model(
    model_dir: str | Path,
    frames: AdaptFrames,
    size: tuple[int, int] | None = None,
    device: str = "cpu",
    threads: int | None = None,
    progress: bool = True,
    passes: int = DEFAULT_ADAPT_PASSES,
) -> tuple[Any, Adaptation]:
    """``dass-segment --model M --adapt-bn SOURCE``: an ONNX Runtime backend running M with statistics re-estimated
    on ``frames`` at ``size`` (default: the model's input size), in memory; nothing is written."""
    from dass_deploy.backends.onnxruntime import OnnxRuntimeBackend, providers_for
    from dass_deploy.repository import load_model_dir

    info = load_model_dir(model_dir)
    if info.onnx_path is None:
        raise DeployError(f"{info.path}: no ONNX model to adapt (1/model.onnx)")
    model, adaptation = adapt_onnx_model(
        info.onnx_path, info.meta, frames, size or info.input_size, providers_for(device), progress, passes
    )
    backend = OnnxRuntimeBackend(info, device=device, threads=threads, model=model.SerializeToString())
    backend.meta = {**info.meta, "adapt_bn": adaptation.record}
    return backend, adaptation
