"""dass-export: real torch checkpoints -> real ONNX files -> real ONNX Runtime sessions (CPU), small sizes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dass_deploy import export as export_mod
from dass_deploy.cli_export import export_main
from dass_deploy.errors import DeployError
from dass_deploy.export import convert_to_fp16, export_model
from dass_deploy.repository import default_model_dir, list_models, load_model_dir, read_triton_config
from dass_train.checkpoint import save_checkpoint
from dass_train.errors import CheckpointError
from dass_train.labels import CLASS_NAMES, PALETTE
from dass_train.network import deeplab_v2

H, W = 32, 64
FAST = dict(progress=False, parity_samples=2)  # small and quick: the machine is shared
CAFFE = {"color": "BGR", "mean": [104.008, 116.669, 122.679], "std": [1.0, 1.0, 1.0]}


def _dass_checkpoint(path: Path, backbone: str = "resnet18", num_classes: int = 19, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = deeplab_v2(num_classes, backbone)
    meta = {
        "num_classes": num_classes,
        "backbone": backbone,
        "feature": "aspp",
        "normalization": CAFFE,
        "class_names": list(CLASS_NAMES)[:num_classes],
        "stage": "test",
        "iteration": 7,
        "metrics": {"miou": 12.5},
    }
    save_checkpoint(path, {"format": "dass-checkpoint", "version": 1, "model": model.state_dict(), "meta": meta})
    return path


def _run(model_path: Path, image: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": image})[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def ckpt(work) -> Path:
    return _dass_checkpoint(work / "bida_r18.pt")


@pytest.fixture(scope="module")
def authors_ckpt(work) -> Path:
    """The BiDA authors' layout: a second (target) stem and an unused layer6, as a bare state_dict."""
    torch.manual_seed(1)
    sd = deeplab_v2(19, "resnet18").state_dict()
    out = dict(sd)
    for key, value in sd.items():
        if key.startswith(("conv1.", "bn1.", "layer1.")):
            out["target_" + key] = value.clone() * (1.1 if value.is_floating_point() else 1)
        if key.startswith("layer5."):
            out["layer6." + key[len("layer5.") :]] = value.clone()
    path = work / "authors.pth"
    torch.save(out, path)
    return path


@pytest.fixture(scope="module")
def fp32_export(work, authors_ckpt):
    return export_model(authors_ckpt, out=work / "models", height=H, width=W, **FAST)


@pytest.fixture(scope="module")
def logits_dynamic_export(work):
    """AdaptSegNet layout (``module.`` prefix, wrapped in ``state_dict``) with logits output and dynamic axes."""
    torch.manual_seed(2)
    sd = {"module." + k: v for k, v in deeplab_v2(19, "resnet18").state_dict().items()}
    path = work / "adaptseg.pth"
    torch.save({"state_dict": sd, "iteration": 1000}, path)
    return export_model(path, out=work / "models", height=H, width=W, dynamic=True, output="logits", **FAST)


@pytest.fixture(scope="module")
def calib_dir(work) -> Path:
    folder = work / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        small = rng.integers(0, 256, size=(6, 12, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"img_{i}.png"), cv2.resize(small, (200, 100), interpolation=cv2.INTER_CUBIC))
    return folder


