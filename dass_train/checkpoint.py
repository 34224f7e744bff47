"""Checkpoints: atomic saving, safe loading, and the key layouts of the DeepLab-V2 lineage.

Our own files are ``{"format": "dass-checkpoint", "version": 1, "model": state_dict, "meta": MODEL_META, ...}``
and contain tensors and plain Python values only, so they load with ``torch.load(weights_only=True)``: a
checkpoint from the internet can then not run code on load. External DeepLab-V2 weights are recognised from
their keys and renamed to our layout (``network.DeepLabV2`` uses AdaptSegNet's names):

- ``adaptseg``: a bare AdaptSegNet-style ``state_dict`` (also wrapped in ``{"state_dict"|"model": ...}``, with a
  DataParallel ``module.`` or DeepLab ``Scale.`` prefix); Caffe BGR normalisation.
- ``bida-authors``: the BiDA authors' checkpoint, AdaptSegNet keys plus a second stem for target images
  (``target_conv1``, ``target_bn1``, ``target_layer1``) and an unused second classifier ``layer6``.
  ``stem="target"`` (the default for this layout, since deployment sees real images) puts the target stem in
  place of ``conv1``/``bn1``/``layer1``.
- ``proda``: ProDA's ``{"ResNet101": {"model_state": ..., "objective_vectors": ...}, "iter", "best_iou"}`` with
  its own classifier (``layer5.bottleneck``/``layer5.head``, see ``network.ProDAClassifier``) and optionally
  ``bn_pretrain``; ProDA feeds RGB scaled to 0..1 without mean subtraction.

Every key that is not loaded into the model is named in the returned report: nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CheckpointError
from .labels import CLASS_NAMES, SYNTHIA_13, SYNTHIA_16
from .network import CAFFE_BGR, IMAGENET_RGB, DeepLabV2, deeplab_v2

FORMAT = "dass-checkpoint"
VERSION = 1
# ProDA divides RGB by 255 and subtracts nothing (its Cityscapes mean is zero).
PRODA_RGB: dict = {"color": "RGB", "mean": [0.0, 0.0, 0.0], "std": [255.0, 255.0, 255.0]}
# The input normalisation each ImageNet-init format was trained with (a model fine-tuned from it should keep it).
INIT_NORMALIZATION: dict[str, dict] = {"torchvision": IMAGENET_RGB, "deeplab-coco": CAFFE_BGR}
#: ``format`` in the metadata of backbone weights written by ``save_backbone_weights`` (safetensors).
BACKBONE_FORMAT = "dass-backbone"
SOURCES = ("auto", "dass", "adaptseg", "bida-authors", "proda")
_LAYER3_BLOCKS = {("bottleneck", 23): "resnet101", ("bottleneck", 6): "resnet50", ("basic", 2): "resnet18"}
_TARGET_STEM = ("target_conv1.", "target_bn1.", "target_layer1.")
_SOURCE_STEM = ("conv1.", "bn1.", "layer1.")

__all__ = [
    "BACKBONE_FORMAT",
    "FORMAT",
    "INIT_NORMALIZATION",
    "PRODA_RGB",
    "SOURCES",
    "checkpoint_meta_default",
    "default_class_names",
    "detect_layout",
    "file_sha256",
    "load_checkpoint",
    "load_init_weights",
    "load_backbone_weights",
    "load_model",
    "save_backbone_weights",
    "save_checkpoint",
]


# --------------------------------------------------------------------------------------------- saving / loading


def _check_plain(obj: Any, where: str = "payload") -> None:
    """Refuse values a ``weights_only`` load would reject, before anything is written."""
    # exact types: numpy scalars subclass float/int but a weights_only load refuses them
    if obj is None or type(obj) in (bool, int, float, str, bytes, torch.dtype, torch.Size, torch.device):
        return
    if isinstance(obj, Tensor):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__}; use str or int keys")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__name__}; a checkpoint holds tensors and plain Python "
        "values only (convert numpy values with .tolist() / torch.from_numpy)"
    )


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically: a crash or an error never leaves a partial or mixed file.

    The data goes to a temporary file in the same folder (same file system, so ``os.replace`` is atomic), is
    fsynced, then renamed over ``path``; on any error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    _check_plain(payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load(path, weights_only=True, map_location="cpu")`` with one-line ``CheckpointError``s.

    Returns the stored dict (a bare state_dict is returned as is).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a folder, expected a .pt/.pth file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint file is empty: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint file is truncated or corrupt (incomplete zip archive, {size} bytes): {path}")
    if not head.startswith(b"PK") and not head.startswith(b"\x80"):  # neither zip (torch>=1.6) nor legacy pickle
        raise CheckpointError(f"not a PyTorch checkpoint (neither a zip archive nor pickle data): {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "weights_only" in msg or "Weights only" in msg:
            found = re.search(r"GLOBAL ([\w.]+)", msg)
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"checkpoint contains pickled Python objects{what} that a safe load refuses: {path}; "
                "re-save it as a plain state_dict of tensors"
            ) from None
        raise CheckpointError(f"not a PyTorch checkpoint (unreadable pickle data): {path}") from None
    except (EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"checkpoint file is truncated or corrupt ({type(e).__name__}): {path}") from None
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint ({first}): {path}") from None
    except Exception as e:  # anything else torch raises on garbage input
        raise CheckpointError(f"not a PyTorch checkpoint ({type(e).__name__}: {e}): {path}") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, expected a dict: {path}")
    return dict(obj)


# --------------------------------------------------------------------------------------------- meta


def default_class_names(num_classes: int) -> list[str]:
    """Cityscapes names for the 19 / 16 (SYNTHIA) / 13 class settings, generic names otherwise."""
    if num_classes == 19:
        return list(CLASS_NAMES)
    if num_classes == 16:
        return [CLASS_NAMES[i] for i in SYNTHIA_16]
    if num_classes == 13:
        return [CLASS_NAMES[i] for i in SYNTHIA_13]
    return [f"class_{i}" for i in range(num_classes)]


def checkpoint_meta_default(
    num_classes: int = 19,
    backbone: str = "resnet101",
    feature: str = "aspp",
    normalization: Mapping | None = None,
    class_names: list[str] | None = None,
    stage: str = "external",
    iteration: int = 0,
    config: Mapping | None = None,
    metrics: Mapping | None = None,
    align_corners: bool = False,
    **extra: Any,
) -> dict:
    """Build a ``MODEL_META`` dict (plain values only); ``extra`` adds keys such as ``head`` or ``source``.

    ``align_corners`` is how the network's logits were upsampled to the input size in training and evaluation
    (bilinear); the export graph and the torch backend must upsample the same way to reproduce its predictions.
    """
    meta = {
        "num_classes": int(num_classes),
        "backbone": backbone,
        "feature": feature,
        "normalization": dict(normalization or CAFFE_BGR),
        "upsampling": {"mode": "bilinear", "align_corners": bool(align_corners)},
        "class_names": list(class_names or default_class_names(num_classes)),
        "stage": stage,
        "iteration": int(iteration),
    }
    if config is not None:
        meta["config"] = dict(config)
    if metrics is not None:
        meta["metrics"] = dict(metrics)
    meta.update(extra)
    return meta


def upsampling_align_corners(meta: Mapping) -> bool:
    """``align_corners`` of the bilinear logit upsampling a checkpoint was trained with (False without the field,
    i.e. dass checkpoints written before it existed, which all used False)."""
    upsampling = meta.get("upsampling") if isinstance(meta, Mapping) else None
    return bool(upsampling.get("align_corners", False)) if isinstance(upsampling, Mapping) else False


#: The lineages of foreign checkpoints upsample logits with bilinear ``align_corners=True`` (docs/UPSAMPLING.md).
FOREIGN_ALIGN_CORNERS = {"adaptseg": True, "bida-authors": True, "proda": True}


# --------------------------------------------------------------------------------------------- layouts


def _strip_prefix(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return dict(sd)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def _unwrap(obj: Mapping, path: Path) -> tuple[str, dict[str, Tensor], dict | None, list[str]]:
    """-> (container kind, raw state_dict, meta or None, names of non-model entries)."""
    if obj.get("format") == FORMAT:
        if not _is_state_dict(obj.get("model")):
            raise CheckpointError(f"dass checkpoint without a 'model' state_dict: {path}")
        meta = obj.get("meta")
        return (
            "dass",
            dict(obj["model"]),
            dict(meta) if isinstance(meta, Mapping) else None,
            sorted(set(obj) - {"model"}),
        )
    # ProDA: {<net class name>: {"model_state": sd, "objective_vectors": ...}, "iter": int, "best_iou": float}
    for name in ("ResNet101", *sorted(k for k in obj if k != "ResNet101")):
        entry = obj.get(name)
        if isinstance(entry, Mapping) and _is_state_dict(entry.get("model_state")):
            others = [f"{name}.{k}" for k in sorted(entry) if k != "model_state"]
            others += sorted(k for k in obj if k != name)
            return "proda", dict(entry["model_state"]), None, others
    for key in ("state_dict", "model_state_dict", "model", "net"):
        if _is_state_dict(obj.get(key)):
            return "wrapped", dict(obj[key]), None, sorted(k for k in obj if k != key)
    if _is_state_dict(obj):
        return "bare", dict(obj), None, []
    raise CheckpointError(f"unknown checkpoint structure: top-level keys are {_preview(obj)}: {path}")


def _preview(keys: Any, n: int = 6) -> str:
    keys = list(keys)
    return ", ".join(map(str, keys[:n])) + (f", … ({len(keys)} in all)" if len(keys) > n else "")


def detect_layout(sd: Mapping[str, Tensor]) -> str | None:
    """Layout of a prefix-stripped state_dict: 'bida-authors' | 'proda' | 'adaptseg' | None (unknown)."""
    if "conv1.weight" not in sd or "layer4.0.conv1.weight" not in sd:
        return None
    if any(k.startswith("target_conv1.") for k in sd):
        return "bida-authors"
    if "layer5.head.1.weight" in sd:
        return "proda"
    if "layer5.conv2d_list.0.weight" in sd:
        return "adaptseg"
    return None


def _infer_backbone(sd: Mapping[str, Tensor]) -> str | None:
    kind = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"layer3\.(\d+)\.", k))}
    return _LAYER3_BLOCKS.get((kind, max(blocks) + 1 if blocks else 0))


def _num_classes(sd: Mapping[str, Tensor]) -> int:
    w = sd.get("layer5.conv2d_list.0.weight")
    if w is None:
        w = sd["layer5.head.1.weight"]
    return int(w.shape[0])


def _select_stem(sd: dict[str, Tensor], stem: str, report: list[str]) -> dict[str, Tensor]:
    """Authors' layout: keep one of the two stems under the names conv1/bn1/layer1; report the other + layer6."""
    out: dict[str, Tensor] = {}
    dropped_stem, dropped_l6 = [], []
    for k, v in sd.items():
        if k.startswith("layer6."):
            dropped_l6.append(k)
        elif k.startswith(_TARGET_STEM):
            if stem == "target":
                out[k[len("target_") :]] = v
            else:
                dropped_stem.append(k)
        elif k.startswith(_SOURCE_STEM) and stem == "target":
            dropped_stem.append(k)
        else:
            out[k] = v
    other = "source" if stem == "target" else "target"
    report.append(f"stem: {stem} (conv1/bn1/layer1 from the authors' {stem}-image stem)")
    if dropped_stem:
        report.append(f"left out the {other} stem: {len(dropped_stem)} tensors ({_preview(dropped_stem, 3)})")
    if dropped_l6:
        report.append(f"left out layer6 (the authors' unused second classifier): {len(dropped_l6)} tensors")
    return out


