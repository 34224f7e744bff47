"""DeepLab-V2: equality with an independent reference, output stride, features, frozen BN, LR groups."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dass_train.network import CAFFE_BGR, IMAGENET_RGB, deeplab_v2, output_size


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics/affine values so equality tests cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(1 + 0.1 * torch.randn(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


# ------------------------------------------------------------------------------------------------------------
# Reference: DeepLab-V2 ResNet-101 written from the paper / Caffe prototxt description, functional, with the
# Caffe layer names (conv1, bn_conv1, res2a_branch1, res2a_branch2a, bn2a_branch2a, ..., res4b22, fc1_c0..c3).
# It shares no code with dass_train.network; a key map translates our (AdaptSegNet) names to the Caffe ones.

# (Caffe stage, number of blocks, bottleneck width, stride of the first block, dilation)
STAGES = [(2, 3, 64, 1, 1), (3, 4, 128, 2, 1), (4, 23, 256, 1, 2), (5, 3, 512, 1, 4)]


def _block_names(stage: int, n: int) -> list[str]:
    if stage in (3, 4):  # Caffe ResNet-101 names res3b1.. and res4b1..b22
        return ["a"] + [f"b{i}" for i in range(1, n)]
    return [chr(ord("a") + i) for i in range(n)]


def ours_to_caffe() -> dict[str, str]:
    names = {"conv1.weight": "conv1/w"}
    for p, q in (("weight", "scale"), ("bias", "shift"), ("running_mean", "mean"), ("running_var", "var")):
        names[f"bn1.{p}"] = f"bn_conv1/{q}"
    for layer, (stage, n, _, _, _) in enumerate(STAGES, start=1):
        for i, b in enumerate(_block_names(stage, n)):
            for j, br in enumerate("abc", start=1):
                names[f"layer{layer}.{i}.conv{j}.weight"] = f"res{stage}{b}_branch2{br}/w"
                for p, q in (("weight", "scale"), ("bias", "shift"), ("running_mean", "mean"), ("running_var", "var")):
                    names[f"layer{layer}.{i}.bn{j}.{p}"] = f"bn{stage}{b}_branch2{br}/{q}"
            if i == 0:
                names[f"layer{layer}.0.downsample.0.weight"] = f"res{stage}a_branch1/w"
                for p, q in (("weight", "scale"), ("bias", "shift"), ("running_mean", "mean"), ("running_var", "var")):
                    names[f"layer{layer}.0.downsample.1.{p}"] = f"bn{stage}a_branch1/{q}"
    for c in range(4):
        names[f"layer5.conv2d_list.{c}.weight"] = f"fc1_c{c}/w"
        names[f"layer5.conv2d_list.{c}.bias"] = f"fc1_c{c}/b"
    return names


def reference_deeplab_v2(w: dict[str, Tensor], x: Tensor) -> Tensor:
    """Functional DeepLab-V2 (ResNet-101, OS 8, ASPP 6/12/18/24 summed) on Caffe-named weights."""

    def bn(t: Tensor, name: str) -> Tensor:
        return F.batch_norm(t, w[f"{name}/mean"], w[f"{name}/var"], w[f"{name}/scale"], w[f"{name}/shift"], False)

    x = F.relu(bn(F.conv2d(x, w["conv1/w"], stride=2, padding=3), "bn_conv1"))
    x = F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True)
    for stage, n, _, stride, dil in STAGES:
        for i, b in enumerate(_block_names(stage, n)):
            s = stride if i == 0 else 1
            if i == 0:
                short = bn(F.conv2d(x, w[f"res{stage}a_branch1/w"], stride=s), f"bn{stage}a_branch1")
            else:
                short = x
            y = F.relu(bn(F.conv2d(x, w[f"res{stage}{b}_branch2a/w"], stride=s), f"bn{stage}{b}_branch2a"))
            y = F.conv2d(y, w[f"res{stage}{b}_branch2b/w"], padding=dil, dilation=dil)
            y = F.relu(bn(y, f"bn{stage}{b}_branch2b"))
            y = bn(F.conv2d(y, w[f"res{stage}{b}_branch2c/w"]), f"bn{stage}{b}_branch2c")
            x = F.relu(y + short)
    return sum(
        F.conv2d(x, w[f"fc1_c{c}/w"], w[f"fc1_c{c}/b"], padding=r, dilation=r) for c, r in enumerate((6, 12, 18, 24))
    )


@pytest.fixture(scope="module")
def resnet101() -> nn.Module:
    torch.manual_seed(0)
    return randomize_(deeplab_v2(19, "resnet101")).eval()


def test_matches_independent_reference(resnet101):
    mapping = ours_to_caffe()
    sd = resnet101.state_dict()
    used = {k for k in sd if not k.endswith("num_batches_tracked")}
    assert used == set(mapping), "the key map must cover exactly the AdaptSegNet layout"
    caffe = {mapping[k]: sd[k] for k in used}
    x = 50 * torch.randn(1, 3, 65, 65, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = resnet101(x), reference_deeplab_v2(caffe, x)
    assert ours.shape == ref.shape == (1, 19, 9, 9)
    scale = ref.abs().max()
    assert scale > 0
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * scale.item())
    # a single changed weight must show up (the comparison is sensitive)
    caffe["res4b22_branch2c/w"] = caffe["res4b22_branch2c/w"] * 1.5
    with torch.no_grad():
        assert not torch.allclose(ours, reference_deeplab_v2(caffe, x), rtol=1e-4, atol=1e-4 * scale.item())


def test_resnet101_layout_and_caffe_details(resnet101):
    m = resnet101
    keys = set(m.state_dict())
    for k in (
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.weight",
        "layer3.22.conv3.weight",
        "layer4.2.bn3.bias",
        "layer5.conv2d_list.3.bias",
    ):
        assert k in keys
    assert [len(m.layer1), len(m.layer2), len(m.layer3), len(m.layer4)] == [3, 4, 23, 3]
    assert m.maxpool.ceil_mode and m.conv1.stride == (2, 2) and m.conv1.kernel_size == (7, 7)
    assert m.layer2[0].conv1.stride == (2, 2) and m.layer2[0].conv2.stride == (1, 1)  # stride on the 1x1
    assert all(
        c.stride == (1, 1) for layer in (m.layer3, m.layer4) for c in layer.modules() if isinstance(c, nn.Conv2d)
    )
    assert {b.conv2.dilation for b in m.layer3} == {(2, 2)} and {b.conv2.dilation for b in m.layer4} == {(4, 4)}
    assert [(c.dilation[0], c.padding[0], c.kernel_size) for c in m.layer5.conv2d_list] == [
        (r, r, (3, 3)) for r in (6, 12, 18, 24)
    ]
    assert m.feature_dim == 76


def out_len(n: int) -> int:
    """Logit length by the Caffe DeepLab rule (AdaptSegNet's ``outS``): halve, round up, halve, round up, halve."""
    n = math.floor((n - 1) / 2) + 1
    n = math.ceil((n - 1) / 2) + 1
    return math.floor((n - 1) / 2) + 1


def test_output_size_known_values():
    assert output_size(321, 321) == (41, 41) and output_size(512, 1024) == (65, 129) and output_size(64, 65) == (9, 9)


@pytest.mark.parametrize("backbone,layer4_dim", [("resnet18", 512), ("resnet50", 2048)])
def test_output_stride_8_and_features(backbone, layer4_dim):
    for feature, dim in (("aspp", 76), ("layer4", layer4_dim)):
        m = deeplab_v2(19, backbone, feature=feature).eval()
        assert m.feature_dim == dim
        for h, w in ((64, 49), (33, 42)):
            x = torch.randn(1, 3, h, w)
            expect = (out_len(h), out_len(w))
            assert output_size(h, w) == expect
            with torch.no_grad():
                logits = m(x)
                logits2, feats = m(x, return_features=True)
            assert logits.shape == (1, 19, *expect)
            assert feats.shape == (1, dim, *expect)
            torch.testing.assert_close(logits, logits2)
            if feature == "aspp":  # the features are the four branch outputs whose sum is the logits
                torch.testing.assert_close(feats.view(1, 4, 19, *expect).sum(1), logits, rtol=1e-5, atol=1e-5)


def test_classifier_init():
    m = deeplab_v2(19, "resnet18")
    w = torch.cat([c.weight.flatten() for c in m.layer5.conv2d_list])
    assert abs(w.std().item() - 0.01) < 0.001 and abs(w.mean().item()) < 0.001
    assert all(torch.count_nonzero(c.bias) == 0 for c in m.layer5.conv2d_list)


def test_frozen_bn_stays_frozen_in_train_mode():
    m = randomize_(deeplab_v2(19, "resnet18", freeze_bn=True))
    m.train()
    bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    assert m.training and all(not b.training for b in bns)
    assert all(not p.requires_grad for b in bns for p in b.parameters())
    before = {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
    m(torch.randn(2, 3, 33, 33)).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items() if "running" in k)
    assert m.layer5.conv2d_list[0].weight.grad is not None and m.conv1.weight.grad is not None
    assert all(b.weight.grad is None for b in bns)
    m.eval().train()  # toggling again keeps them frozen
    assert all(not b.training for b in bns)


def test_unfrozen_bn_trains():
    m = deeplab_v2(19, "resnet18", freeze_bn=False).train()
    bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    assert all(b.training and b.weight.requires_grad for b in bns)
    before = m.bn1.running_mean.clone()
    m(torch.randn(2, 3, 33, 33))
    assert not torch.equal(before, m.bn1.running_mean)


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_param_groups(freeze_bn):
    m = deeplab_v2(19, "resnet18", freeze_bn=freeze_bn)
    body, head = m.param_groups(0.01)
    assert body["lr"] == 0.01 and head["lr"] == pytest.approx(0.1)
    assert {id(p) for p in head["params"]} == {id(p) for p in m.layer5.parameters()}
    ids = [id(p) for g in (body, head) for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in m.parameters() if p.requires_grad}
    n_bn = sum(p.numel() for b in m.modules() if isinstance(b, nn.BatchNorm2d) for p in b.parameters())
    assert (sum(p.numel() for p in body["params"]) + n_bn * freeze_bn) == sum(
        p.numel() for n, p in m.named_parameters() if not n.startswith("layer5.")
    )
    torch.optim.SGD([body, head], lr=0.01, momentum=0.9)  # valid optimiser groups


def test_channels_last_matches():
    m = randomize_(deeplab_v2(19, "resnet18")).eval()
    x = torch.randn(1, 3, 41, 57)
    with torch.no_grad():
        ref = m(x)
        m = m.to(memory_format=torch.channels_last)
        out = m(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_two_branch_sum_variant():
    m = randomize_(deeplab_v2(19, "resnet18", aspp_summed_branches=2)).eval()
    with torch.no_grad():
        logits, feats = m(torch.randn(1, 3, 33, 33), return_features=True)
    torch.testing.assert_close(logits, feats[:, :19] + feats[:, 19:38])


def test_proda_head_shapes_and_groups():
    m = deeplab_v2(16, "resnet18", head="proda", pre_head_bn=True).eval()
    assert "layer5.head.1.weight" in m.state_dict() and "bn_pretrain.running_mean" in m.state_dict()
    assert m.layer5.head[1].bias is None
    with torch.no_grad():
        logits, feats = m(torch.randn(1, 3, 33, 33), return_features=True)
    assert logits.shape == (1, 16, 5, 5) and feats.shape == (1, 256, 5, 5) and m.feature_dim == 256
    head = {id(p) for p in m.param_groups(1.0)[1]["params"]}
    assert head == {id(p) for n, p in m.named_parameters() if n.startswith("layer5.")}  # frozen bn_pretrain left out


def test_bad_arguments():
    with pytest.raises(ValueError, match="backbone"):
        deeplab_v2(19, "resnet34")
    with pytest.raises(ValueError, match="feature"):
        deeplab_v2(19, "resnet18", feature="layer3")


def test_normalization_constants():
    assert CAFFE_BGR == {"color": "BGR", "mean": [104.008, 116.669, 122.679], "std": [1.0, 1.0, 1.0]}
    assert IMAGENET_RGB["color"] == "RGB" and IMAGENET_RGB["std"] == [58.395, 57.12, 57.375]


@pytest.mark.parametrize("backbone, blocks", [("resnet18", 8), ("resnet101", 33)])
def test_zero_init_residual_starts_every_block_as_the_identity(backbone, blocks):
    from dass_train.network import zero_init_residual_

    torch.manual_seed(0)
    model = deeplab_v2(19, backbone, freeze_bn=False)
    assert zero_init_residual_(model) == blocks
    block = model.layer3[1]  # no downsample: the block's output is relu(branch + x)
    x = torch.rand(2, block.conv1.in_channels, 8, 8)
    with torch.no_grad():
        assert torch.equal(block.train()(x), x)  # the zero BN scale silences the branch, x >= 0 passes the ReLU
