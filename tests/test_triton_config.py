"""config.pbtxt against Triton's own schema: parsed with ``tritonclient``'s ``ModelConfig`` protobuf, not a regex.

``google.protobuf.text_format`` refuses unknown fields, wrong types and broken quoting, exactly as Triton's model
loader would; the parsed message is then checked against what the model folder promises (meta.json, the ONNX graph).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dass_deploy.errors import DeployError
from dass_deploy.repository import check_model_name, read_triton_config, write_triton_config

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="pip install 'dass[test]'")
text_format = pytest.importorskip("google.protobuf.text_format")


def parse(path: Path):
    """``config.pbtxt`` -> ``inference.ModelConfig``; raises ``ParseError`` on anything Triton would refuse."""
    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


CASES = {
    "fixed labels": dict(
        platform="onnxruntime_onnx",
        input_dims=[3, 128, 256],
        output_name="labels",
        output_dtype="uint8",
        output_dims=[128, 256],
        max_batch_size=8,
    ),
    "dynamic logits": dict(
        platform="onnxruntime_onnx",
        input_dims=[3, -1, -1],
        output_name="logits",
        output_dtype="float32",
        output_dims=[19, -1, -1],
        max_batch_size=8,
    ),
    "tensorrt fp16 io": dict(
        platform="tensorrt_plan",
        input_dims=[3, 64, 64],
        input_dtype="float16",
        output_name="labels",
        output_dtype="uint8",
        output_dims=[64, 64],
        max_batch_size=4,
        default_model_filename="model.plan",
    ),
    "no batching": dict(
        platform="onnxruntime_onnx",
        input_dims=[1, 3, 32, 32],
        output_name="labels",
        output_dtype="uint8",
        output_dims=[1, 32, 32],
        max_batch_size=0,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_written_config_parses_as_triton_model_config(tmp_path, case):
    kwargs = CASES[case]
    path = write_triton_config(tmp_path / "config.pbtxt", name="bida-r18_v1.0", **kwargs)
    config = parse(path)
    types = model_config_pb2.DataType
    assert config.name == "bida-r18_v1.0" and config.platform == kwargs["platform"]
    assert config.max_batch_size == kwargs["max_batch_size"]
    assert config.HasField("dynamic_batching") == (kwargs["max_batch_size"] > 0)
    (inp,) = config.input
    (out,) = config.output
    assert inp.name == "image" and list(inp.dims) == kwargs["input_dims"]
    assert inp.data_type == types.Value("TYPE_FP16" if kwargs.get("input_dtype") == "float16" else "TYPE_FP32")
    assert out.name == kwargs["output_name"] and list(out.dims) == kwargs["output_dims"]
    assert out.data_type == types.Value({"uint8": "TYPE_UINT8", "float32": "TYPE_FP32"}[kwargs["output_dtype"]])
    assert config.default_model_filename == kwargs.get("default_model_filename", "")
    # the repository's own light reader agrees with protobuf
    light = read_triton_config(path)
    assert light["name"] == config.name and light["input"][0]["dims"] == list(inp.dims)


def test_exported_model_config_matches_meta_and_graph(model_dir):
    """The config of a real export: Triton's parser takes it, and it promises what the ONNX graph and meta.json do."""
    import json

    import onnx

    config = parse(model_dir / "config.pbtxt")
    meta = json.loads((model_dir / "meta.json").read_text())
    graph = onnx.load(str(model_dir / "1" / "model.onnx"), load_external_data=False).graph
    assert config.name == model_dir.name == meta["name"]

    def shape(value_info) -> list[int]:
        return [d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim]

    (inp,) = config.input
    (out,) = config.output
    assert inp.name == graph.input[0].name == meta["input"]["name"]
    assert out.name == graph.output[0].name == meta["output"]["name"]
    # Triton adds the batch dimension: the graph's first axis is the dynamic batch
    assert shape(graph.input[0])[0] == -1 and list(inp.dims) == shape(graph.input[0])[1:]
    assert list(inp.dims) == [3, meta["input"]["height"], meta["input"]["width"]]
    # the graph's output shape is symbolic: run it on a batch of 2 to see what Triton would receive
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.zeros((2, *inp.dims), np.float32)
    (labels,) = session.run([out.name], {inp.name: x})
    assert list(labels.shape) == [2, *out.dims] and labels.dtype == np.uint8
    assert out.data_type == model_config_pb2.DataType.Value("TYPE_UINT8")
    assert config.max_batch_size == meta["export"]["max_batch_size"] > 0


@pytest.mark.parametrize("name", ['my"model', "a/b", ".hidden", "back\\slash", "with space", "", "x" * 129, "-lead"])
def test_model_names_triton_cannot_take_are_refused(tmp_path, name):
    with pytest.raises(DeployError, match="model name") as info:
        write_triton_config(tmp_path / "config.pbtxt", name=name, **CASES["fixed labels"])
    assert "\n" not in str(info.value)
    assert not (tmp_path / "config.pbtxt").exists()


@pytest.mark.parametrize("name", ["bida-r18", "synth2real_bida.r18", "A1", "x" * 128])
def test_good_model_names_round_trip(tmp_path, name):
    assert check_model_name(name) == name
    path = write_triton_config(tmp_path / "config.pbtxt", name=name, **CASES["fixed labels"])
    assert parse(path).name == name


def test_tensorrt_profile_matches_config(tmp_path, checkpoint):
    """The TensorRT optimisation profile accepts exactly the shapes config.pbtxt promises: batch 1..max_batch_size,
    and each fixed spatial dim; a ``-1`` dim promises any size, which a finite profile cannot keep.

    Needs TensorRT and a CUDA GPU (skipped otherwise); reads the profile back from the built plan.
    """
    trt = pytest.importorskip("tensorrt", reason="needs the tensorrt package and a CUDA GPU")
    from dass_deploy.export import export_model

    with pytest.raises(DeployError, match="one input size"):  # a -1 dim would promise what no profile keeps
        export_model(checkpoint, out=tmp_path / "m", name="dyn", height=64, width=128, dynamic=True, trt=True)
    try:
        result = export_model(
            checkpoint, out=tmp_path / "m", name="trt", height=64, width=128, trt=True, parity_samples=1, progress=False
        )
    except DeployError as exc:
        pytest.skip(f"no TensorRT build here: {exc}")
    config = parse(result.model_dir / "config.pbtxt")
    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(
        (result.model_dir / "1" / "model.plan").read_bytes()
    )
    lo, _, hi = (list(s) for s in engine.get_tensor_profile_shape(config.input[0].name, 0))
    assert lo[0] == 1 and hi[0] == config.max_batch_size, (lo, hi, config.max_batch_size)
    for axis, dim in enumerate(config.input[0].dims, start=1):
        assert dim != -1 and lo[axis] == hi[axis] == dim, (axis, lo, hi, dim)


def test_trt_with_dynamic_sizes_is_refused_before_any_work(tmp_path, checkpoint):
    """A TensorRT plan takes one input size; config.pbtxt cannot state a profile's range, so --trt --dynamic is a
    one-line error (checked before TensorRT or a GPU is needed) and nothing is written."""
    from dass_deploy.export import export_model

    with pytest.raises(DeployError, match="one input size"):
        export_model(checkpoint, out=tmp_path / "m", name="dyn", height=64, width=128, dynamic=True, trt=True)
    assert not (tmp_path / "m").exists()
