"""The training stages: source-only (paper's initial model), BiDA adaptation, optional self-distillation.

The trainer only composes: the method lives in ``bida.py`` (Eq. 1-10), labels in ``pseudo_labels.py``, metrics in
``evaluation.py``. One BiDA step (Eq. 11-12) is ``bida_losses``; everything else is engineering: DDP, AMP,
atomic resumable checkpoints, NaN guard, logging.

Stages (``STAGES``):
  source_only  cross-entropy on labelled source crops (+ the oracle variant ``oracle`` on target labels, used only
               to measure the domain gap of the synthetic benchmark);
  adapt        Eq. 12 with static CBST labels refreshed every ``method.refresh_every`` iterations;
  distill      a fresh student learns the adapted model's soft predictions on target crops plus source labels.
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dass_train import bida
from dass_train.checkpoint import checkpoint_meta_default, load_checkpoint, load_init_weights, save_checkpoint
from dass_train.config import Config, LossConfig, MethodConfig
from dass_train.data.datasets import CityscapesDataset, GTA5Dataset, SegmentationDataset, SynthiaDataset, read_index_png
from dass_train.data.sampling import InfiniteSampler, RareClassSampler, class_stats
from dass_train.data.transforms import NORMALIZATIONS, EvalTransform, TrainTransform, TransformConfig, normalize
from dass_train.distributed import DistInfo, all_reduce_sum, barrier
from dass_train.errors import CheckpointError, ConfigError, UserError
from dass_train.evaluation import evaluate
from dass_train.labels import CLASS_NAMES, NUM_CLASSES, SYNTHIA_13, SYNTHIA_16
from dass_train.network import DeepLabV2, deeplab_v2
from dass_train.pseudo_labels import generate_static_labels, label_path

if TYPE_CHECKING:
    from dass_train.data.synthetic import SyntheticConfig

STAGES = ("source_only", "adapt", "distill", "oracle")


class TrainingDiverged(UserError):
    """Too many consecutive non-finite losses; the last good checkpoint is left untouched."""


# ------------------------------------------------------------------------------------------------------ data
def _source_dataset(cfg: Config, transforms, seed: int) -> SegmentationDataset:
    d = cfg.data
    if d.source == "gta5":
        return GTA5Dataset(d.source_root, transforms, seed=seed)
    if d.source == "synthia":
        return SynthiaDataset(d.source_root, transforms, seed=seed)
    return GTA5Dataset(Path(d.synthetic_root) / "gta5", transforms, seed=seed)


def _target_root(cfg: Config) -> Path:
    return (
        Path(cfg.data.synthetic_root) / "cityscapes" if cfg.data.source == "synthetic" else Path(cfg.data.target_root)
    )


def target_dataset(cfg: Config, split: str, transforms, with_labels: bool, seed: int = 0) -> CityscapesDataset:
    return CityscapesDataset(_target_root(cfg), split, transforms, with_labels=with_labels, seed=seed)


def eval_dataset(cfg: Config, normalization: dict) -> CityscapesDataset:
    tf = EvalTransform(TransformConfig(eval_size=tuple(cfg.data.eval_size)), normalization)
    return target_dataset(cfg, cfg.data.val_split, tf, with_labels=True)


def ensure_synthetic(cfg: Config, progress: bool = True) -> None:
    """The embedded benchmark is generated on first use (deterministic by seed, reused afterwards)."""
    if cfg.data.source != "synthetic":
        return
    from dass_train.data.synthetic import ensure_dataset

    ensure_dataset(cfg.data.synthetic_root, synthetic_settings(cfg))


def synthetic_settings(cfg: Config) -> SyntheticConfig:
    """The generator settings a run's config asks for (the generator module, with OpenCV, is imported lazily)."""
    from dass_train.data.synthetic import SyntheticConfig

    w, h = cfg.data.synthetic_size
    n_src, n_tt, n_tv = cfg.data.synthetic_counts
    return SyntheticConfig(
        width=w,
        height=h,
        n_source=n_src,
        n_target_train=n_tt,
        n_target_val=n_tv,
        seed=cfg.run.seed,
        style_shift=cfg.data.synthetic_style_shift,
        class_shift=cfg.data.synthetic_class_shift,
    )


