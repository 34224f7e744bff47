"""The paper's regime on the synthetic benchmark (``synth2real_paper``): a pretrained backbone whose BatchNorm stays
frozen in every stage, so no target BN statistics are ever computed; the shipped pretrained weights and their card;
the pretext domain they were trained on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides

from dass_train.checkpoint import load_backbone_weights, load_checkpoint, load_init_weights, save_backbone_weights
from dass_train.cli import main as train_main
from dass_train.config import build_config
from dass_train.data.synthetic import SyntheticConfig, ensure_dataset, render_random
from dass_train.errors import CheckpointError
from dass_train.network import deeplab_v2

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "weights" / "synth-pretrain-r18.safetensors"
SYN = SyntheticConfig(width=128, height=64, n_source=8, n_target_train=6, n_target_val=3, seed=0)


def bn_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every BatchNorm tensor of the backbone: statistics and affine parameters (layer5 has no BN)."""
    return {
        k: v
        for k, v in state.items()
        if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "weight", "bias")
        and ("bn" in k or "downsample.1" in k)
    }


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    ensure_dataset(root, SYN, progress=False)
    return root


@pytest.fixture(scope="module")
def init_file(tmp_path_factory) -> Path:
    """Backbone weights in the shipped format, from a network whose BN statistics are far from (0, 1), so a
    re-estimation on any images would move them."""
    torch.manual_seed(3)
    model = deeplab_v2(19, "resnet18", freeze_bn=False)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-2, 2)
            m.running_var.uniform_(0.5, 4)
    path = tmp_path_factory.mktemp("weights") / "init.safetensors"
    return save_backbone_weights(path, model, {"pretext": "test"})


def tiny(root: Path, out: Path, init: Path, *extra: str) -> list[str]:
    values = dict(stages__source_only_iters=3, stages__adapt_iters=4, run__val_every=2, run__log_every=1)
    # method.refresh_every=2: a second round of static labels inside the stage
    return [*tiny_overrides(root, (8, 6, 3), out, **values, method__refresh_every=2, model__init=init), *extra]


def run_paper_stages(root: Path, out: Path, init: Path, *extra: str) -> Path:
    assert train_main(["synth2real_paper", "--name", "run", *tiny(root, out, init, *extra)]) == 0
    return out / "run"


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a if not torch.equal(a[k].float(), b[k].float())]


def test_paper_preset_never_changes_a_bn_statistic(synth_root, init_file, tmp_path):
    """Source-only, static labels (two rounds), dynamic labels, the losses, validation and the diagnostics of the
    adapt stage all run; afterwards every BN tensor is still exactly the pretrained init's. Target statistics
    (AdaBN) would replace running_mean / running_var: switching them back on in the preset fails this test."""
    cfg = build_config("synth2real_paper")
    assert cfg.model.freeze_bn and not cfg.model.domain_bn
    run = run_paper_stages(synth_root, tmp_path, init_file)
    init, _ = load_backbone_weights(init_file)
    source = load_checkpoint(run / "source_only" / "last.pt")
    adapt = load_checkpoint(run / "adapt" / "last.pt")
    assert (run / "adapt" / "pseudo" / "round_01").is_dir() and (run / "adapt" / "diagnostics.json").is_file()
    assert adapt["iteration"] == 4 and all(np.isfinite(row["total"]) for row in adapt["history"])
    init_bn = bn_state(init)
    assert len(init_bn) == 4 * 20  # 20 BN layers in ResNet-18 (stem, 16 in blocks, 3 downsample)
    assert changed(init_bn, bn_state(source["model"])) == []
    assert changed(init_bn, bn_state(adapt["model"])) == []
    # ... while the convolutions did train
    assert not torch.equal(init["layer4.1.conv2.weight"], adapt["model"]["layer4.1.conv2.weight"])
    log = (run / "adapt" / "log.txt").read_text()
    assert "target BN statistics" not in log


