"""Checkpoints: atomic save, safe load with clear errors, every external key layout, ImageNet init."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from dass_train.checkpoint import (
    FORMAT,
    PRODA_RGB,
    checkpoint_meta_default,
    load_checkpoint,
    load_init_weights,
    load_model,
    save_checkpoint,
)
from dass_train.errors import CheckpointError, UserError
from dass_train.labels import CLASS_NAMES
from dass_train.network import CAFFE_BGR, deeplab_v2

X = torch.randn(1, 3, 33, 33, generator=torch.Generator().manual_seed(3))


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random weights *and* BN statistics, so two models (or two stems) give clearly different outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif ".bn" in name or name.startswith("bn") or "downsample.1" in name:
                t.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)
    return model.eval()


def run(model: nn.Module) -> Tensor:
    with torch.no_grad():
        return model.eval()(X)


@pytest.fixture(scope="module")
def r18() -> nn.Module:
    return randomize_(deeplab_v2(19, "resnet18"), seed=1)


class Custom:  # a class a weights_only load must refuse
    pass


class ExplodingTensor(Tensor):
    """A tensor that fails to serialise: torch.save starts writing, then raises."""

    def __reduce_ex__(self, protocol):
        raise RuntimeError("boom while pickling")


# ------------------------------------------------------------------------------------------------ our format


def test_dass_roundtrip_with_training_state(tmp_path, r18):
    r18 = copy.deepcopy(r18)
    meta = checkpoint_meta_default(19, "resnet18", "aspp", CAFFE_BGR, stage="adapt", iteration=7, metrics={"miou": 0.5})
    opt = torch.optim.SGD(r18.param_groups(0.01), lr=0.01, momentum=0.9)
    r18.train()
    r18(X).mean().backward()
    opt.step()
    opt.zero_grad()
    payload = {"format": FORMAT, "version": 1, "model": r18.state_dict(), "meta": meta, "optimizer": opt.state_dict()}
    path = save_checkpoint(tmp_path / "run" / "last.pt", payload)
    assert path.is_file() and sorted(os.listdir(path.parent)) == ["last.pt"]
    raw = load_checkpoint(path)
    assert raw["format"] == FORMAT and raw["meta"]["iteration"] == 7 and "optimizer" in raw
    model, meta2, report = load_model(path)
    torch.testing.assert_close(run(model), run(r18))
    assert meta2["stage"] == "adapt" and meta2["metrics"] == {"miou": 0.5} and meta2["normalization"] == CAFFE_BGR
    assert meta2["class_names"] == list(CLASS_NAMES) and meta2["backbone"] == "resnet18"
    assert any("dass" in line for line in report)
    assert any("optimizer" in line for line in report)  # training state is named, not silently ignored
    assert not model.training


def test_meta_default_is_plain():
    meta = checkpoint_meta_default(16, "resnet101")
    assert meta["class_names"][:3] == ["road", "sidewalk", "building"] and len(meta["class_names"]) == 16
    assert "terrain" not in meta["class_names"] and meta["normalization"] == CAFFE_BGR


# ------------------------------------------------------------------------------------------------ AdaptSegNet


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "module_prefix", "no_num_batches_tracked"])
def test_adaptseg_layouts(tmp_path, r18, wrap):
    sd = dict(r18.state_dict())
    if wrap == "module_prefix":
        obj = {f"module.{k}": v for k, v in sd.items()}
    elif wrap == "no_num_batches_tracked":
        obj = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    elif wrap == "bare":
        obj = sd
    else:
        obj = {wrap: sd, "epoch": 3}
    torch.save(obj, tmp_path / "adapt.pth")
    model, meta, report = load_model(tmp_path / "adapt.pth", num_classes=19)
    torch.testing.assert_close(run(model), run(r18))
    assert meta["normalization"] == CAFFE_BGR and meta["source"] == "adaptseg"
    assert report[0].startswith("layout: adaptseg")
    if wrap == "no_num_batches_tracked":
        assert any("num_batches_tracked" in line for line in report)
    if wrap in ("state_dict", "model"):
        assert any("epoch" in line for line in report)


def test_resnet101_detected_from_layer3(tmp_path):
    m = deeplab_v2(16, "resnet101")
    torch.save(m.state_dict(), tmp_path / "r101.pth")
    model, meta, _ = load_model(tmp_path / "r101.pth", source="adaptseg", backbone="resnet101", num_classes=16)
    assert meta["backbone"] == "resnet101" and len(model.layer3) == 23 and meta["num_classes"] == 16
    with pytest.raises(CheckpointError, match="resnet101 backbone, expected resnet50"):
        load_model(tmp_path / "r101.pth", backbone="resnet50")


def test_resnet50_detected(tmp_path):
    torch.save(deeplab_v2(19, "resnet50").state_dict(), tmp_path / "r50.pth")
    _, meta, _ = load_model(tmp_path / "r50.pth")
    assert meta["backbone"] == "resnet50"


# ------------------------------------------------------------------------------------------------ authors' DASS


def authors_checkpoint(r18: nn.Module, other: nn.Module) -> dict[str, Tensor]:
    """AdaptSegNet keys of ``r18`` + a target stem taken from ``other`` + a layer6 classifier."""
    sd = dict(r18.state_dict())
    for k, v in other.state_dict().items():
        if k.startswith(("conv1.", "bn1.", "layer1.")):
            sd[f"target_{k}"] = v
    for k, v in r18.state_dict().items():
        if k.startswith("layer5."):
            sd["layer6." + k[len("layer5.") :]] = v + 1
    return sd


def test_authors_layout_stems(tmp_path, r18):
    other = randomize_(deeplab_v2(19, "resnet18"), seed=2)
    torch.save(authors_checkpoint(r18, other), tmp_path / "dass_authors.pth")

    target, meta, report = load_model(tmp_path / "dass_authors.pth")  # default: the target stem
    expect = deeplab_v2(19, "resnet18")
    mixed = {
        k: (other if k.startswith(("conv1.", "bn1.", "layer1.")) else r18).state_dict()[k] for k in r18.state_dict()
    }
    expect.load_state_dict(mixed)
    torch.testing.assert_close(run(target), run(expect))
    assert not torch.allclose(run(target), run(r18))
    assert meta["source"] == "bida-authors" and meta["normalization"] == CAFFE_BGR
    text = "\n".join(report)
    assert "stem: target" in text and "layer6" in text and "source stem" in text

    source, _, report_s = load_model(tmp_path / "dass_authors.pth", stem="source")
    torch.testing.assert_close(run(source), run(r18))
    assert any("left out the target stem" in line for line in report_s)


def test_target_stem_needs_authors_layout(tmp_path, r18):
    torch.save(r18.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="stem='target'"):
        load_model(tmp_path / "plain.pth", stem="target")
    with pytest.raises(CheckpointError, match="not 'proda'"):
        load_model(tmp_path / "plain.pth", source="proda")


# ------------------------------------------------------------------------------------------------ ProDA


def test_proda_layout(tmp_path):
    proda = randomize_(deeplab_v2(19, "resnet18", head="proda", pre_head_bn=True), seed=4)
    ckpt = {
        "ResNet101": {"model_state": proda.state_dict(), "objective_vectors": torch.zeros(19, 256)},
        "iter": 4000,
        "best_iou": 0.47,
    }
    torch.save(ckpt, tmp_path / "from_gta5_to_cityscapes_on_deeplabv2_best_model.pkl")
    model, meta, report = load_model(tmp_path / "from_gta5_to_cityscapes_on_deeplabv2_best_model.pkl", source="proda")
    torch.testing.assert_close(run(model), run(proda))
    assert meta["normalization"] == PRODA_RGB and meta["head"] == "proda" and model.feature_dim == 256
    text = "\n".join(report)
    assert "objective_vectors" in text and "best_iou" in text and "iter" in text


# ------------------------------------------------------------------------------------------------ bad inputs


def one_line_naming(err: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and isinstance(err.value, UserError)
    return msg


def test_missing_empty_truncated_text_folder(tmp_path, r18):
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "nope.pt")
    assert "not found" in one_line_naming(e, tmp_path / "nope.pt")

    (tmp_path / "empty.pt").touch()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "empty.pt")
    assert "empty" in one_line_naming(e, tmp_path / "empty.pt")

    save_checkpoint(tmp_path / "full.pt", {"model": r18.state_dict()})
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "cut.pt")
    assert "truncated" in one_line_naming(e, tmp_path / "cut.pt")

    (tmp_path / "notes.txt").write_text("these are not weights\n")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "notes.txt")
    assert "not a PyTorch checkpoint" in one_line_naming(e, tmp_path / "notes.txt")

    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path)
    assert "folder" in one_line_naming(e, tmp_path)

    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_checkpoint(tmp_path / "list.pt")


def test_pickled_custom_class_is_refused(tmp_path, r18):
    torch.save({"state_dict": r18.state_dict(), "args": Custom()}, tmp_path / "unsafe.pth")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "unsafe.pth")
    msg = one_line_naming(e, tmp_path / "unsafe.pth")
    assert "safe load refuses" in msg and "Custom" in msg


def test_class_count_mismatch(tmp_path):
    torch.save(deeplab_v2(16, "resnet18").state_dict(), tmp_path / "syn16.pth")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "syn16.pth", num_classes=19)
    assert "has 16 classes, expected 19" in one_line_naming(e, tmp_path / "syn16.pth")


def test_unknown_and_incomplete_layouts(tmp_path, r18):
    torch.save({"encoder.weight": torch.zeros(3), "decoder.bias": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "other.pth")
    assert "unknown key layout: first keys are encoder.weight, decoder.bias" in one_line_naming(
        e, tmp_path / "other.pth"
    )

    sd = dict(r18.state_dict())
    del sd["layer2.1.conv2.weight"]
    sd["layer9.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "broken.pth")
    msg = one_line_naming(e, tmp_path / "broken.pth")
    assert "layer2.1.conv2.weight" in msg and "layer9.weight" in msg

    with pytest.raises(CheckpointError, match="unknown checkpoint source"):
        load_model(tmp_path / "broken.pth", source="deeplabv3")


# ------------------------------------------------------------------------------------------------ atomic save


def test_failed_save_keeps_the_old_file_and_leaves_no_temp(tmp_path, r18):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": r18.state_dict(), "step": 1})
    before = path.read_bytes()
    bad = torch.zeros(1000).as_subclass(ExplodingTensor)
    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(path, {"model": r18.state_dict(), "step": 2, "zzz": bad})
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]

    import numpy as np

    with pytest.raises(TypeError, match=r"payload\['meta'\]\['miou'\]"):  # would not load with weights_only
        save_checkpoint(path, {"model": r18.state_dict(), "meta": {"miou": np.float64(0.5)}})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.pt"]


# ------------------------------------------------------------------------------------------------ ImageNet init


def backbone_sd(model: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("layer5.")}


def test_init_torchvision_format(tmp_path):
    src = randomize_(deeplab_v2(19, "resnet18"), seed=5)
    sd = backbone_sd(src) | {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    torch.save(sd, tmp_path / "resnet18-imagenet.pth")
    model = deeplab_v2(19, "resnet18")
    head_before = {k: v.clone() for k, v in model.layer5.state_dict().items()}
    report = load_init_weights(model, tmp_path / "resnet18-imagenet.pth")
    for k, v in backbone_sd(src).items():
        assert torch.equal(model.state_dict()[k], v), k
    assert all(torch.equal(model.layer5.state_dict()[k], v) for k, v in head_before.items())
    text = "\n".join(report)
    assert "torchvision" in text and "fc" in text and "RGB" in text


def test_init_deeplab_coco_format(tmp_path):
    src = randomize_(deeplab_v2(21, "resnet18"), seed=6)
    sd = {f"Scale.{k}": v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "DeepLab_resnet_pretrained_init-f81d91e8.pth")
    model = deeplab_v2(19, "resnet18")
    report = load_init_weights(model, tmp_path / "DeepLab_resnet_pretrained_init-f81d91e8.pth")
    assert torch.equal(model.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    assert torch.equal(model.bn1.running_var, src.bn1.running_var)
    assert model.layer5.conv2d_list[0].weight.shape[0] == 19
    text = "\n".join(report)
    assert "deeplab-coco" in text and "layer5" in text and "num_batches_tracked" in text and "BGR" in text


def test_init_errors(tmp_path):
    model = deeplab_v2(19, "resnet50")
    with pytest.raises(CheckpointError) as e:
        load_init_weights(model, tmp_path / "resnet101.pth")
    msg = one_line_naming(e, tmp_path / "resnet101.pth")
    assert "--model.init" in msg and "DeepLab_resnet_pretrained_init" in msg

    torch.save(deeplab_v2(19, "resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError) as e:
        load_init_weights(model, tmp_path / "r18.pth")
    assert "resnet50" in one_line_naming(e, tmp_path / "r18.pth")