def _fill_num_batches_tracked(sd: dict[str, Tensor], model: nn.Module, report: list[str]) -> None:
    """Checkpoints from torch < 0.4.1 have no BatchNorm ``num_batches_tracked``; add the model's zeros."""
    filled = 0
    for k, v in model.state_dict().items():
        if k.endswith(".num_batches_tracked") and k not in sd and k.rsplit(".", 1)[0] + ".running_mean" in sd:
            sd[k] = v.clone()
            filled += 1
    if filled:
        report.append(f"added {filled} missing BatchNorm num_batches_tracked buffers (file predates torch 0.4.1)")


def _load_strict(model: nn.Module, sd: Mapping[str, Tensor], path: Path) -> None:
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({_preview(missing, 3)})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({_preview(unexpected, 3)})")
        raise CheckpointError(f"checkpoint does not match the network: {'; '.join(parts)}: {path}")
    own = model.state_dict()
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f"checkpoint tensor shapes do not match the network ({_preview(bad, 2)}): {path}")
    model.load_state_dict(sd, strict=True)


def load_model(
    path: str | os.PathLike,
    source: str = "auto",
    stem: str | None = None,
    backbone: str | None = None,
    num_classes: int | None = None,
    feature: str | None = None,
    freeze_bn: bool = True,
    aspp_summed_branches: int | None = None,
) -> tuple[DeepLabV2, dict, list[str]]:
    """Build the network a checkpoint describes and load it with ``strict=True``; returns (model in eval mode,
    meta, report lines).

    ``source`` forces a layout ('dass' | 'adaptseg' | 'bida-authors' | 'proda'; 'auto' detects it from the keys).
    ``stem`` only matters for the authors' two-stem layout: None means 'target'. ``backbone``/``num_classes``,
    when given, must agree with the file. ``feature`` defaults to the meta's (dass) or 'aspp'.
    """
    path = Path(path)
    if source not in SOURCES:
        raise CheckpointError(f"unknown checkpoint source {source!r}; choose one of {', '.join(SOURCES)}")
    if stem not in (None, "source", "target"):
        raise CheckpointError(f"unknown stem {stem!r}; choose 'source' or 'target'")
    obj = load_checkpoint(path)
    container, sd, meta, others = _unwrap(obj, path)
    for prefix in ("_orig_mod.", "module.", "Scale."):
        sd = _strip_prefix(sd, prefix)
    layout = "dass" if container == "dass" else detect_layout(sd)
    if layout is None or (layout == "dass" and detect_layout(sd) is None):
        raise CheckpointError(f"unknown key layout: first keys are {_preview(sd)}: {path}")
    if container == "proda" and layout == "adaptseg":
        layout = "proda"  # a ProDA file holding the plain DeepLab-V2 classifier
    if source != "auto" and source != layout and not (source == "adaptseg" and layout == "bida-authors"):
        raise CheckpointError(f"checkpoint looks like the {layout!r} layout, not {source!r}: {path}")

    report = [f"layout: {layout} ({container} container)"]
    if detect_layout(sd) == "bida-authors":
        sd = _select_stem(sd, stem or "target", report)
    elif stem == "target":
        raise CheckpointError(
            f"stem='target' needs the authors' two-stem layout (target_conv1 …), not {layout}: {path}"
        )

    found_backbone = _infer_backbone(sd)
    if found_backbone is None:
        raise CheckpointError(f"unknown backbone: layer3 blocks do not match ResNet-18/50/101: {path}")
    found_classes = _num_classes(sd)
    if backbone is not None and backbone != found_backbone:
        raise CheckpointError(f"checkpoint has a {found_backbone} backbone, expected {backbone}: {path}")
    if num_classes is not None and num_classes != found_classes:
        raise CheckpointError(f"checkpoint has {found_classes} classes, expected {num_classes}: {path}")
    head = "proda" if "layer5.head.1.weight" in sd else "aspp"
    meta = dict(meta or {})
    if meta.get("num_classes") not in (None, found_classes):
        raise CheckpointError(
            f"checkpoint meta says {meta['num_classes']} classes, weights have {found_classes}: {path}"
        )
    feature = feature or meta.get("feature") or "aspp"
    if aspp_summed_branches is None:
        aspp_summed_branches = meta.get("aspp_summed_branches")
    model = deeplab_v2(
        found_classes,
        found_backbone,
        feature,
        freeze_bn=freeze_bn,
        head=head,
        pre_head_bn="bn_pretrain.weight" in sd,
        aspp_summed_branches=aspp_summed_branches,
    )
    _fill_num_batches_tracked(sd, model, report)
    _load_strict(model, sd, path)
    model.eval()

    if layout != "dass":
        norm = PRODA_RGB if layout == "proda" else CAFFE_BGR
        meta = checkpoint_meta_default(
            found_classes, found_backbone, feature, norm, source=layout, head=head,
            align_corners=FOREIGN_ALIGN_CORNERS[layout],
        )  # fmt: skip
    meta.setdefault("normalization", dict(CAFFE_BGR))
    meta.setdefault("class_names", default_class_names(found_classes))
    meta.update(num_classes=found_classes, backbone=found_backbone, feature=feature, head=head)
    report.append(f"network: DeepLab-V2 {found_backbone}, {found_classes} classes, {head} head, feature {feature}")
    report.append(f"logit upsampling: bilinear, align_corners={upsampling_align_corners(meta)}")
    if others:
        report.append(f"entries not part of the network, not loaded: {_preview(others, 8)}")
    if layout == "adaptseg" and model.layer5.summed_branches == 4:
        report.append("ASPP sums all 4 branches (AdaptSegNet's released code summed only 2; see aspp_summed_branches)")
    return model, meta, report


