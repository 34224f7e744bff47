"""The traced ONNX graph: normalisation + DeepLab-V2 + full-resolution bilinear upsampling (+ ArgMax tail).

image RGB float32 0..255 [N,3,H,W]
  -> colour swap / mean / std of the checkpoint (Caffe BGR for AdaptSegNet-lineage weights)
  -> DeepLab-V2 logits [N,K,H/8,W/8]
  -> bilinear upsample to [N,K,H,W] (align_corners as the checkpoint's lineage trained with)
  -> ArgMax over K -> Cast uint8 -> "labels" [N,H,W]      (default; ``output="logits"`` stops before ArgMax)
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

OPSET = 17
INPUT_NAME = "image"
LOGITS_NAME = "logits"
LABELS_NAME = "labels"
MAX_BATCH = 8  # Triton max_batch_size and the TensorRT profile's largest batch


class ExportGraph(nn.Module):
    """Wraps DeepLab-V2 with the input normalisation and the full-resolution output.

    ``forward(image [N,3,H,W] RGB 0..255) -> logits [N,K,H,W]`` float, or ``labels [N,H,W]`` uint8.
    """

    def __init__(
        self, model: nn.Module, normalization: dict, output: str = "logits", align_corners: bool = False
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.output = output
        self.align_corners = bool(align_corners)
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
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        if self.output == "labels":
            return logits.argmax(dim=1).to(torch.uint8)
        return logits


def _torch_export(
    graph: ExportGraph, path: Path, height: int, width: int, dynamic: bool, keep_bn: bool = False
) -> None:
    """Trace ``graph`` to ONNX with a dynamic batch axis (and dynamic H, W when ``dynamic``).

    The TorchScript exporter (``dynamo=False``) is tried first: it is fast and handles this plain CNN; torch
    versions without it fall back to the dynamo exporter. It folds each BatchNorm into the convolution before it,
    unless ``keep_bn`` (``--keep-bn``): then the graph keeps BatchNormalization nodes, whose statistics a runtime
    can re-estimate without PyTorch (``dass_deploy.adapt_bn_onnx``); the model is still in eval mode, so the nodes
    normalise with the stored statistics.
    """
    dummy = torch.zeros(1, 3, height, width)
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
    out_axes = dict(axes) if graph.output == "logits" else {k - 1 if k > 0 else 0: v for k, v in axes.items()}
    out_name = LOGITS_NAME if graph.output == "logits" else LABELS_NAME
    kwargs = dict(input_names=[INPUT_NAME], output_names=[out_name], opset_version=OPSET)
    # PRESERVE exports the modules' own (eval) mode without the eval-mode folding of BN into the convolutions
    training = torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL
    try:
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice is expected here
            warnings.simplefilter("ignore", DeprecationWarning)
            # PRESERVE's advice to turn constant folding off is for training graphs; this one is in eval mode
            warnings.filterwarnings("ignore", message="It is recommended that constant folding be turned off")
            torch.onnx.export(
                graph,
                (dummy,),
                str(path),
                dynamo=False,
                do_constant_folding=True,
                dynamic_axes={INPUT_NAME: axes, out_name: out_axes},
                training=training,
                **kwargs,
            )
    except (TypeError, NotImplementedError):  # TorchScript exporter removed
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        shapes = {0: batch}
        if dynamic:
            shapes.update({2: torch.export.Dim("height", min=64), 3: torch.export.Dim("width", min=64)})
        program = torch.onnx.export(graph, (dummy,), dynamo=True, dynamic_shapes={"image": shapes}, **kwargs)
        program.save(str(path))


def _simplify(model: onnx.ModelProto, keep_bn: bool = False) -> onnx.ModelProto:
    """Constant folding and dead-node removal with onnxslim; the unsimplified graph is kept if slim fails.
    ``keep_bn``: without onnxslim's Conv+BatchNormalization fusion."""
    try:
        import onnxslim

        slim = onnxslim.slim(model, skip_fusion_patterns=["FusionConvBN"] if keep_bn else None)
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
