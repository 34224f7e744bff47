"""Triton-style model repository: ``models/<name>/{config.pbtxt, meta.json, 1/model.onnx, 1/model.plan}``.

Torch-free: the runtimes, the segmentation CLI and the demo read models through this module only. The layout
follows the Triton Inference Server model repository, so an exported folder can be served by Triton as is.

Where models are looked up (``model_roots``), in this order:

1. the user's models folder: ``$DASS_MODELS`` if set, else ``./models`` (where ``dass-export`` writes);
2. the bundled models: in an installed wheel, ``dass_deploy/bundled/`` (package data: ``models/DEFAULT`` and the
   model it names, copied from the clone by the build, see pyproject.toml); in a clone or an editable install,
   the clone's own ``models/``.

The default model is ``$DASS_MODEL`` (a folder or a model name), else the model named by the ``DEFAULT`` file of the
first of those folders that has one.
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

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
#: The models a wheel carries (package data; absent in a clone, whose models/ plays this part).
BUNDLED_DIR = PACKAGE_DIR / "bundled"
#: Environment variables: the user's models folder, and the default model (a folder or a name).
MODELS_ENV, MODEL_ENV = "DASS_MODELS", "DASS_MODEL"
DEFAULT_FILE = "DEFAULT"
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


def user_models_dir() -> Path:
    """The user's models folder: ``$DASS_MODELS`` if set, else ``./models`` (relative to the working folder)."""
    return Path(os.environ.get(MODELS_ENV) or "models").expanduser()


def bundled_models_dir() -> Path:
    """The models that travel with the package: package data in an installed wheel, the clone's ``models/`` in a
    clone or an editable install (the folder the wheel's copy is taken from)."""
    return BUNDLED_DIR if BUNDLED_DIR.is_dir() else REPO_ROOT / "models"


def model_roots() -> list[Path]:
    """Where model names are looked up, in order: the user's models folder, then the bundled models (once, when
    both are the same folder, as when a clone runs from its root)."""
    roots: list[Path] = []
    for root in (user_models_dir(), bundled_models_dir()):
        if not any(_same_folder(root, seen) for seen in roots):
            roots.append(root)
    return roots


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _roots(roots: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    if roots is None:
        return model_roots()
    if isinstance(roots, str | os.PathLike):
        return [Path(roots)]
    return [Path(root) for root in roots]


def find_model(name_or_path: str | os.PathLike, roots: Sequence[str | os.PathLike] | None = None) -> Path:
    """A model folder given as a path, or by name in ``roots`` (default ``model_roots()``), first match wins.

    A one-line ``DeployError`` names the folders searched when neither is found."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    searched = _roots(roots)
    if text and os.sep not in text and "/" not in text and not text.startswith("."):
        for root in searched:
            if (root / text).is_dir():
                return root / text
        where = " or ".join(str(root) for root in searched)
        raise DeployError(f"model {text!r} not found: no such folder, and no model of that name in {where}")
    raise DeployError(f"model folder not found: {path}")


def list_models(roots: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> list[ModelInfo]:
    """Every loadable model folder under ``roots`` (one folder, several, or ``model_roots()``), sorted by name; a
    name found in several folders is taken from the first.

    A folder with a broken ``meta.json`` or no model file is skipped with a one-line warning on stderr, so one bad
    folder never keeps the demo (or a listing) from using the good ones; hidden folders (half-written exports) and
    folders without ``meta.json`` are skipped silently."""
    found: dict[str, ModelInfo] = {}
    for root in _roots(roots):
        if not root.is_dir():
            continue
        for child in sorted(root.iterdir()):
            if child.name in found or child.name.startswith(".") or not (child / "meta.json").is_file():
                continue
            if child.is_dir():
                try:
                    found[child.name] = load_model_dir(child)
                except DeployError as exc:
                    print(f"warning: skipped model folder {child.name}: {exc}", file=sys.stderr)
    return [found[name] for name in sorted(found)]


def default_model_dir(roots: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> Path:
    """``$DASS_MODEL`` if set (a folder, or a model name looked up in ``roots``), else the model named by the one
    line of ``DEFAULT`` in the first of ``roots`` (one folder, several, or ``model_roots()``) that has that file;
    the name is looked up in that folder first, then in the others."""
    searched = _roots(roots)
    env = os.environ.get(MODEL_ENV)
    if env:
        return find_model(env, searched)
    for root in searched:
        default_file = root / DEFAULT_FILE
        if not default_file.is_file():
            continue
        name = default_file.read_text().strip()
        if not name or "/" in name or name.startswith("."):
            raise DeployError(f"{default_file}: expected one line with a model folder name, found {name!r}")
        for candidate in [root, *searched]:
            if (candidate / name).is_dir():
                return candidate / name
        return root / name  # loading it names the missing folder
    where = " or ".join(str(root / DEFAULT_FILE) for root in searched)
    raise DeployError(f"no default model: {where} not found (set {MODEL_ENV} or pass a model folder)")


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
