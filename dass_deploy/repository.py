"""Triton-style model repository: ``models/<name>/{config.pbtxt, meta.json, 1/model.onnx, 1/model.plan}``.

Torch-free: the runtimes, the segmentation CLI and the demo read models through this module only. The layout
follows the Triton Inference Server model repository, so an exported folder can be served by Triton as is.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dass_deploy.errors import DeployError
from dass_deploy.meta_schema import validate_meta

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO_ROOT / "models"
VERSION = "1"  # the one Triton model version we write
ONNX_FILE = "model.onnx"
PLAN_FILE = "model.plan"

#: A model name is a folder name and a quoted string in config.pbtxt: letters, digits, ``_ . -``, no leading dot.
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

#: numpy dtype name -> Triton ``data_type``.
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "uint8": "TYPE_UINT8", "int64": "TYPE_INT64"}


@dataclass
class ModelInfo:
    """An exported model folder, read back: what a backend needs to run it and a UI needs to show it."""

    path: Path
    name: str
    meta: dict
    onnx_path: Path | None
    plan_path: Path | None
    input_size: tuple[int, int]  # (height, width) the model was exported (and calibrated) for
    dynamic: bool
    output_kind: str  # "labels" (uint8 [N,H,W]) or "logits" (float32 [N,K,H,W])
    class_names: list[str]
    palette: np.ndarray = field(repr=False)  # [K,3] uint8 RGB
    num_classes: int = 0


def load_model_dir(path: str | os.PathLike) -> ModelInfo:
    """Read ``models/<name>/`` -> ``ModelInfo``; ``DeployError`` naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise DeployError(f"model folder not found: {path}")
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise DeployError(f"{path} is not an exported model: meta.json is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeployError(f"{meta_path}: not valid JSON ({e})") from None
    except OSError as e:
        raise DeployError(f"{meta_path}: cannot read ({e.strerror or e})") from None
    validate_meta(meta, meta_path)
    onnx_path, plan_path = path / VERSION / ONNX_FILE, path / VERSION / PLAN_FILE
    onnx_path = onnx_path if onnx_path.is_file() else None
    plan_path = plan_path if plan_path.is_file() else None
    if onnx_path is None and plan_path is None:
        raise DeployError(f"{path}: no model file ({VERSION}/{ONNX_FILE} or {VERSION}/{PLAN_FILE})")
    palette = np.asarray(meta["palette"], dtype=np.uint8).reshape(-1, 3)
    return ModelInfo(
        path=path,
        name=meta.get("name", path.name),
        meta=meta,
        onnx_path=onnx_path,
        plan_path=plan_path,
        input_size=(int(meta["input"]["height"]), int(meta["input"]["width"])),
        dynamic=bool(meta["input"].get("dynamic", False)),
        output_kind=meta.get("output", {}).get("kind", "labels"),
        class_names=list(meta["class_names"]),
        palette=palette,
        num_classes=int(meta["num_classes"]),
    )


def list_models(root: str | os.PathLike = MODELS_DIR) -> list[ModelInfo]:
    """Every loadable model folder under ``root``, sorted by name.

    A folder with a broken ``meta.json`` or no model file is skipped with a one-line warning on stderr, so one bad
    folder never keeps the demo (or a listing) from using the good ones; hidden folders (half-written exports) and
    folders without ``meta.json`` are skipped silently."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith(".") and (child / "meta.json").is_file():
            try:
                found.append(load_model_dir(child))
            except DeployError as exc:
                print(f"warning: skipped model folder {child.name}: {exc}", file=sys.stderr)
    return found


def default_model_dir(root: str | os.PathLike = MODELS_DIR) -> Path:
    """``$DASS_MODEL`` if set, else ``<root>/<name>`` where ``name`` is the one line of ``<root>/DEFAULT``."""
    env = os.environ.get("DASS_MODEL")
    if env:
        return Path(env).expanduser()
    root = Path(root)
    default_file = root / "DEFAULT"
    if not default_file.is_file():
        raise DeployError(f"no default model: {default_file} not found (set DASS_MODEL or pass a model folder)")
    name = default_file.read_text().strip()
    if not name or "/" in name or name.startswith("."):
        raise DeployError(f"{default_file}: expected one line with a model folder name, found {name!r}")
    return root / name


class ModelRepository:
    """A folder of exported models (``models/``): list them, open one by name, find the default."""

    def __init__(self, path: str | os.PathLike = MODELS_DIR) -> None:
        self.path = Path(path)

    def list(self) -> list[ModelInfo]:
        return list_models(self.path)

    def get(self, name: str) -> ModelInfo:
        return load_model_dir(self.path / name)

    def default(self) -> ModelInfo:
        env = os.environ.get("DASS_MODEL")
        return load_model_dir(Path(env) if env else default_model_dir(self.path))


def check_model_name(name: str) -> str:
    """Return ``name`` if Triton and a file system both take it as a model name; else a one-line ``DeployError``.

    The name goes between quotes in ``config.pbtxt``: a quote or a backslash would break the file, a slash or a
    leading dot the repository layout."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise DeployError(
            f"model name {name!r}: use letters, digits, '_', '.' and '-' only (at most 128, no leading dot or '-')"
        )
    return name