class TargetWithLabels(Dataset):
    """Target images with a label read from ``label_dir`` (static pseudo labels, or a teacher's), plus the ground
    truth under the same augmentation when it exists (only for the Table 4 statistics, never for training)."""

    def __init__(self, base: CityscapesDataset, transform: TrainTransform, label_dir: Path | None, with_gt: bool):
        self.base, self.transform, self.label_dir = base, transform, label_dir
        self.with_gt = with_gt and base.has_labels

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, draw = int(key[0]), int(key[1])
        rng = np.random.default_rng([self.base.seed, draw, index])
        image = self.base.load_image(index)
        label = None
        if self.label_dir is not None:
            label = read_index_png(label_path(self.label_dir, self.base.names[index]), modes=("L",))
        raw, label = self.transform.augment(image, label, copy.deepcopy(rng))
        item: dict[str, Any] = {"image": normalize(raw, self.transform.normalization), "index": index}
        if label is not None:
            item["label"] = torch.from_numpy(label.astype(np.int64))
        if self.with_gt:
            _, gt = self.transform.augment(image, self.base.load_label(index), rng)
            item["gt"] = torch.from_numpy(gt.astype(np.int64))
        return item


class _Stream:
    """An endless iterator over a DataLoader driven by a resumable (index, draw) sampler."""

    def __init__(self, dataset: Dataset, sampler, batch: int, workers: int, device: torch.device):
        self.dataset, self.sampler, self.batch, self.workers, self.device = dataset, sampler, batch, workers, device
        self._it = None

    def _loader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch,
            sampler=self.sampler,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=False,
        )

    def restart(self, consumed: int) -> None:
        """Continue the stream at this rank's ``consumed``-th sample (after a resume or a label refresh)."""
        self.sampler.load_state_dict(self.sampler.state_dict(consumed=consumed))
        self._it = iter(self._loader())

    def next(self) -> dict:
        if self._it is None:
            self._it = iter(self._loader())
        batch = next(self._it)
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------------ model
def normalization_of(cfg: Config) -> dict:
    return dict(NORMALIZATIONS[cfg.model.normalization])


def build_model(cfg: Config, device: torch.device) -> DeepLabV2:
    model = deeplab_v2(NUM_CLASSES, cfg.model.backbone, feature=cfg.model.feature, freeze_bn=cfg.model.freeze_bn)
    return model.to(device)


def init_model(model: DeepLabV2, cfg: Config, init_checkpoint: Path | None, log) -> None:
    """Weights come from the previous stage's checkpoint, else the ImageNet/COCO init file, else (only if the
    preset says ``model.init: null``) random: no silent random init for the real presets."""
    if init_checkpoint is not None:
        payload = load_checkpoint(init_checkpoint)
        if payload.get("format") != "dass-checkpoint":
            raise CheckpointError(f"{init_checkpoint}: not a dass checkpoint (use dass-export --from for others)")
        model.load_state_dict(payload["model"], strict=True)
        log(
            f"initialised from {init_checkpoint} ({payload['meta'].get('stage')}, it {payload['meta'].get('iteration')})"
        )
        return
    if cfg.model.init:
        for line in load_init_weights(model, cfg.model.init):
            log(line)
        return
    log("random initialisation (model.init is null)")


def poly_factor(iteration: int, total: int, power: float) -> float:
    return (1.0 - min(iteration, total) / max(total, 1)) ** power


@torch.no_grad()
def target_bn_statistics(
    model: nn.Module, dataset: Dataset, batch: int, device: torch.device, dist_info: DistInfo, max_images: int = 256
) -> int:
    """AdaBN: set trainable BN running statistics to their average over (eval-size) target images.

    Running statistics updated with momentum during training follow random crops; inference sees whole frames, so
    domain BN re-estimates them in one cumulative pass (at the start of adaptation, at each static-label refresh
    and at the end). Averaged over DDP ranks. Returns the number of images this rank used.
    """
    mine = list(range(dist_info.rank, min(len(dataset), max_images), dist_info.world_size))
    was = model.training
    model.train()  # frozen BN layers stay in eval mode (DeepLabV2.train) and are left alone
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the pass
    for i in range(0, len(mine), batch):
        model(torch.stack([dataset[j]["image"] for j in mine[i : i + batch]]).to(device))
    for m, momentum in zip(bns, saved, strict=True):
        m.momentum = momentum
        if dist_info.enabled:
            for buf in (m.running_mean, m.running_var):
                torch.distributed.all_reduce(buf)
                buf /= dist_info.world_size
    model.train(was)
    return len(mine)


