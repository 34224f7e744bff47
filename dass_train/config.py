"""Typed run configuration: dataclasses, preset files, ``section.key=value`` overrides.

Every value the trainer reads lives here, so a run is fully described by the resolved
``config.yaml`` saved beside its checkpoints. Presets (``presets/*.yaml``) only override
defaults; the defaults themselves are the paper's recipe (section 4.1) with the authors'
settings where the paper is silent (``official-code-facts.md``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dass_train.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class DataConfig:
    """Where the domains live and how images are augmented (paper 4.1)."""

    source: str = "gta5"  # gta5 | synthia | synthetic
    source_root: str = "data/GTA5"
    target_root: str = "data/cityscapes"
    val_split: str = "val"
    # synthetic benchmark only: generated on first use into synthetic_root
    synthetic_root: str = "data/synthetic"
    synthetic_size: tuple[int, int] = (512, 256)  # (width, height)
    synthetic_counts: tuple[int, int, int] = (600, 300, 100)  # source, target train, target val
    synthetic_style_shift: float = 0.6  # global domain-gap strength in [0, 1] (see SyntheticConfig.style_shift)
    synthetic_class_shift: float = 0.0  # road/pavement colour swap in [0, 1], off (see SyntheticConfig.class_shift)
    # synth2real: the benchmark's two domains; pretrain: the third, style-randomised domain the backbone of the
    # paper-regime preset is pretrained on (the ImageNet / COCO analogue); newcamera: the target city through a camera
    # no training sees (deployment's --adapt-bn benchmark). See SyntheticConfig.style.
    synthetic_style: str = "synth2real"
    # training transforms: resize shorter side, random scale, random crop (w, h), flip
    resize_short: int | None = 850
    scale: tuple[float, float] = (0.8, 1.2)
    crop: tuple[int, int] = (730, 730)
    flip: bool = True
    # evaluation protocol: predict at eval_size (w, h), upsample logits to the label's full size
    eval_size: tuple[int, int] = (1024, 512)
    rare_class_temperature: float | None = 0.01  # None = uniform source sampling
    # An image "contains" a class for rare-class sampling from this many pixels of it (full-resolution labels).
    # DAFormer's rare-class sampling uses 3000 on GTA5's 1914x1052 labels (0.15 % of the image); a single pixel
    # (the old behaviour) lets one stray labelled pixel make an image count as a rare-class example.
    rare_class_min_pixels: int = 3000
    num_workers: int = 4


@dataclass
class ModelConfig:
    """DeepLab-V2 and its input normalisation (travels with every checkpoint)."""

    backbone: str = "resnet101"  # resnet101 | resnet50 | resnet18
    feature: str = "aspp"  # pixel features of the contrastive loss: aspp (4K channels) | layer4
    freeze_bn: bool = True
    # Trainable BN only (models trained from scratch): normalise source and target batches separately and keep the
    # target's running statistics for inference (AdaBN / domain-specific BN). Frozen BN (the paper) ignores it.
    domain_bn: bool = False
    init: str | None = "weights/DeepLab_resnet_pretrained_init-f81d91e8.pth"  # ImageNet / COCO init; None = random
    normalization: str = "caffe"  # caffe (BGR, mean only) | imagenet (RGB, mean/std)
    # Bilinear logit upsampling, part of the model like its normalisation (saved in every checkpoint's meta):
    # the BiDA authors' network uses align_corners=True in training, pseudo labelling and evaluation.
    align_corners: bool = False
    # Random init only (init: null, trainable BN): start every residual branch at zero (its last BN scale = 0), so
    # a deep from-scratch ResNet-101 begins as a shallow net and its residual stream does not grow block by block
    # (Goyal et al., 2017). Off in every preset: the synth2real tables were measured without it.
    zero_init_residual: bool = False


@dataclass
class OptimConfig:
    """SGD with poly decay; the classifier learns 10x faster (DeepLab-V2 convention)."""

    lr: float = 7.5e-5
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    batch_size: int = 4  # per step, per domain, summed over GPUs
    grad_clip: float | None = None
    # Adaptation LR schedule. poly: one poly decay over all iterations (paper 4.1). rounds: the authors' code, which
    # splits adaptation into `rounds` equal rounds, restarts poly in each with the LR multiplied by `round_decay`
    # per round, and regenerates the static pseudo labels at the start of every round.
    schedule: str = "poly"  # poly | rounds
    rounds: int = 10
    round_decay: float = 0.5


@dataclass
class LossConfig:
    """Weights of Eq. 11-12 (authors' settings) and the contrastive temperature."""

    seg_source: float = 1.0
    seg_target: float = 0.3
    ent_source: float = 0.4
    ent_target: float = 0.12  # 0.4 x 0.3
    fcl: float = 0.1
    bcl: float = 0.1
    tau: float = 0.1
    detach_prototypes: bool = False
    # How FCL / BCL average their pixels: pixel = every labelled pixel weighs the same (Eq. 2-3 up to the crop size);
    # class = each class's mean first, then over classes (not the paper; the anchor check of docs/RESULTS.md).
    contrastive_mean: str = "pixel"  # pixel | class
    # paper: entropy of softmax(logits); authors: of softmax(softmax(logits)) (their code, nearly flat; their weights
    # 0.4 / 0.12 were tuned against it). See docs/METHOD.md "Differences from the authors' run".
    entropy: str = "paper"  # paper | authors


@dataclass
class MethodConfig:
    """Switches of Table 3, and the label machinery of sections 3.3 and CBST."""

    use_fcl: bool = True
    use_bcl: bool = True
    dynamic_labels: str = "calibrated"  # off | uncalibrated | calibrated  (Eq. 8-9, with or without Eq. 7)
    dynamic_threshold: float = 0.8  # T of Eq. 8
    # What T thresholds: cosine = s(f_T, rho_{S->T}) as Eq. 8 is written; softmax = the softmax over classes of
    # cosine / tau at the best class (the authors' code, with T = 0.8).
    dynamic_score: str = "cosine"  # cosine | softmax
    # Where prototypes (Eq. 1) are pooled for the contrastive terms and dynamic labels: over the whole batch, or per
    # (source image i, target image i) pair as the authors' code does. The EMA memory (Eq. 4-5) always takes the
    # batch prototypes.
    prototypes: str = "batch"  # batch | pair
    prototype_momentum: float = 0.99  # lambda of Eq. 4-5
    cbst_portion: float = 0.1  # class-balanced thresholds: top 10 % per class
    image_portion: float = 0.1  # fused per-image top-10 % confidence mask
    excluded_classes: tuple[int, ...] = ()  # classes that get no static pseudo labels (SYNTHIA: 9, 14, 16)
    refresh_every: int = 10000  # regenerate static pseudo labels every N iterations


@dataclass
class StageConfig:
    """Iterations of each stage; 0 skips it in ``--stage all``."""

    source_only_iters: int = 20000
    source_only_lr: float = 2.5e-4
    source_only_resize_short: int | None = 720
    source_only_scale: tuple[float, float] = (0.5, 1.5)
    source_only_crop: tuple[int, int] = (600, 600)
    source_only_batch_size: int | None = None  # None = optim.batch_size (the authors used 2)
    adapt_iters: int = 100000
    distill_iters: int = 0  # optional stage 3
    distill_lr: float = 2.5e-4
    # supervised on target labels, for the domain-gap figure only (--stage oracle; 0 = source_only_iters)
    oracle_iters: int = 0


@dataclass
class RunConfig:
    """Engineering knobs: devices, precision, logging, checkpoints, guards."""

    out: str = "runs"
    name: str = ""
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "bf16"  # off | bf16 | fp16 (CUDA only; CPU runs fp32)
    channels_last: bool = True
    cudnn_benchmark: bool = True
    threads: int = 0  # torch CPU threads, 0 = torch default
    log_every: int = 50
    val_every: int = 5000
    ckpt_every: int = 2000
    # Also keep a snapshot iter_<N>.pt every N iterations (0 = none): a shorter pretext can then be read off one run
    # (benchmarks/pretrain_backbone.py --from-checkpoint), with the caveat that its LR had not decayed yet.
    keep_every: int = 0
    val_max_images: int = 0  # 0 = all
    max_bad_steps: int = 5  # consecutive non-finite losses that stop the run
    # At the end of adaptation, measure what FCL / BCL should change in the feature space on target val (ground
    # truth only measures): see dass_train/diagnostics.py. Written to <stage>/diagnostics.json.
    diagnostics: bool = True
    tensorboard: bool = True
    progress: bool = True


@dataclass
class Config:
    preset: str = "gta2city"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    stages: StageConfig = field(default_factory=StageConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Turn a YAML / CLI value into the dataclass field's declared type, or say which option is wrong."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: cannot use {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("x", ",").split(",") if v.strip()] if value else []
        if not isinstance(value, (list, tuple)):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=True))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value) if annotation is float else int(str(value))
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
        return number
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def apply(cfg: Any, values: dict[str, Any], prefix: str = "") -> None:
    """Set nested values on a config dataclass, checking names and types."""
    hints = _hints(type(cfg))
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"unknown option '{where}' (known in this section: {known})")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{where}' is a section; set its fields like {where}.<name>=value")
            apply(current, value, prefix=f"{where}.")
        else:
            setattr(cfg, key, _coerce(value, hints[key], where))


