"""DeepLab-V2 (Chen et al., TPAMI 2018) as used by BiDA and the AdaptSegNet lineage.

ResNet backbone with output stride 8: layer3 and layer4 keep their resolution and use dilation 2 and 4
instead of stride. In the Caffe-lineage bottleneck the stride of layer2 sits on the first 1x1 conv (not on
the 3x3 as in torchvision's "v1.5"), the stem's max-pool uses ``ceil_mode=True``, and the classifier
``layer5`` is the ASPP of four 3x3 convs (dilation 6/12/18/24, padding equal to the dilation, with bias) whose
outputs are summed. The module names reproduce the AdaptSegNet ``state_dict`` layout exactly so that
checkpoints of that lineage load with ``strict=True`` (see ``dass_train.checkpoint``).

Input normalisation is *not* part of the network: it is recorded in the checkpoint meta (``CAFFE_BGR`` for the
Caffe lineage, ``IMAGENET_RGB`` for torchvision-initialised models) and applied by the data pipeline / export.

``head="proda"`` builds the classifier of ProDA's released "DeepLab-V2" (Zhang et al., CVPR 2021), which is not
the plain ASPP: five branches (1x1 + four dilated 3x3, 256 channels, GroupNorm, ReLU) concatenated, a
squeeze-and-excitation gate, a 3x3 conv to 256 channels + GroupNorm, dropout and a 1x1 conv without bias. It
exists only so that ProDA checkpoints can be evaluated and exported with the same tools.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

# Normalisation dicts of the meta contract (0..255 scale, in the stated colour order).
CAFFE_BGR: dict = {"color": "BGR", "mean": [104.008, 116.669, 122.679], "std": [1.0, 1.0, 1.0]}
IMAGENET_RGB: dict = {"color": "RGB", "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}

ASPP_RATES: tuple[int, ...] = (6, 12, 18, 24)


def output_size(height: int, width: int) -> tuple[int, int]:
    """Spatial size of the logits for an HxW input: conv 7x7/2 (floor), max-pool 3x3/2 (ceil), layer2 stride 2."""

    def one(n: int) -> int:
        n = (n - 1) // 2 + 1  # conv1, padding 3
        n = -(-(n - 1) // 2) + 1  # max-pool, padding 1, ceil_mode
        return (n - 1) // 2 + 1  # first 1x1 conv of layer2, stride 2

    return one(height), one(width)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); both take the layer's dilation so the receptive field still grows."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample=None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 (carries the stride, Caffe style) -> 3x3 dilated -> 1x1 expanding by 4, plus the shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample=None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# backbone name -> (block type, number of blocks in layer1..layer4)
BACKBONES: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class ASPPClassifier(nn.Module):
    """DeepLab-V2 ASPP: parallel dilated 3x3 convs straight to class scores, summed.

    ``summed_branches`` exists for checkpoints of AdaptSegNet's released code, whose loop returned after adding
    the second branch (so only branches 0 and 1 contribute there); the paper and BiDA sum all four.
    """

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = ASPP_RATES, summed_branches=None):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True) for r in rates
        )
        self.summed_branches = len(rates) if summed_branches is None else int(summed_branches)
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)
        self.feature_dim = num_classes * len(rates)

    def forward(self, x: Tensor, return_features: bool = False) -> tuple[Tensor, Tensor | None]:
        """x [N,C,h,w] -> (logits [N,K,h,w], branch outputs concatenated [N,4K,h,w] or None)."""
        branches = [conv(x) for conv in self.conv2d_list]
        logits = branches[0]
        for b in branches[1 : self.summed_branches]:
            logits = logits + b
        return logits, (torch.cat(branches, dim=1) if return_features else None)


class _SqueezeExcite(nn.Module):
    """Channel gate of ProDA's head: global average -> bottleneck MLP -> sigmoid scale."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.se = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        gate = self.se(x.mean(dim=(2, 3)))  # [N,C]
        return x * gate[:, :, None, None]


class ProDAClassifier(nn.Module):
    """ProDA's classifier (see module docstring); module names follow its checkpoints.

    The features are the 256-channel map the final 1x1 conv sees (ProDA's ``feat``).
    """

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = ASPP_RATES, width: int = 256):
        super().__init__()

        def branch(kernel: int, rate: int) -> nn.Sequential:
            pad = 0 if kernel == 1 else rate
            return nn.Sequential(
                nn.Conv2d(in_channels, width, kernel, padding=pad, dilation=rate, bias=True),
                nn.GroupNorm(32, width),
                nn.ReLU(inplace=True),
            )

        self.conv2d_list = nn.ModuleList([branch(1, 1)] + [branch(3, r) for r in rates])
        cat = width * (len(rates) + 1)
        self.bottleneck = nn.Sequential(
            _SqueezeExcite(cat), nn.Conv2d(cat, width, 3, padding=1, bias=True), nn.GroupNorm(32, width)
        )
        self.head = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(width, num_classes, 1, bias=False))
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear) and m is not self.head[1]:
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.head[1].weight, 0.0, 0.001)
        self.feature_dim = width

    def forward(self, x: Tensor, return_features: bool = False) -> tuple[Tensor, Tensor | None]:
        """x [N,C,h,w] -> (logits [N,K,h,w], features [N,256,h,w] or None)."""
        feat = self.bottleneck(torch.cat([b(x) for b in self.conv2d_list], dim=1))
        feat = self.head[0](feat)
        return self.head[1](feat), (feat if return_features else None)