class bn_statistics_frozen:
    """Within the block, trainable BN normalises with batch statistics but leaves its running statistics alone
    (momentum 0), so a source batch does not pull the target's running statistics."""

    def __init__(self, model: nn.Module):
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]

    def __enter__(self) -> None:
        self.saved = [m.momentum for m in self.bns]
        for m in self.bns:
            m.momentum = 0.0

    def __exit__(self, *exc: object) -> None:
        for m, momentum in zip(self.bns, self.saved, strict=True):
            m.momentum = momentum


# ------------------------------------------------------------------------------------------------------ Eq. 12
def bida_losses(
    logit_s: Tensor,
    logit_t: Tensor,
    f_s: Tensor,
    f_t: Tensor,
    label_s: Tensor,
    static_t: Tensor,
    memory: bida.PrototypeMemory,
    method: MethodConfig,
    weights: LossConfig,
    distributed: bool = False,
    target_gt: Tensor | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The weighted terms of Eq. 12 for one (source, target) batch, composed from ``bida``'s equations.

    logits [N,K,h,w], features [N,C,h,w] (1/8 resolution), source labels and static target labels [N,H,W] at
    crop resolution. Updates ``memory`` (Eq. 4-5) after using it, so the bias of Eq. 6 comes from earlier batches.
    ``target_gt`` (evaluation only, never a loss) adds Table 4 counts: {name: (labelled, correct, valid)}.
    """
    logit_s, logit_t, f_s, f_t = logit_s.float(), logit_t.float(), f_s.float(), f_t.float()
    size = f_s.shape[2:]
    y_s = bida.downsample_labels(label_s, size)
    y_f = bida.downsample_labels(static_t, size)  # static labels y_F (CBST)

    rho_s, pres_s = bida.class_prototypes(f_s, y_s, NUM_CLASSES, distributed=distributed)  # Eq. 1
    if weights.detach_prototypes:
        rho_s = rho_s.detach()
    dyn_raw = dyn_cal = None
    if method.dynamic_labels == "uncalibrated" or target_gt is not None:
        dyn_raw = bida.dynamic_pseudo_labels(f_t, rho_s, pres_s, method.dynamic_threshold)  # Eq. 8-9 on rho_S
    if method.dynamic_labels == "calibrated" or target_gt is not None:
        rho_cal = memory.calibrate(rho_s.detach())  # Eq. 6-7
        dyn_cal = bida.dynamic_pseudo_labels(f_t, rho_cal, pres_s, method.dynamic_threshold)  # Eq. 8-9
    y_d = {"off": None, "uncalibrated": dyn_raw, "calibrated": dyn_cal}[method.dynamic_labels]
    y_t = y_f if y_d is None else bida.hybrid_pseudo_labels(y_d, y_f)  # Eq. 10
    rho_t, pres_t = bida.class_prototypes(f_t, y_t, NUM_CLASSES, distributed=distributed)  # Eq. 1
    if weights.detach_prototypes:
        rho_t = rho_t.detach()
    memory.update(rho_s, pres_s, rho_t, pres_t)  # Eq. 4-5

    losses = {  # Eq. 11
        "seg_s": weights.seg_source * bida.segmentation_loss(logit_s, label_s),
        "seg_t": weights.seg_target * bida.segmentation_loss(logit_t, static_t),
        "ent_s": weights.ent_source * bida.entropy_loss(logit_s),
        "ent_t": weights.ent_target * bida.entropy_loss(logit_t),
    }
    if method.use_fcl:
        losses["fcl"] = weights.fcl * bida.contrastive_loss(f_t, y_t, rho_s, pres_s, weights.tau)  # Eq. 2
    if method.use_bcl:
        losses["bcl"] = weights.bcl * bida.contrastive_loss(f_s, y_s, rho_t, pres_t, weights.tau)  # Eq. 3
    counts: dict[str, Tensor] = {}
    if target_gt is not None:
        gt = bida.downsample_labels(target_gt, size)
        labels = {
            "static": y_f,
            "dyn_raw": dyn_raw,
            "dyn_cal": dyn_cal,
            "hybrid": bida.hybrid_pseudo_labels(dyn_cal, y_f),
        }
        for key, lab in labels.items():
            counts[key] = torch.tensor(bida.pseudo_label_counts(lab, gt), dtype=torch.float64)
    return losses, counts


# ------------------------------------------------------------------------------------------------------ trainer
@dataclass
class StageResult:
    stage: str
    last: Path
    best: Path
    metrics: dict
    seconds: float


class Trainer:
    """One stage of one run; ``fit()`` trains (or resumes) it and returns the checkpoint paths."""

    def __init__(
        self,
        cfg: Config,
        stage: str,
        run_dir: Path,
        dist_info: DistInfo,
        init_checkpoint: Path | None = None,
        teacher_checkpoint: Path | None = None,
        max_iters: int | None = None,
    ) -> None:
        if stage not in STAGES:
            raise ConfigError(f"unknown stage '{stage}' (choose from {', '.join(STAGES)})")
        self.cfg, self.stage, self.dist = cfg, stage, dist_info
        self.device = dist_info.device
        self.run_dir = Path(run_dir)
        self.stage_dir = self.run_dir / stage
        self.total_iters = self._stage_iters()
        self.max_iters = self.total_iters if max_iters is None else min(max_iters, self.total_iters)
        self.init_checkpoint, self.teacher_checkpoint = init_checkpoint, teacher_checkpoint
        self.iteration = 0
        self.best_miou = -1.0
        self.bad_steps = 0
        self.pseudo_round = -1
        self.history: list[dict] = []
        self.label_stats = defaultdict(lambda: torch.zeros(3, dtype=torch.float64))
        self.writer = None
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.normalization = normalization_of(cfg)

    # ---- setup ---------------------------------------------------------------------------------------------
    def _stage_iters(self) -> int:
        s = self.cfg.stages
        return {
            "source_only": s.source_only_iters,
            "adapt": s.adapt_iters,
            "distill": s.distill_iters,
            "oracle": s.oracle_iters,
        }[self.stage]

    def _base_lr(self) -> float:
        s = self.cfg.stages
        return {"source_only": s.source_only_lr, "oracle": s.source_only_lr, "distill": s.distill_lr}.get(
            self.stage, self.cfg.optim.lr
        )

    def _amp_dtype(self) -> torch.dtype | None:
        if self.device.type != "cuda" or self.cfg.run.amp == "off":
            return None
        return torch.bfloat16 if self.cfg.run.amp == "bf16" else torch.float16

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            tqdm.write(f"[{self.stage}] {msg}")
            with open(self.stage_dir / "log.txt", "a") as fh:
                fh.write(msg + "\n")

    def _train_transform(self) -> TrainTransform:
        d, s = self.cfg.data, self.cfg.stages
        if self.stage in ("source_only", "oracle"):
            tc = TransformConfig(
                s.source_only_resize_short, tuple(s.source_only_scale), tuple(s.source_only_crop), d.flip
            )
        else:
            tc = TransformConfig(d.resize_short, tuple(d.scale), tuple(d.crop), d.flip)
        return TrainTransform(tc, self.normalization)

    def _per_rank_batch(self) -> int:
        b = self.cfg.optim.batch_size
        if b % self.dist.world_size:
            raise ConfigError(f"optim.batch_size={b} is not divisible by the {self.dist.world_size} processes")
        return b // self.dist.world_size

    def _build_streams(self) -> None:
        cfg, seed = self.cfg, self.cfg.run.seed
        tf = self._train_transform()
        rank, world = self.dist.rank, self.dist.world_size
        workers = cfg.data.num_workers
        batch = self._per_rank_batch()
        self.source = None
        self.target = None
        if self.stage != "oracle":
            src = _source_dataset(cfg, tf, seed)
            if self.dist.is_main:
                src.verify()
            temperature = cfg.data.rare_class_temperature
            stats = class_stats(src, progress=cfg.run.progress and self.dist.is_main) if temperature else None
            sampler = (
                RareClassSampler(stats, temperature, seed=seed, rank=rank, world_size=world, with_draw=True)
                if stats is not None
                else InfiniteSampler(len(src), seed=seed, rank=rank, world_size=world, with_draw=True)
            )
            self.source = _Stream(src, sampler, batch, workers, self.device)
        if self.stage in ("adapt", "distill", "oracle"):
            base = target_dataset(
                cfg, "train", None, with_labels=self.stage == "oracle" or self._has_target_gt(), seed=seed + 1
            )
            if self.dist.is_main:
                base.verify()
            if self.stage == "oracle":
                base.transforms = tf
                ds: Dataset = base
            else:
                ds = TargetWithLabels(base, tf, None, with_gt=self.stage == "adapt")
            sampler = InfiniteSampler(len(base), seed=seed + 1, rank=rank, world_size=world, with_draw=True)
            self.target = _Stream(ds, sampler, batch, workers, self.device)

    def _has_target_gt(self) -> bool:
        return (_target_root(self.cfg) / "gtFine" / "train").is_dir()

    def _build_model(self) -> None:
        self.model = build_model(self.cfg, self.device)
        if self.cfg.run.channels_last and self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ddp_model: nn.Module = self.model
        if self.dist.enabled:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
                find_unused_parameters=False,
            )
        lr = self._base_lr()
        self.optimizer = torch.optim.SGD(
            self.model.param_groups(lr),
            lr=lr,
            momentum=self.cfg.optim.momentum,
            weight_decay=self.cfg.optim.weight_decay,
        )
        self.initial_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.memory = bida.PrototypeMemory(NUM_CLASSES, self.model.feature_dim, self.cfg.method.prototype_momentum)
        self.memory.to(self.device)
        self.teacher = None

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def _meta(self, metrics: dict | None = None) -> dict:
        cfg = self.cfg
        return checkpoint_meta_default(
            num_classes=NUM_CLASSES,
            backbone=cfg.model.backbone,
            feature=cfg.model.feature,
            normalization=self.normalization,
            class_names=list(CLASS_NAMES),
            stage=self.stage,
            iteration=self.iteration,
            config=cfg.to_dict(),
            metrics=metrics,
            benchmark=cfg.preset,
            freeze_bn=cfg.model.freeze_bn,
        )

    def _state(self, metrics: dict | None) -> dict:
        batch = self._per_rank_batch()
        consumed = self.iteration * batch
        return {
            "format": "dass-checkpoint",
            "version": 1,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "meta": self._meta(metrics),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "memory": {k: v.cpu() for k, v in self.memory.state_dict().items()},
            "iteration": self.iteration,
            "best_miou": self.best_miou,
            "pseudo_round": self.pseudo_round,
            "samplers": {
                "source": self.source.sampler.state_dict(consumed=consumed) if self.source else None,
                "target": self.target.sampler.state_dict(consumed=consumed) if self.target else None,
            },
            "rng": {"torch": torch.get_rng_state()},
            "history": self.history,
        }

    def save(self, name: str, metrics: dict | None = None) -> Path | None:
        if not self.dist.is_main:
            return None
        return save_checkpoint(self.stage_dir / name, self._state(metrics))

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path)
        if state.get("format") != "dass-checkpoint" or "optimizer" not in state:
            raise CheckpointError(f"{path}: not a resumable dass training checkpoint")
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.memory.load_state_dict(state["memory"])
        self.iteration = int(state["iteration"])
        self.best_miou = float(state["best_miou"])
        self.pseudo_round = int(state["pseudo_round"])
        self.history = list(state.get("history", []))
        torch.set_rng_state(state["rng"]["torch"])
        batch = self._per_rank_batch()
        for name, stream in (("source", self.source), ("target", self.target)):
            if stream is not None and state["samplers"].get(name):
                stream.sampler.load_state_dict(state["samplers"][name])
                stream.restart(self.iteration * batch)
        self.log(f"resumed from {path} at iteration {self.iteration}")

    # ---- static pseudo labels ------------------------------------------------------------------------------
    def _refresh_static_labels(self) -> None:
        if self._domain_bn():
            self._target_bn_statistics()
        self.pseudo_round += 1
        directory = self.stage_dir / "pseudo" / f"round_{self.pseudo_round:02d}"
        tf = EvalTransform(TransformConfig(eval_size=tuple(self.cfg.data.eval_size)), self.normalization)
        ds = _SizedTarget(target_dataset(self.cfg, "train", tf, with_labels=False, seed=self.cfg.run.seed + 1))
        result = generate_static_labels(
            self.model,
            ds,
            directory,
            num_classes=NUM_CLASSES,
            portion=self.cfg.method.cbst_portion,
            image_portion=self.cfg.method.image_portion,
            excluded_classes=tuple(self.cfg.method.excluded_classes),
            device=self.device,
            dist_info=self.dist,
            amp_dtype=self.amp_dtype,
            progress=self.cfg.run.progress,
        )
        self.log(
            f"static labels round {self.pseudo_round}: {result.images} images, density {100 * result.density:.1f}%, "
            f"{result.images / max(result.seconds, 1e-9):.1f} img/s"
        )
        self._point_target_labels(directory)

    def _target_bn_statistics(self) -> None:
        tf = EvalTransform(TransformConfig(eval_size=tuple(self.cfg.data.eval_size)), self.normalization)
        ds = target_dataset(self.cfg, "train", tf, with_labels=False, seed=self.cfg.run.seed + 1)
        n = target_bn_statistics(self.model, ds, self._per_rank_batch(), self.device, self.dist)
        self.log(f"target BN statistics re-estimated on {n} target-train images (domain_bn)")

    def _point_target_labels(self, directory: Path) -> None:
        ds = self.target.dataset
        ds.label_dir = directory
        self.target.restart(self.iteration * self._per_rank_batch())

    def _current_pseudo_dir(self) -> Path:
        return self.stage_dir / "pseudo" / f"round_{self.pseudo_round:02d}"

    # ---- losses (Eq. 11-12) ---------------------------------------------------------------------------------
    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.cfg.run.channels_last and self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return self.ddp_model(x, return_features=True)

    def _domain_bn(self) -> bool:
        return self.cfg.model.domain_bn and not self.cfg.model.freeze_bn

    def _forward_pair(self, xs: Tensor, xt: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Source and target through the network: one concatenated batch, or with ``model.domain_bn`` two batches,
        each normalised by its own statistics, the running statistics following the target only."""
        n = xs.shape[0]
        if self._domain_bn():
            with bn_statistics_frozen(self.model):
                logit_s, f_s = self._forward(xs)
            logit_t, f_t = self._forward(xt)
            return logit_s, logit_t, f_s, f_t
        logits, feats = self._forward(torch.cat([xs, xt]))
        return logits[:n], logits[n:], feats[:n], feats[n:]

    def _supervised_losses(self, batch: dict) -> dict[str, Tensor]:
        logits, _ = self._forward(batch["image"])
        return {"seg": bida.segmentation_loss(logits.float(), batch["label"])}

    def _adapt_losses(self, src: dict, tgt: dict) -> dict[str, Tensor]:
        n = src["image"].shape[0]
        logits, feats = self._forward(torch.cat([src["image"], tgt["image"]]))
        losses, counts = bida_losses(
            logits[:n],
            logits[n:],
            feats[:n],
            feats[n:],
            src["label"],
            tgt["label"],
            self.memory,
            self.cfg.method,
            self.cfg.loss,
            distributed=self.dist.enabled,
            target_gt=tgt.get("gt"),
        )
        for key, value in counts.items():
            self.label_stats[key] += value
        return losses

    def _distill_losses(self, src: dict, tgt: dict) -> dict[str, Tensor]:
        """Self-distillation: KL to the adapted teacher's softmax on target crops, cross-entropy on source."""
        logit_s, logit_t, _, _ = self._forward_pair(src["image"], tgt["image"])
        with (
            torch.no_grad(),
            torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None),
        ):
            teacher = self.teacher(tgt["image"]).float()
        log_p = F.log_softmax(logit_t.float(), dim=1)
        kl = F.kl_div(log_p, F.log_softmax(teacher, dim=1), log_target=True, reduction="none").sum(1).mean()
        return {"seg_s": self.cfg.loss.seg_source * bida.segmentation_loss(logit_s.float(), src["label"]), "kd": kl}

    def _losses(self) -> dict[str, Tensor]:
        if self.stage == "source_only":
            return self._supervised_losses(self.source.next())
        if self.stage == "oracle":
            return self._supervised_losses(self.target.next())
        src, tgt = self.source.next(), self.target.next()
        if self.stage == "adapt":
            return self._adapt_losses(src, tgt)
        return self._distill_losses(src, tgt)

    # ---- one optimisation step -----------------------------------------------------------------------------
    def _set_lr(self) -> float:
        factor = poly_factor(self.iteration, self.total_iters, self.cfg.optim.poly_power)
        for group, lr0 in zip(self.optimizer.param_groups, self.initial_lrs, strict=True):
            group["lr"] = lr0 * factor
        return self.initial_lrs[0] * factor

    def step(self) -> dict[str, float] | None:
        """One iteration; returns the loss values, or None when the step was skipped as non-finite."""
        lr = self._set_lr()
        self.model.train()
        losses = self._losses()
        total = torch.stack(list(losses.values())).sum()
        finite = torch.isfinite(total).float()
        all_reduce_sum(finite)  # every rank skips together, so DDP stays in step
        if finite.item() < self.dist.world_size:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            self.log(
                f"iteration {self.iteration}: non-finite loss ({float(total.detach()):.4g}), step skipped "
                f"({self.bad_steps}/{self.cfg.run.max_bad_steps})"
            )
            if self.bad_steps >= self.cfg.run.max_bad_steps:
                raise TrainingDiverged(
                    f"{self.bad_steps} consecutive non-finite losses at iteration {self.iteration}: stopping; the last "
                    f"good checkpoint is {self.stage_dir / 'last.pt'} (try a lower optim.lr or run.amp=off)"
                )
            self.iteration += 1
            return None
        self.bad_steps = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.iteration += 1
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["total"] = float(total.detach())
        out["lr"] = lr
        return out

    # ---- evaluation ----------------------------------------------------------------------------------------
    def validate(self) -> dict:
        ds = eval_dataset(self.cfg, self.normalization)
        if self.cfg.run.val_max_images:
            ds = torch.utils.data.Subset(ds, range(min(len(ds), self.cfg.run.val_max_images)))
        result = run_evaluation(self.model, ds, self.cfg, self.device, self.dist, progress=False)
        self.model.train()
        return result

    # ---- the loop ------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> StageResult:
        start = time.perf_counter()
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        torch.manual_seed(self.cfg.run.seed)  # the same random init (synthetic preset) on every rank and every rerun
        np.random.seed(self.cfg.run.seed)
        self._build_model()
        self._build_streams()
        last = self.stage_dir / "last.pt"
        if resume and last.is_file():
            self._resume(last)
        else:
            init_model(self.model, self.cfg, self.init_checkpoint, self.log)
        if self.stage == "distill":
            self._load_teacher()
        if self.cfg.run.tensorboard and self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.stage_dir / "tb"))
        if self.stage == "adapt":
            if self.pseudo_round < 0:
                self._refresh_static_labels()
            else:
                self._point_target_labels(self._current_pseudo_dir())
        elif self.stage == "distill":
            self.target.dataset.label_dir = None

        cfg = self.cfg.run
        bar = tqdm(
            total=self.max_iters,
            initial=self.iteration,
            desc=self.stage,
            unit="it",
            disable=not (cfg.progress and self.dist.is_main),
            dynamic_ncols=True,
        )
        window: dict[str, list[float]] = defaultdict(list)
        metrics: dict = {}
        while self.iteration < self.max_iters:
            if (
                self.stage == "adapt"
                and self.iteration > 0
                and self.cfg.method.refresh_every
                and self.iteration % self.cfg.method.refresh_every == 0
                and self.pseudo_round < self.iteration // self.cfg.method.refresh_every
            ):
                self._refresh_static_labels()
            out = self.step()
            bar.update(1)
            if out is not None:
                self.history.append({"it": self.iteration, **{k: round(v, 6) for k, v in out.items()}})
                for k, v in out.items():
                    window[k].append(v)
            if self.iteration % cfg.log_every == 0 or self.iteration == self.max_iters:
                self._log_window(window, bar)
                window.clear()
            if cfg.val_every and self.iteration % cfg.val_every == 0 and self.iteration < self.max_iters:
                metrics = self._validate_and_keep_best()
            if cfg.ckpt_every and self.iteration % cfg.ckpt_every == 0:
                self.save("last.pt")
        bar.close()
        if self.stage in ("adapt", "distill") and self._domain_bn():
            self._target_bn_statistics()
        metrics = self._validate_and_keep_best()
        self.save("last.pt", metrics)
        if self.writer:
            self.writer.close()
        barrier()
        best = self.stage_dir / "best.pt"
        return StageResult(self.stage, last, best if best.is_file() else last, metrics, time.perf_counter() - start)

    def _validate_and_keep_best(self) -> dict:
        metrics = self.validate()
        miou = metrics["miou"]
        self.log(f"iteration {self.iteration}: target val mIoU {100 * miou:.2f}")
        if self.writer:
            self.writer.add_scalar("val/miou", miou, self.iteration)
            for name, iou in zip(CLASS_NAMES, metrics["iou"], strict=True):
                if not math.isnan(iou):
                    self.writer.add_scalar(f"val_iou/{name}", iou, self.iteration)
        if self.writer:
            self._log_predictions()
        if miou > self.best_miou:
            self.best_miou = miou
            self.save("best.pt", metrics)
        return metrics

    @torch.no_grad()
    def _log_predictions(self, count: int = 2) -> None:
        """Image | prediction | ground truth of the first val images, in the Cityscapes palette, to TensorBoard."""
        from dass_train.labels import colorize

        ds = eval_dataset(self.cfg, self.normalization)
        ds.keep_raw = True
        self.model.eval()
        for i in range(min(count, len(ds))):
            item = ds[i]
            logits = self.model(item["image"][None].to(self.device))
            size = item["raw"].shape[:2]
            pred = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False).argmax(1)[0]
            label = F.interpolate(item["label"][None, None].float(), size=size, mode="nearest")[0, 0]
            panel = np.concatenate([item["raw"], colorize(pred.cpu().numpy()), colorize(label.long().numpy())], axis=1)
            self.writer.add_image(f"val/prediction_{i}", panel, self.iteration, dataformats="HWC")
        self.model.train()

    def _log_window(self, window: dict[str, list[float]], bar) -> None:
        if not window:
            return
        means = {k: sum(v) / len(v) for k, v in window.items()}
        bar.set_postfix({k: f"{v:.3f}" for k, v in means.items() if k not in ("lr",)}, refresh=False)
        if self.writer:
            for k, v in means.items():
                self.writer.add_scalar(f"train/{k}", v, self.iteration)
            for key, counts in self.label_stats.items():
                labelled, correct, valid = counts.tolist()
                if valid:
                    self.writer.add_scalar(f"labels/{key}_density", labelled / valid, self.iteration)
                if labelled:
                    self.writer.add_scalar(f"labels/{key}_accuracy", correct / labelled, self.iteration)
        if self.label_stats and self.dist.is_main:
            self._write_label_stats()

    def _write_label_stats(self) -> None:
        import json

        rows = {}
        for key, counts in self.label_stats.items():
            labelled, correct, valid = counts.tolist()
            rows[key] = {
                "density": labelled / valid if valid else 0.0,
                "accuracy": correct / labelled if labelled else None,
                "pixels": valid,
            }
        (self.stage_dir / "label_stats.json").write_text(json.dumps(rows, indent=1))

    def _load_teacher(self) -> None:
        if self.teacher_checkpoint is None:
            raise ConfigError("the distill stage needs the adapted model (run the adapt stage first)")
        payload = load_checkpoint(self.teacher_checkpoint)
        teacher = build_model(self.cfg, self.device)
        teacher.load_state_dict(payload["model"], strict=True)
        self.teacher = teacher.eval().requires_grad_(False)