# --------------------------------------------------------------------------------------------- ImageNet init


def load_init_weights(model: DeepLabV2, path: str | os.PathLike) -> list[str]:
    """Load ImageNet (or DeepLab COCO) backbone weights into ``model``; the classifier keeps its N(0, 0.01) init.

    Accepted: torchvision's ResNet ``state_dict`` (``fc.*`` left out) and DeepLab's
    ``DeepLab_resnet_pretrained_init-f81d91e8.pth`` (``Scale.`` prefix, a ``layer5`` of another class count,
    left out). torchvision's ResNet is "v1.5" (stride on the 3x3 conv) while this network is Caffe style (stride on
    the first 1x1); the tensor shapes are the same and the AdaptSegNet lineage loads them as they are, so do we.
    Returns report lines.
    """
    path = Path(path)
    shipped = Path(__file__).resolve().parents[1] / path  # a relative init that ships in the repository (weights/)
    if not path.is_file() and not path.is_absolute() and shipped.is_file():
        path = shipped
    if not path.is_file():
        if path.suffix == ".safetensors":
            raise CheckpointError(
                f"backbone weights not found at {path}: they ship with the repository (git checkout them) or are "
                "made by `python benchmarks/pretrain_backbone.py`; or pass model.init=PATH"
            )
        raise CheckpointError(
            f"ImageNet weights not found at {path}: download the {model.backbone} ImageNet weights (torchvision "
            "format) or DeepLab_resnet_pretrained_init-f81d91e8.pth and put them there, or pass --model.init PATH"
        )
    if path.suffix == ".safetensors":
        sd, info = load_backbone_weights(path)
        others: list[str] = []
        fmt = info.get("format", "safetensors")
        norm = info.get("normalization") or IMAGENET_RGB
    else:
        obj = load_checkpoint(path)
        _, sd, _, others = _unwrap(obj, path)
        fmt = "torchvision"
        if sd and all(k.startswith("Scale.") for k in sd):
            fmt = "deeplab-coco"
        norm = INIT_NORMALIZATION[fmt]
    for prefix in ("_orig_mod.", "module.", "Scale."):
        sd = _strip_prefix(sd, prefix)
    if "conv1.weight" not in sd or not any(k.startswith("layer4.") for k in sd):
        raise CheckpointError(f"not ResNet weights: first keys are {_preview(sd)}: {path}")
    report = [f"init: {fmt} ResNet weights from {path.name} (trained with {norm['color']} mean {norm['mean']})"]
    if others:
        report.append(f"entries not part of the network, not loaded: {_preview(others, 8)}")

    target = model.state_dict()
    backbone_keys = [k for k in target if not k.startswith(("layer5.", "bn_pretrain."))]
    found = dict(sd)
    _fill_num_batches_tracked(found, model, report)
    missing = [k for k in backbone_keys if k not in found]
    if missing:
        raise CheckpointError(
            f"init weights do not fit the {model.backbone} backbone: missing {len(missing)} keys "
            f"({_preview(missing, 3)}): {path}"
        )
    bad = [k for k in backbone_keys if found[k].shape != target[k].shape]
    if bad:
        raise CheckpointError(
            f"init weights do not fit the {model.backbone} backbone: shape of {bad[0]} is "
            f"{tuple(found[bad[0]].shape)}, expected {tuple(target[bad[0]].shape)}: {path}"
        )
    unused = sorted(set(found) - set(backbone_keys))
    if unused:
        groups = sorted({k.split(".")[0] for k in unused})
        report.append(f"left out {len(unused)} tensors not used for init ({', '.join(groups)})")
    target.update({k: found[k] for k in backbone_keys})
    model.load_state_dict(target, strict=True)
    return report


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (model cards and meta.json record what they describe)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_backbone_weights(path: str | os.PathLike, model: DeepLabV2, info: Mapping[str, Any]) -> Path:
    """The backbone of ``model`` (no classifier: an init's head is relearned, as with ImageNet weights) as
    safetensors, atomically: convolution weights in float16 (half the size; an init, not a result), BatchNorm
    parameters and statistics in float32. ``info`` (JSON-able: data, command, iterations, ...) goes in the metadata
    beside ``format``, ``backbone`` and the input ``normalization``, so the file describes itself."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    tensors = {}
    for key, value in model.state_dict().items():
        if key.startswith(("layer5.", "bn_pretrain.")):
            continue
        value = value.detach().cpu()
        tensors[key] = value.half() if value.ndim == 4 else value.contiguous()
    meta = {"format": BACKBONE_FORMAT, "backbone": model.backbone, **info}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in meta.items()})
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def load_backbone_weights(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state_dict in float32, metadata) of a file written by ``save_backbone_weights``; safetensors executes no
    code. Errors are one line naming the file."""
    import json

    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"not a readable safetensors file ({exc}): {path}") from None
    try:
        info = {k: json.loads(v) for k, v in raw.items()}
    except ValueError:
        info = dict(raw)
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, info