def _dims(values: Sequence[int]) -> str:
    return "[ " + ", ".join(str(int(v)) for v in values) + " ]"


def write_triton_config(
    path: str | os.PathLike,
    name: str,
    platform: str,
    input_dims: Sequence[int],
    output_name: str,
    output_dtype: str,
    output_dims: Sequence[int],
    max_batch_size: int,
    input_name: str = "image",
    input_dtype: str = "float32",
    default_model_filename: str | None = None,
) -> Path:
    """Write a Triton ``config.pbtxt`` (protobuf text format of ``ModelConfig``).

    With ``max_batch_size > 0`` Triton adds the batch dimension itself, so ``input_dims`` / ``output_dims`` leave
    it out; with ``max_batch_size == 0`` they are the full shapes. ``-1`` marks a variable dimension.
    """
    check_model_name(name)
    if platform not in ("onnxruntime_onnx", "tensorrt_plan"):
        raise ValueError(f"unsupported Triton platform {platform!r}")
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {int(max_batch_size)}"]
    if default_model_filename:
        lines.append(f'default_model_filename: "{default_model_filename}"')
    lines += [
        "input [",
        "  {",
        f'    name: "{input_name}"',
        f"    data_type: {TRITON_TYPES[input_dtype]}",
        f"    dims: {_dims(input_dims)}",
        "  }",
        "]",
        "output [",
        "  {",
        f'    name: "{output_name}"',
        f"    data_type: {TRITON_TYPES[output_dtype]}",
        f"    dims: {_dims(output_dims)}",
        "  }",
        "]",
    ]
    if max_batch_size > 0:
        lines.append("dynamic_batching { }")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


_FIELD = re.compile(r"^\s*(\w+)\s*:\s*(.+?)\s*$")


def read_triton_config(path: str | os.PathLike) -> dict:
    """Parse the subset of ``config.pbtxt`` that ``write_triton_config`` writes back into a dict (inputs and
    outputs as lists of dicts, dims as lists of int); enough to check a config, not a full protobuf parser."""
    config: dict = {"input": [], "output": []}
    section: list | None = None
    entry: dict | None = None
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if line in ("input [", "output ["):
            section = config[line.split()[0]]
        elif line == "{" and section is not None:
            entry = {}
        elif line == "}" and entry is not None:
            section.append(entry)
            entry = None
        elif line == "]" and entry is None:
            section = None
        elif match := _FIELD.match(line):
            key, value = match.groups()
            if value.startswith("["):
                parsed: object = [int(v) for v in value.strip("[] ").split(",") if v.strip()]
            elif value.startswith('"'):
                parsed = value.strip('"')
            elif re.fullmatch(r"-?\d+", value):
                parsed = int(value)
            else:
                parsed = value
            (entry if entry is not None else config)[key] = parsed
        elif line.endswith("{ }"):
            config[line.split()[0]] = {}
    return config