class _SizedTarget(Dataset):
    """Eval-transformed target images plus the full size the pseudo label must have (the image's own)."""

    def __init__(self, base: CityscapesDataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        with Image.open(self.base.image_files[i]) as im:
            item["full_size"] = im.size
        return item


def run_evaluation(
    model: nn.Module,
    dataset: Dataset,
    cfg: Config,
    device: torch.device,
    dist_info: DistInfo,
    flip: bool = False,
    scales: tuple[float, ...] = (1.0,),
    progress: bool = True,
) -> dict:
    """The standard protocol on target val: mIoU over 19 classes (+16 / 13 for SYNTHIA)."""
    if dist_info.enabled:
        dataset = torch.utils.data.Subset(dataset, range(dist_info.rank, len(dataset), dist_info.world_size))
    loader = DataLoader(dataset, batch_size=1, num_workers=min(2, cfg.data.num_workers))
    subsets = {"miou16": SYNTHIA_16, "miou13": SYNTHIA_13} if cfg.data.source == "synthia" else {}
    was = model.training
    model.eval()
    result = evaluate(
        model,
        loader,
        num_classes=NUM_CLASSES,
        device=device,
        eval_size=None,
        flip=flip,
        scales=scales,
        amp=device.type == "cuda" and cfg.run.amp != "off",
        progress=progress and dist_info.is_main,
        class_subsets=subsets,
    )
    model.train(was)
    return plain_metrics(result)


def plain_metrics(result: dict) -> dict:
    """Scores as plain Python values (checkpoints and JSON hold no numpy)."""
    out: dict = {}
    for key, value in result.items():
        if key == "confusion":
            continue
        out[key] = _plain_value(value)
    return out


def _plain_value(value):
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain_value(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return value


__all__ = [
    "STAGES",
    "StageResult",
    "Trainer",
    "TrainingDiverged",
    "bida_losses",
    "run_evaluation",
    "target_bn_statistics",
]
