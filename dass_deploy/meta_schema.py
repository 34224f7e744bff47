"""The schema of an exported model's ``meta.json``: the fields the runtimes and the demo read, checked up front.

A hand-edited or foreign ``meta.json`` would otherwise fail deep inside a backend with a ``KeyError`` traceback.
``validate_meta`` turns the first problem into one line naming the file and the dotted field (``input.height``).
Only the fields something reads are checked; anything else in the file is left alone. No dependency beyond the
standard library: the runtime side must stay light.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dass_deploy.errors import DeployError

Check = Callable[[Any], str | None]  # returns what is wrong, or None


def _positive_int(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return f"must be a positive integer, got {value!r}"
    return None


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) and value else f"must be a non-empty string, got {value!r}"


def _one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}, got {value!r}"

    return check


def _string_list(value: Any) -> str | None:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        return "must be a non-empty list of strings"
    return None


def _palette(value: Any) -> str | None:
    ok = isinstance(value, list) and value
    ok = ok and all(
        isinstance(rgb, list)
        and len(rgb) == 3
        and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in rgb)
        for rgb in value
    )
    return None if ok else "must be a list of [r, g, b] triples of integers 0..255"


#: dotted field -> (required, check). Optional fields are checked only when present.
FIELDS: dict[str, tuple[bool, Check]] = {
    "num_classes": (True, _positive_int),
    "class_names": (True, _string_list),
    "palette": (True, _palette),
    "input": (True, lambda v: None if isinstance(v, dict) else "must be an object"),
    "input.height": (True, _positive_int),
    "input.width": (True, _positive_int),
    "input.dynamic": (False, _bool),
    "name": (False, _string),
    "output": (False, lambda v: None if isinstance(v, dict) else "must be an object"),
    "output.kind": (False, _one_of("labels", "logits")),
    # --adapt-bn (dass_deploy.adapt_bn): the torch backend and the benchmark refuse to run such a model from its
    # source checkpoint, whose statistics are the unadapted ones; the model card reads the counts
    "adapt_bn": (False, lambda v: None if v is None or isinstance(v, dict) else "must be an object or null"),
    "adapt_bn.frames": (False, _positive_int),
    "adapt_bn.layers": (False, _positive_int),
    "adapt_bn.passes": (False, _positive_int),
    "adapt_bn.warnings": (False, lambda v: None if v == [] else _string_list(v)),  # what the CLI warned
}

_MISSING = object()


def _lookup(meta: dict, dotted: str) -> Any:
    value: Any = meta
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def validate_meta(meta: Any, path: str | os.PathLike = "meta.json") -> dict:
    """Return ``meta`` if it has every field the runtime reads, with the right types; else a one-line
    ``DeployError`` naming ``path`` and the first bad field."""
    path = Path(path)
    if not isinstance(meta, dict):
        raise DeployError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for dotted, (required, check) in FIELDS.items():
        value = _lookup(meta, dotted)
        if value is _MISSING:
            parent = dotted.rpartition(".")[0]
            if required and (not parent or isinstance(_lookup(meta, parent), dict)):
                raise DeployError(f"{path}: field '{dotted}' is missing")
            continue
        problem = check(value)
        if problem:
            raise DeployError(f"{path}: field '{dotted}' {problem}")
    k = meta["num_classes"]
    if len(meta["class_names"]) != k:
        raise DeployError(f"{path}: field 'class_names' has {len(meta['class_names'])} names for num_classes {k}")
    if len(meta["palette"]) < k:
        raise DeployError(f"{path}: field 'palette' has {len(meta['palette'])} colours for num_classes {k}")
    return meta