class DeepLabV2(nn.Module):
    """Dilated ResNet + classifier; logits at 1/8 of the input, ``output_size(H, W)`` exactly (the Caffe stem's
    ceil-mode max-pool gives 65x129 for 512x1024, k+1 for 8k+1 inputs such as 321 or 513).

    With ``freeze_bn=True`` every BatchNorm uses its stored statistics and gets no gradient, also in ``train()``
    mode, as in DeepLab / AdaptSegNet / BiDA (batches of 1-2 crops are too small for BN statistics).
    """

    def __init__(
        self,
        num_classes: int = 19,
        backbone: str = "resnet101",
        feature: str = "aspp",
        freeze_bn: bool = True,
        head: str = "aspp",
        pre_head_bn: bool = False,
        aspp_summed_branches: int | None = None,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
        if feature not in ("aspp", "layer4"):
            raise ValueError(f"unknown feature {feature!r}; choose 'aspp' or 'layer4'")
        if head not in ("aspp", "proda"):
            raise ValueError(f"unknown head {head!r}; choose 'aspp' or 'proda'")
        block, layers = BACKBONES[backbone]
        self.num_classes, self.backbone, self.feature, self.head_type = num_classes, backbone, feature, head
        self.freeze_bn = freeze_bn

        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], dilation=2)
        self.layer4 = self._make_layer(block, 512, layers[3], dilation=4)
        self.out_channels = 512 * block.expansion
        # ProDA's "bn_clr" variant normalises layer4's output before the classifier.
        self.bn_pretrain = nn.BatchNorm2d(self.out_channels) if pre_head_bn else None
        for m in self.modules():  # the backbone; pretrained weights usually replace this
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if head == "aspp":
            self.layer5 = ASPPClassifier(self.out_channels, num_classes, summed_branches=aspp_summed_branches)
        else:
            self.layer5 = ProDAClassifier(self.out_channels, num_classes)
        self.feature_dim = self.layer5.feature_dim if feature == "aspp" else self.out_channels
        if freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
                    m.weight.requires_grad_(False)
                    m.bias.requires_grad_(False)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def train(self, mode: bool = True) -> DeepLabV2:
        """Like ``nn.Module.train`` but frozen BatchNorms stay in eval mode."""
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward_backbone(self, x: Tensor) -> Tensor:
        """x [N,3,H,W] normalised -> layer4 output [N,2048|512,h,w] (after ``bn_pretrain``), see ``output_size``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x if self.bn_pretrain is None else self.bn_pretrain(x)

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """x [N,3,H,W] -> logits [N,K,h,w] (``output_size(H, W)``), or (logits, features [N,feature_dim,h,w])."""
        f = self.forward_backbone(x)
        logits, aspp = self.layer5(f, return_features=return_features and self.feature == "aspp")
        if not return_features:
            return logits
        return logits, (aspp if self.feature == "aspp" else f)

    def param_groups(self, lr: float) -> list[dict]:
        """SGD groups: backbone at ``lr``, classifier (``layer5``, and ``bn_pretrain``) at ``10*lr``.

        Frozen parameters (BatchNorm with ``freeze_bn``) are left out so the optimiser never touches them.
        """
        head, body = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (head if name.startswith(("layer5.", "bn_pretrain.")) else body).append(p)
        return [{"params": body, "lr": lr}, {"params": head, "lr": 10 * lr}]


def zero_init_residual_(model: DeepLabV2) -> int:
    """Zero the scale of the last BatchNorm of every residual branch (``bn3`` / ``bn2``): each block starts as the
    identity, which keeps a randomly initialised deep ResNet's activations from growing with depth. In place;
    returns the number of blocks."""
    blocks = [m for m in model.modules() if isinstance(m, (Bottleneck, BasicBlock))]
    for block in blocks:
        nn.init.zeros_((block.bn3 if isinstance(block, Bottleneck) else block.bn2).weight)
    return len(blocks)


def deeplab_v2(
    num_classes: int = 19,
    backbone: str = "resnet101",
    feature: str = "aspp",
    freeze_bn: bool = True,
    head: str = "aspp",
    pre_head_bn: bool = False,
    aspp_summed_branches: int | None = None,
) -> DeepLabV2:
    """Build DeepLab-V2; see ``DeepLabV2``. ``head``/``pre_head_bn``/``aspp_summed_branches`` are for foreign
    checkpoints (ProDA, AdaptSegNet's two-branch sum); BiDA uses the defaults."""
    return DeepLabV2(num_classes, backbone, feature, freeze_bn, head, pre_head_bn, aspp_summed_branches)
