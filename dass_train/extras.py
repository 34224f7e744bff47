"""Which extra of the ``dass`` distribution brings which import, and the one line a command prints without it.

``pip install dass`` is the runtime (ONNX Runtime, no torch); training, export, OpenVINO, INT8, TensorRT and the
web demo come with extras (pyproject.toml). A command started without its extra must say what to install, in one
line, instead of ending in an ``ImportError`` traceback. Torch-free and import-free: it only asks whether a module
could be imported.
"""

from __future__ import annotations

import importlib.util

#: extra -> the modules a command of that extra imports, each with the name a user knows it by.
EXTRAS: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (("torch", "PyTorch"), ("onnx", "ONNX"), ("yaml", "PyYAML")),
    "demo": (("gradio", "Gradio"),),
    "openvino": (("openvino", "OpenVINO"),),
    "int8": (("nncf", "NNCF"),),
    "gpu": (("tensorrt", "TensorRT"),),
}

#: What a command run without its extra exits with (1, like any run that could not do its work).
MISSING_EXTRA_EXIT = 1


def installed(module: str) -> bool:
    """Whether ``module`` can be imported here, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing, or the module was unloaded
        return False


def missing_extra(command: str, extra: str) -> str | None:
    """``None`` when ``extra`` is installed, else the line to print, e.g.
    ``dass-export needs PyTorch: pip install 'dass[train]'`` (naming the first module that is missing)."""
    for module, title in EXTRAS[extra]:
        if not installed(module):
            return f"{command} needs {title}: pip install 'dass[{extra}]'"
    return None