def test_fp32_labels_export_layout_config_meta(fp32_export, authors_ckpt):
    d = fp32_export.model_dir
    assert d.name == "authors-fp32"
    assert sorted(p.name for p in d.iterdir()) == ["1", "config.pbtxt", "meta.json"]
    cfg = read_triton_config(d / "config.pbtxt")
    assert cfg["name"] == "authors-fp32" and cfg["platform"] == "onnxruntime_onnx"
    assert cfg["max_batch_size"] == 8
    assert cfg["input"] == [{"name": "image", "data_type": "TYPE_FP32", "dims": [3, H, W]}]
    assert cfg["output"] == [{"name": "labels", "data_type": "TYPE_UINT8", "dims": [H, W]}]

    meta = json.loads((d / "meta.json").read_text())
    assert meta == fp32_export.meta
    assert meta["num_classes"] == 19 and meta["class_names"] == list(CLASS_NAMES)
    assert meta["palette"] == PALETTE.tolist() and meta["train_id_to_label_id"][0] == 7  # road
    assert meta["input"] == {"name": "image", "format": "rgb255", "layout": "NCHW", "dtype": "float32",
                             "height": H, "width": W, "dynamic": False}  # fmt: skip
    assert meta["output"]["kind"] == "labels" and meta["output"]["dtype"] == "uint8"
    assert meta["normalization"]["color"] == "BGR" and meta["precision"] == "fp32"
    assert len(meta["source_checkpoint"]["sha256"]) == 64
    assert meta["source_checkpoint"]["path"] == str(authors_ckpt.resolve())
    assert {"torch", "onnx", "onnxruntime"} <= set(meta["versions"])
    assert any("stem: target" in line for line in meta["export"]["load_report"])
    assert any("layer6" in line for line in meta["export"]["load_report"])

    parity = meta["parity"]
    assert parity["passed"] and parity["samples"] == 2
    assert parity["max_abs_logit_diff"] <= parity["thresholds"]["max_abs_logit_diff"]
    assert parity["argmax_agreement"] >= 0.999
    assert "parity: max|Δlogit|" in fp32_export.summary[-1] and "argmax agree" in fp32_export.summary[-1]

    info = load_model_dir(d)
    assert info.input_size == (H, W) and info.num_classes == 19 and info.palette.dtype == np.uint8
    assert info.onnx_path == d / "1" / "model.onnx" and info.plan_path is None


def test_fp32_labels_graph_runs_and_matches_torch(fp32_export):
    model = onnx.load(str(fp32_export.model_dir / "1" / "model.onnx"))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version >= 17
    ops = {n.op_type for n in model.graph.node}
    assert {"Resize", "ArgMax", "Cast"} <= ops
    image = export_mod.synthetic_images(2, H, W, seed=5)
    labels = _run(fp32_export.model_dir / "1" / "model.onnx", image)
    assert labels.dtype == np.uint8 and labels.shape == (2, H, W)
    assert labels.max() < 19
    # Same graph on the torch side: the checkpoint's own model with the in-graph normalisation.
    from dass_train.checkpoint import load_model

    net, meta, _ = load_model(fp32_export.meta["source_checkpoint"]["path"])
    assert fp32_export.meta["upsampling"] == {"mode": "bilinear", "align_corners": True}  # the authors' lineage
    graph = export_mod.ExportGraph(net, meta["normalization"], output="labels", align_corners=True)
    with torch.inference_mode():
        ref = graph(torch.from_numpy(image)).numpy()
    assert (ref == labels).mean() > 0.999


def test_logits_dynamic_two_sizes(logits_dynamic_export):
    d = logits_dynamic_export.model_dir
    cfg = read_triton_config(d / "config.pbtxt")
    assert cfg["input"][0]["dims"] == [3, -1, -1]
    assert cfg["output"][0] == {"name": "logits", "data_type": "TYPE_FP32", "dims": [19, -1, -1]}
    meta = logits_dynamic_export.meta
    assert meta["input"]["dynamic"] and meta["output"]["kind"] == "logits"
    assert "layout: adaptseg" in meta["export"]["load_report"][0]
    for n, h, w in [(1, 48, 80), (2, 40, 56)]:
        logits = _run(d / "1" / "model.onnx", export_mod.synthetic_images(n, h, w))
        assert logits.dtype == np.float32 and logits.shape == (n, 19, h, w)


def test_int8_export_is_qdq_and_runs(work, ckpt, calib_dir):
    result = export_model(ckpt, out=work / "models", height=H, width=W, int8=True, calib=calib_dir, **FAST)
    path = result.model_dir / "1" / "model.onnx"
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and ops[-2:] == ["ArgMax", "Cast"]
    labels = _run(path, export_mod.synthetic_images(1, H, W))
    assert labels.dtype == np.uint8 and labels.shape == (1, H, W)
    i8 = result.meta["export"]["int8"]
    assert i8["calibration_images"] == 3 and i8["cpu_speedup"] > 0
    assert result.meta["precision"] == "int8" and result.meta["parity"]["real_images"] == 1
    assert 0.0 <= result.meta["parity"]["argmax_agreement"] <= 1.0
    assert "INT8 on CPU" in result.summary[-1]