_YAML11_WORDS = {"on", "off", "yes", "no", "y", "n"}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-4", "data.crop=512,512"]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        key, raw = item.split("=", 1)
        if raw.strip().lower() in _YAML11_WORDS:
            value: Any = raw.strip()  # "run.amp=off" means the string "off", not YAML 1.1's False
        else:
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_preset(name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset file as a nested dict; ``inherit: other`` starts from another preset (the ``*_authors`` presets
    are their paper preset plus the authors' code choices)."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset '{name}' (available: {', '.join(available_presets())}, or a .yaml path)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    parent = data.pop("inherit", None)
    if parent is not None:
        if str(parent) in _seen or str(parent) == name:
            raise ConfigError(f"{path}: 'inherit: {parent}' makes a cycle")
        data = _merge(load_preset(str(parent), (*_seen, name)), data)
    return data


def build_config(preset: str, overrides: list[str] | None = None) -> Config:
    """Defaults <- preset file <- command-line overrides."""
    cfg = Config()
    data = load_preset(preset)
    data.pop("preset", None)
    apply(cfg, data)
    cfg.preset = Path(preset).stem
    apply(cfg, parse_overrides(overrides or []))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    choices = {
        "data.source": (cfg.data.source, ("gta5", "synthia", "synthetic")),
        "data.synthetic_style": (cfg.data.synthetic_style, ("synth2real", "pretrain", "newcamera")),
        "model.backbone": (cfg.model.backbone, ("resnet101", "resnet50", "resnet18")),
        "model.feature": (cfg.model.feature, ("aspp", "layer4")),
        "model.normalization": (cfg.model.normalization, ("caffe", "imagenet")),
        "method.dynamic_labels": (cfg.method.dynamic_labels, ("off", "uncalibrated", "calibrated")),
        "method.dynamic_score": (cfg.method.dynamic_score, ("cosine", "softmax")),
        "method.prototypes": (cfg.method.prototypes, ("batch", "pair")),
        "loss.entropy": (cfg.loss.entropy, ("paper", "authors")),
        "loss.contrastive_mean": (cfg.loss.contrastive_mean, ("pixel", "class")),
        "optim.schedule": (cfg.optim.schedule, ("poly", "rounds")),
        "run.amp": (cfg.run.amp, ("off", "bf16", "fp16")),
        "run.device": (cfg.run.device, ("auto", "cpu", "cuda")),
    }
    for where, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{where}={value!r} is not one of {', '.join(allowed)}")
    if cfg.optim.batch_size < 1:
        raise ConfigError("optim.batch_size must be >= 1")
    if cfg.stages.source_only_batch_size is not None and cfg.stages.source_only_batch_size < 1:
        raise ConfigError("stages.source_only_batch_size must be >= 1 (or null for optim.batch_size)")
    if cfg.optim.rounds < 1 or not 0.0 < cfg.optim.round_decay <= 1.0:
        raise ConfigError("optim.rounds must be >= 1 and optim.round_decay in (0, 1]")
    if cfg.model.zero_init_residual and (cfg.model.freeze_bn or cfg.model.init):
        raise ConfigError(
            "model.zero_init_residual needs model.freeze_bn=false and model.init=null (a frozen zero scale would "
            "switch the residual branches off; pretrained weights replace the init)"
        )
    if cfg.data.rare_class_min_pixels < 1:
        raise ConfigError("data.rare_class_min_pixels must be >= 1")
    for name in ("synthetic_style_shift", "synthetic_class_shift"):
        if not 0.0 <= getattr(cfg.data, name) <= 1.0:
            raise ConfigError(f"data.{name}={getattr(cfg.data, name)} must be in [0, 1]")
    if not 0.0 < cfg.loss.tau:
        raise ConfigError("loss.tau must be > 0")


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    data = dict(data)
    cfg.preset = str(data.pop("preset", cfg.preset))
    apply(cfg, data)
    return cfg
