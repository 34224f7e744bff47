"""PyTorch eager backend (the reference): a dass checkpoint, or the source checkpoint named by a model directory.

The only runtime file that imports torch, and only when a backend is created. It does what the exported graph does:
normalise (colour order, mean, std), run the network, upsample the logits bilinearly to the input size, argmax.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dass_deploy.errors import DeployError

PRECISIONS = ("fp32", "fp16", "bf16")


class TorchBackend:
    """Eager PyTorch on CPU or CUDA; fp16 / bf16 autocast, channels_last and ``torch.compile`` are CUDA/opt-in extras."""

    def __init__(
        self,
        checkpoint: str | Path,
        device: str = "cpu",
        precision: str = "fp32",
        channels_last: bool | None = None,
        compile: bool = False,
        threads: int | None = None,
        meta: dict[str, Any] | None = None,
    ):
        try:
            import torch
        except ImportError:
            raise DeployError(
                "the torch backend needs PyTorch (pip install torch); use --backend onnxruntime"
            ) from None
        from dass_train.checkpoint import load_model, upsampling_align_corners
        from dass_train.errors import UserError

        if precision not in PRECISIONS:
            raise DeployError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        if device == "cuda" and not torch.cuda.is_available():
            raise DeployError("--device cuda: PyTorch sees no CUDA GPU here; use --device cpu")
        if device == "cpu" and precision != "fp32":
            raise DeployError(f"precision {precision} needs --device cuda; the CPU torch backend runs fp32")
        if threads:
            torch.set_num_threads(int(threads))
        try:
            model, ckpt_meta, self.report = load_model(str(checkpoint))
        except UserError as exc:
            raise DeployError(str(exc)) from exc
        self.torch = torch
        self.device = torch.device(device)
        self.channels_last = device == "cuda" if channels_last is None else channels_last
        model = model.eval().to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.network = model  # the module itself (``--adapt-bn`` re-estimates its BatchNorm statistics)
        self.checkpoint_meta = ckpt_meta
        self.model = torch.compile(model) if compile else model
        self.precision = precision
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        norm = ckpt_meta["normalization"]
        self.align_corners = upsampling_align_corners(ckpt_meta)  # as the checkpoint's lineage trained it
        self.bgr = norm.get("color", "RGB").upper() == "BGR"
        self.mean = torch.tensor(norm["mean"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(norm["std"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        # A model directory's meta (sizes, palette) wins over the checkpoint's, so both backends behave alike.
        self.meta = dict(meta) if meta is not None else checkpoint_meta(ckpt_meta, checkpoint)
        self.name = "torch" if device == "cpu" else f"torch-{device}"
        spec = self.meta.get("input", {})
        h, w = spec.get("height"), spec.get("width")
        self.input_size = (int(h), int(w)) if h and w else None
        self.dynamic = True  # a fully convolutional network takes any size

    def prepare(self, batch: np.ndarray) -> Any:
        """``float32 [N,3,H,W]`` RGB 0..255 -> the network's input tensor (colour order, mean, std, device): what
        ``predict`` feeds the network, and what ``--adapt-bn`` re-estimates the statistics on."""
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device, non_blocking=True)
        if self.bgr:
            x = x.flip(1)
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """``float32 [N,3,H,W]`` RGB 0..255 -> ``uint8 [N,H,W]``."""
        torch = self.torch
        with torch.inference_mode():
            x = self.prepare(batch)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                logits = self.model(x)
            logits = torch.nn.functional.interpolate(
                logits.float(), size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners
            )
            return logits.argmax(1).to(torch.uint8).cpu().numpy()


def checkpoint_meta(ckpt_meta: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """A ``meta.json``-shaped dict for a bare checkpoint (no fixed input size)."""
    from dass_train.labels import PALETTE, TRAIN_ID_TO_LABEL_ID

    num_classes = int(ckpt_meta.get("num_classes", 19))
    palette = PALETTE.tolist() if num_classes == len(PALETTE) else np.resize(PALETTE, (num_classes, 3)).tolist()
    return {
        "name": Path(path).stem,
        "num_classes": num_classes,
        "class_names": list(ckpt_meta.get("class_names", [str(i) for i in range(num_classes)])),
        "palette": palette,
        "train_id_to_label_id": TRAIN_ID_TO_LABEL_ID[:num_classes].tolist(),
        "input": {"name": "image", "format": "rgb255", "layout": "NCHW", "dtype": "float32", "dynamic": True},
        "output": {"name": "labels", "kind": "labels", "dtype": "uint8", "full_resolution": True},
        "normalization": ckpt_meta.get("normalization"),
        "precision": "fp32",
        "backbone": ckpt_meta.get("backbone"),
        "source_checkpoint": {"path": str(path)},
    }
