"""Typed config: presets, overrides, validation, the resolved config round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dass_train.config import available_presets, build_config, config_from_dict, save_config
from dass_train.errors import ConfigError


def test_presets_follow_the_paper_recipe():
    assert {"gta2city", "synthia2city", "synth2real"} <= set(available_presets())
    cfg = build_config("gta2city")
    assert cfg.model.backbone == "resnet101" and cfg.model.freeze_bn and cfg.model.normalization == "caffe"
    assert cfg.optim.lr == 7.5e-5 and cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 5e-4
    assert cfg.optim.batch_size == 4 and cfg.stages.adapt_iters == 100000 and cfg.method.refresh_every == 10000
    assert cfg.data.crop == (730, 730) and cfg.data.scale == (0.8, 1.2) and cfg.data.resize_short == 850
    assert (cfg.loss.seg_target, cfg.loss.ent_source, cfg.loss.fcl, cfg.loss.bcl, cfg.loss.tau) == (
        0.3,
        0.4,
        0.1,
        0.1,
        0.1,
    )
    assert build_config("synthia2city").method.excluded_classes == (9, 14, 16)


def test_overrides_are_typed():
    cfg = build_config(
        "synth2real",
        [
            "optim.lr=1e-3",
            "data.crop=320,160",
            "model.init=null",
            "run.amp=off",
            "method.use_bcl=false",
            "data.rare_class_temperature=none",
        ],
    )
    assert cfg.optim.lr == 1e-3 and cfg.data.crop == (320, 160) and cfg.model.init is None
    assert cfg.method.use_bcl is False and cfg.data.rare_class_temperature is None and cfg.run.amp == "off"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown option 'optim.lrr'"),
        ("optim.lr=fast", "optim.lr"),
        ("data.crop=1,2,3", "data.crop"),
        ("model.backbone=vgg16", "model.backbone"),
        ("optim=3", "'optim' is a section"),
        ("nokey", "not of the form"),
        ("data.synthetic_style_shift=1.5", "data.synthetic_style_shift=1.5 must be in"),
        ("loss.contrastive_mean=median", "loss.contrastive_mean='median' is not one of pixel, class"),
    ],
)
def test_bad_overrides_name_the_option(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config("synth2real", [override])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'gta3city'"):
        build_config("gta3city")


def test_resolved_config_round_trip(tmp_path):
    cfg = build_config("synthia2city", ["stages.adapt_iters=123"])
    save_config(cfg, tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg and again.stages.adapt_iters == 123


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("paper", ["gta2city", "synthia2city"])
def test_authors_presets_differ_from_the_paper_presets_exactly_where_documented(paper):
    from dass_train.config import build_config

    a = _flat(build_config(f"{paper}_authors").to_dict())
    p = _flat(build_config(paper).to_dict())
    changed = {k for k in a if a[k] != p[k]}
    assert changed == {
        "preset",
        "data.rare_class_temperature",
        "model.align_corners",
        "optim.batch_size",
        "optim.schedule",
        "loss.entropy",
        "method.dynamic_score",
        "method.dynamic_threshold",
        "method.prototypes",
        "stages.source_only_lr",
        "stages.source_only_batch_size",
    }
    table = (Path(__file__).resolve().parents[1] / "docs" / "METHOD.md").read_text()
    for key in changed - {"preset"}:
        assert f"`{key}`" in table, f"docs/METHOD.md's difference table lacks {key}"


def test_preset_inheritance_cycle_is_one_line_error(tmp_path):
    from dass_train.config import build_config

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"inherit: {b}\n")
    b.write_text(f"inherit: {a}\n")
    with pytest.raises(ConfigError, match="cycle"):
        build_config(str(a))


@pytest.mark.parametrize("override", ["model.freeze_bn=true", "model.init=weights/r101.pth"])
def test_zero_init_residual_only_for_random_init_with_trainable_bn(override):
    assert build_config("synth2real", ["model.zero_init_residual=true"]).model.zero_init_residual
    with pytest.raises(ConfigError, match="model.zero_init_residual needs model.freeze_bn=false and model.init=null"):
        build_config("synth2real", ["model.zero_init_residual=true", override])
