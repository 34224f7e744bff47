"""TensorRT backend: deserialises ``1/model.plan`` and runs it with the TensorRT Python API (no torch).

Device buffers come from cuda-python (``cuda.bindings.runtime`` or the older ``cuda.cudart``) or, failing that,
PyCUDA. Every missing piece (package, GPU, plan file) is reported as a one-line ``DeployError``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dass_deploy.backends.base import check_batch, to_labels
from dass_deploy.errors import DeployError
from dass_deploy.repository import ModelInfo


def _cudart():
    """The CUDA runtime bindings of cuda-python, or None."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            return None
    return cudart


class _CudaRT:
    """Minimal device-memory helper over cuda-python's runtime API (calls return ``(err, value...)``)."""

    def __init__(self, cudart):
        self.rt = cudart
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or count == 0:
            raise DeployError("the tensorrt backend needs an NVIDIA GPU, and CUDA reports none")
        self.stream = self._ok(cudart.cudaStreamCreate())

    def _ok(self, result):
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise DeployError(f"CUDA error {err}")
        return values[0] if values else None

    def malloc(self, nbytes: int) -> int:
        return int(self._ok(self.rt.cudaMalloc(nbytes)))

    def free(self, ptr: int) -> None:
        self.rt.cudaFree(ptr)

    def h2d(self, ptr: int, array: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._ok(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, self.stream))

    def d2h(self, array: np.ndarray, ptr: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._ok(self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, self.stream))

    def sync(self) -> None:
        self._ok(self.rt.cudaStreamSynchronize(self.stream))

    @property
    def stream_handle(self) -> int:
        return int(self.stream)


class _PyCuda:
    """The same helper over PyCUDA."""

    def __init__(self):
        import pycuda.autoinit  # noqa: F401  (creates the context)
        import pycuda.driver as cuda

        self.cuda = cuda
        self.stream = cuda.Stream()
        self._allocs: dict[int, Any] = {}

    def malloc(self, nbytes: int) -> int:
        alloc = self.cuda.mem_alloc(nbytes)
        self._allocs[int(alloc)] = alloc
        return int(alloc)

    def free(self, ptr: int) -> None:
        self._allocs.pop(ptr).free()

    def h2d(self, ptr: int, array: np.ndarray) -> None:
        self.cuda.memcpy_htod_async(ptr, array, self.stream)

    def d2h(self, array: np.ndarray, ptr: int) -> None:
        self.cuda.memcpy_dtoh_async(array, ptr, self.stream)

    def sync(self) -> None:
        self.stream.synchronize()

    @property
    def stream_handle(self) -> int:
        return self.stream.handle


def _cuda_helper():
    cudart = _cudart()
    if cudart is not None:
        return _CudaRT(cudart)
    try:
        return _PyCuda()
    except ImportError:
        raise DeployError(
            "the tensorrt backend needs a CUDA buffer library: pip install cuda-python (or pycuda)"
        ) from None
    except Exception as exc:  # pycuda raises its own errors without a GPU
        raise DeployError(f"the tensorrt backend needs an NVIDIA GPU: {str(exc).splitlines()[0]}") from exc


class TensorRTBackend:
    """A deserialised TensorRT engine; device buffers are (re)allocated when the batch shape changes."""

    def __init__(self, info: ModelInfo, device: str = "cuda"):
        if device != "cuda":
            raise DeployError("the tensorrt backend runs on --device cuda only")
        if info.plan_path is None:
            raise DeployError(f"{info.path}: no TensorRT plan (1/model.plan); export one on a GPU machine")
        plan_path = info.plan_path
        try:
            import tensorrt as trt
        except ImportError:
            raise DeployError("the tensorrt backend needs the 'tensorrt' package (pip install 'dass[gpu]')") from None
        self.cuda = _cuda_helper()
        self.trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise DeployError(f"cannot deserialise {plan_path} (built for another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = [self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names]
        self._input = next(n for n, i in zip(names, is_input, strict=True) if i)
        self._output = next(n for n, i in zip(names, is_input, strict=True) if not i)
        self._out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self._output)))
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (pointer, bytes)
        self.meta: dict[str, Any] = info.meta
        self.name = "tensorrt"
        self.input_size, self.dynamic, self._kind = info.input_size, info.dynamic, info.output_kind

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self.cuda.free(ptr)
            ptr = self.cuda.malloc(nbytes)
            self._buffers[name] = (ptr, nbytes)
            self.context.set_tensor_address(name, ptr)
        return ptr

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """``float32 [N,3,H,W]`` RGB 0..255 -> ``uint8 [N,H,W]``."""
        batch = check_batch(batch)
        self.context.set_input_shape(self._input, batch.shape)
        out = np.empty(tuple(self.context.get_tensor_shape(self._output)), dtype=self._out_dtype)
        in_ptr = self._buffer(self._input, batch.nbytes)
        out_ptr = self._buffer(self._output, out.nbytes)
        self.cuda.h2d(in_ptr, batch)
        if not self.context.execute_async_v3(self.cuda.stream_handle):
            raise DeployError("TensorRT execution failed")
        self.cuda.d2h(out, out_ptr)
        self.cuda.sync()
        return to_labels(out, self._kind)

    def __del__(self):
        for ptr, _ in getattr(self, "_buffers", {}).values():
            try:
                self.cuda.free(ptr)
            except Exception:
                pass