def _float_weight_convs(path: Path) -> int:
    """Conv nodes whose weight is a plain float initializer, not the output of a DequantizeLinear."""
    graph = onnx.load(str(path)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(1 for n in graph.node if n.op_type == "Conv" and n.input[1] not in dequantized)


@pytest.fixture(scope="module")
def val_root(work, samples) -> Path:
    """A Cityscapes-layout val split holding the real Frankfurt sample (image + labelIds)."""
    import shutil

    root = work / "val_set"
    for kind, name in (("leftImg8bit", "leftImg8bit"), ("gtFine", "gtFine_labelIds")):
        folder = root / kind / "val" / "frankfurt"
        folder.mkdir(parents=True)
        shutil.copy(samples / f"frankfurt_000000_000294_{name}.png", folder)
    return root


def test_int8_methods_keep_layers_float_and_record_the_gate(work, ckpt, calib_dir, val_root):
    default = export_model(
        ckpt, out=work / "models", name="i8-default", height=H, width=W, int8=True, calib=calib_dir,
        int8_val=val_root, force=True, **FAST,
    )  # fmt: skip
    i8 = default.meta["export"]["int8"]
    # the default quantiser: NNCF with bias correction, every conv in int8
    assert i8["method"]["calibration"] == "nncf" and i8["method"]["quantiser"].startswith("nncf ")
    assert i8["method"]["float_layers"] == [] and i8["method"]["bias_correction"] is True
    assert _float_weight_convs(default.model_dir / "1" / "model.onnx") == 0
    gate = i8["gate"]
    assert gate["max_miou_drop"] == 1.0 and gate["miou_drop"] == pytest.approx(i8["miou_fp32"] - i8["miou_int8"])
    assert gate["passed"] == (gate["miou_drop"] <= 1.0) and "1 images of" in gate["measured_on"]
    on_disk = json.loads((default.model_dir / "meta.json").read_text())
    assert on_disk["export"]["int8"]["gate"] == gate

    # ONNX Runtime's quantiser, the first conv and the 4 ASPP branches of the classifier kept float
    ort_pct = export_model(
        ckpt, out=work / "models", name="i8-percentile", height=H, width=W, int8=True, calib=calib_dir,
        int8_calibration="percentile", int8_keep_float=("first_conv", "classifier"), **FAST,
    )  # fmt: skip
    assert ort_pct.meta["export"]["int8"]["method"]["quantiser"].startswith("onnxruntime ")
    assert _float_weight_convs(ort_pct.model_dir / "1" / "model.onnx") == 5
    # NNCF's ignored scope: the classifier's 4 branches stay float
    nncf_cls = export_model(
        ckpt, out=work / "models", name="i8-nncf-cls", height=H, width=W, int8=True, calib=calib_dir,
        int8_keep_float=("classifier",), **FAST,
    )  # fmt: skip
    assert _float_weight_convs(nncf_cls.model_dir / "1" / "model.onnx") == 4

    old = export_model(
        ckpt, out=work / "models", name="i8-minmax", height=H, width=W, int8=True, calib=calib_dir,
        int8_calibration="minmax", int8_keep_float=(), **FAST,
    )  # fmt: skip
    assert _float_weight_convs(old.model_dir / "1" / "model.onnx") == 0
    assert old.meta["export"]["int8"]["gate"]["miou_drop"] is None  # not measured: said so, not invented
    assert "mIoU gate not measured" in old.summary[-1]

    with pytest.raises(DeployError, match="--int8-calibration"):
        export_model(ckpt, out=work / "models", name="bad", int8=True, calib=calib_dir, int8_calibration="kl")
    with pytest.raises(DeployError, match="--int8-keep-float"):
        export_model(ckpt, out=work / "models", name="bad", int8=True, calib=calib_dir, int8_keep_float=["stem"])
    # TensorRT needs signed symmetric QDQ, which NNCF's CPU preset does not write: refused before any work
    with pytest.raises(DeployError, match="with --trt use percentile"):
        export_model(ckpt, out=work / "models", name="bad", int8=True, calib=calib_dir, int8_calibration="nncf",
                     trt=True)  # fmt: skip


def test_fp16_conversion_keeps_float_io(fp32_export, tmp_path):
    # Convert the shipped fp32 labels graph; the exporter does the same on its logits graph.
    model = onnx.load(str(fp32_export.model_dir / "1" / "model.onnx"))
    half = convert_to_fp16(model)
    onnx.checker.check_model(half)
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    conv_w = [i for i in half.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(conv_w) > 10
    onnx.save(half, tmp_path / "half.onnx")
    image = export_mod.synthetic_images(1, H, W, seed=3)
    a, b = _run(fp32_export.model_dir / "1" / "model.onnx", image), _run(tmp_path / "half.onnx", image)
    assert b.dtype == np.uint8 and (a == b).mean() > 0.99


@pytest.mark.slow
def test_fp16_export_and_resnet101(work, calib_dir):
    r18 = _dass_checkpoint(work / "half.pt", seed=3)
    res = export_model(r18, out=work / "models", height=H, width=W, fp16=True, **FAST)
    assert res.meta["precision"] == "fp16" and res.meta["parity"]["argmax_agreement"] >= 0.995
    r101 = _dass_checkpoint(work / "r101.pt", backbone="resnet101")
    res = export_model(r101, out=work / "models", height=64, width=64, **FAST)
    assert res.meta["backbone"] == "resnet101" and res.meta["parity"]["passed"]
    assert _run(res.model_dir / "1" / "model.onnx", export_mod.synthetic_images(1, 64, 64)).shape == (1, 64, 64)


def test_no_overwrite_then_overwrite(work, fp32_export, authors_ckpt, capsys):
    d = fp32_export.model_dir
    before = (d / "meta.json").read_text()
    code = export_main([str(authors_ckpt), "--out", str(d.parent), "--height", str(H), "--width", str(W), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists" in err and "--overwrite" in err and "\n" == err[-1]
    assert (d / "meta.json").read_text() == before


def test_failed_parity_leaves_nothing(work, ckpt, monkeypatch):
    out = work / "parity_models"
    monkeypatch.setattr(export_mod.parity, "FP32_MAX_ABS", 0.0)  # any real float rounding now fails the check
    with pytest.raises(DeployError, match="parity check failed"):
        export_model(ckpt, out=out, height=H, width=W, **FAST)
    assert not out.exists()  # not even the folder the export created


@pytest.mark.slow
def test_failed_parity_with_force_writes(work, ckpt, monkeypatch):
    out = work / "forced_models"
    out.mkdir()
    monkeypatch.setattr(export_mod.parity, "FP32_MAX_ABS", 0.0)
    res = export_model(ckpt, out=out, height=H, width=W, force=True, **FAST)
    assert not res.meta["parity"]["passed"] and res.meta["parity"]["forced"]
    assert [p.name for p in out.iterdir()] == ["bida_r18-fp32"]  # no temp folders left


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_trt_without_tensorrt_or_gpu(ckpt, tmp_path):
    with pytest.raises(DeployError) as info:
        export_model(ckpt, out=tmp_path / "m", height=H, width=W, trt=True, **FAST)
    message = str(info.value)
    assert "'tensorrt' Python package" in message and "CUDA GPU" in message and "dass[gpu]" in message
    assert not (tmp_path / "m").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: the no-GPU message cannot show")
def test_trt_with_package_but_no_gpu(ckpt, tmp_path, monkeypatch):
    # A real (empty) importable ``tensorrt`` package: only the GPU is then reported missing.
    (tmp_path / "pkgs" / "tensorrt").mkdir(parents=True)
    (tmp_path / "pkgs" / "tensorrt" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    with pytest.raises(DeployError) as info:
        export_model(ckpt, out=tmp_path / "m", height=H, width=W, trt=True, **FAST)
    assert "tensorrt' Python package" not in str(info.value) and "no CUDA GPU" in str(info.value)


def _corrupt_inputs(tmp_path: Path, ckpt: Path) -> dict[str, tuple[Path, str]]:
    not_ckpt = tmp_path / "notes.pt"
    not_ckpt.write_text("this is not a checkpoint")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    odd_keys = tmp_path / "odd.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, odd_keys)
    wrong_classes = tmp_path / "wrong_classes.pt"
    obj = torch.load(ckpt, weights_only=True)
    obj["meta"]["num_classes"] = 16
    torch.save(obj, wrong_classes)
    return {
        "missing": (tmp_path / "nope.pt", "not found"),
        "not a checkpoint": (not_ckpt, "not a PyTorch checkpoint"),
        "truncated": (truncated, "truncated"),
        "unknown layout": (odd_keys, "unknown"),
        "class count": (wrong_classes, "16 classes"),
    }


def test_bad_checkpoints_give_one_line_errors(tmp_path, ckpt, capsys):
    for what, (path, needle) in _corrupt_inputs(tmp_path, ckpt).items():
        with pytest.raises(CheckpointError, match=needle):
            export_model(path, out=tmp_path / "m", height=H, width=W, **FAST)
        code = export_main([str(path), "--out", str(tmp_path / "m"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2, what
        assert err.startswith("error: ") and err.count("\n") == 1 and path.name in err, (what, err)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(int8=True), "--calib"),
        (dict(fp16=True, int8=True, calib="."), "one of --fp16 and --int8"),
        (dict(int8=True, calib="/nonexistent/calib"), "--calib folder not found"),
        (dict(output="probabilities"), "--output"),
        (dict(height=4), "--height"),
        (dict(name="a/b"), "--name"),
        (dict(source="caffe"), "unknown checkpoint source"),
    ],
)
def test_bad_options(ckpt, tmp_path, kwargs, needle):
    with pytest.raises((DeployError, CheckpointError), match=needle):
        export_model(ckpt, out=tmp_path / "m", **FAST, **kwargs)


def test_empty_calib_folder(ckpt, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeployError, match="no images"):
        export_model(ckpt, out=tmp_path / "m", int8=True, calib=tmp_path / "empty", **FAST)


def test_cli_help_lists_options(capsys):
    with pytest.raises(SystemExit) as info:
        export_main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--fp16", "--int8", "--calib", "--trt", "--dynamic", "--output", "--from", "--stem",
                   "--overwrite", "--force", "default: 512"):  # fmt: skip
        assert option in text


def test_repository_helpers(fp32_export, logits_dynamic_export, tmp_path, monkeypatch):
    root = fp32_export.model_dir.parent
    names = [m.name for m in list_models(root)]
    assert "authors-fp32" in names and "adaptseg-fp32" in names
    assert not any(n.startswith(".") for n in names)
    with pytest.raises(DeployError, match="model folder not found"):
        load_model_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeployError, match="meta.json is missing"):
        load_model_dir(tmp_path / "empty")
    (tmp_path / "empty" / "meta.json").write_text(fp32_export.model_dir.joinpath("meta.json").read_text())
    with pytest.raises(DeployError, match="no model file"):
        load_model_dir(tmp_path / "empty")
    monkeypatch.delenv("DASS_MODEL", raising=False)
    with pytest.raises(DeployError, match="DEFAULT"):
        default_model_dir(tmp_path)
    (tmp_path / "DEFAULT").write_text("authors-fp32\n")
    assert default_model_dir(tmp_path) == tmp_path / "authors-fp32"
    monkeypatch.setenv("DASS_MODEL", str(fp32_export.model_dir))
    assert default_model_dir(tmp_path) == fp32_export.model_dir
