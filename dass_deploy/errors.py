"""The one user-facing error type of the runtime side; torch-free so ONNX / TensorRT users never import torch."""


class DeployError(Exception):
    """A mistake the user can fix (missing model folder, bad option, missing optional package); one line, names
    the file or option. The CLIs print ``error: <message>`` and exit 2 instead of showing a traceback."""