def test_the_same_check_catches_target_statistics(synth_root, init_file, tmp_path):
    """The check above has teeth: with trainable BN and domain BN (synth2real's AdaBN), the statistics move."""
    run = run_paper_stages(synth_root, tmp_path, init_file, "model.freeze_bn=false", "model.domain_bn=true")
    init, _ = load_backbone_weights(init_file)
    adapt = load_checkpoint(run / "adapt" / "last.pt")
    moved = changed(bn_state(init), bn_state(adapt["model"]))
    assert any(k.endswith("running_mean") for k in moved)
    assert "target BN statistics re-estimated" in (run / "adapt" / "log.txt").read_text()


def test_backbone_weights_round_trip_without_pickle(init_file, tmp_path):
    state, info = load_backbone_weights(init_file)
    assert info["format"] == "dass-backbone" and info["backbone"] == "resnet18" and info["pretext"] == "test"
    assert not any(k.startswith("layer5.") for k in state)  # the classifier is relearned, as with ImageNet weights
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    model = deeplab_v2(19, "resnet18")
    head = model.layer5.conv2d_list[0].weight.clone()
    report = load_init_weights(model, init_file)
    assert "dass-backbone" in report[0]
    assert torch.equal(model.layer5.conv2d_list[0].weight, head)
    assert torch.allclose(model.state_dict()["conv1.weight"], state["conv1.weight"])
    garbage = tmp_path / "bad.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_init_weights(deeplab_v2(19, "resnet18"), garbage)
    with pytest.raises(CheckpointError, match="pretrain_backbone.py"):
        load_init_weights(deeplab_v2(19, "resnet18"), tmp_path / "missing.safetensors")


def test_shipped_backbone_and_card():
    """The weights ``synth2real_paper`` starts from are in the repository, under 50 MB, with their card."""
    assert SHIPPED.is_file(), (
        "weights/synth-pretrain-r18.safetensors is missing: python benchmarks/pretrain_backbone.py"
    )
    assert SHIPPED.stat().st_size < 50 * 2**20
    state, info = load_backbone_weights(SHIPPED)
    assert info["format"] == "dass-backbone" and info["backbone"] == "resnet18"
    assert info["generator"]["style"] == "pretrain" and info["iterations"] > 0
    assert 0.0 < info["pretext_val_miou"] <= 1.0
    card = SHIPPED.with_suffix(".md").read_text()
    assert "python benchmarks/pretrain_backbone.py" in card and f"{100 * info['pretext_val_miou']:.2f}" in card
    record = json.loads((REPO / "benchmarks" / "results" / "pretrain_backbone.json").read_text())
    assert record["sha256"] in card
    assert build_config("synth2real_paper").model.init == "weights/synth-pretrain-r18.safetensors"
    model = deeplab_v2(19, "resnet18")
    load_init_weights(model, "weights/synth-pretrain-r18.safetensors")  # relative to the repository from any cwd
    assert torch.allclose(model.state_dict()["layer1.0.bn1.running_var"], state["layer1.0.bn1.running_var"])


def test_pretext_style_is_neither_domain():
    """Each pretext image draws its own palette: the road's colour varies across images far more than in the
    game-like source (where a material keeps its colour), and it is not the source's mean colour."""
    from dass_train.data import synthetic as S

    def road_colours(style: str) -> np.ndarray:
        out = []
        for i in range(12):
            rng = S.image_rng(5, "source", i, style)
            scene = S.compose_scene(rng, 128, 64, "pretrain" if style == "pretrain" else "source")
            img = render_random(scene, rng) if style == "pretrain" else S.render_source(scene, rng)
            road = scene.labels == 0
            if road.any():
                out.append(img[road].mean(0))
        return np.array(out)

    pre, src = road_colours("pretrain"), road_colours("synth2real")
    assert pre.std(0).mean() > 3 * src.std(0).mean()
    a, b = S.image_rng(5, "source", 0, "pretrain"), S.image_rng(5, "source", 0, "pretrain")
    assert np.array_equal(
        render_random(S.compose_scene(a, 128, 64, "pretrain"), a),
        render_random(S.compose_scene(b, 128, 64, "pretrain"), b),
    )
