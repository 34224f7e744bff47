"""The training loop every stage shares: optimisation step, NaN guard, LR schedule, checkpoints, resume, validation,
logging, DDP and AMP. A stage (``dass_train/stages/``) only says what it trains on and which losses it minimises.

Engineering guarantees, tested in ``tests/test_trainer.py``:
- a resumed run continues the uninterrupted loss curve exactly (samplers, RNG, optimiser, stage state are saved);
- checkpoints are written atomically and only after a finite step with finite weights, so ``last.pt`` always holds
  the weights of the last good step;
- no checkpoint is ever chosen on target labels for a reported figure: ``last.pt`` is the last iterate, ``best.pt``
  only a convenience.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dass_train import bida
from dass_train.bn_statistics import batchnorm_layers, cumulative_bn_statistics
from dass_train.checkpoint import checkpoint_meta_default, load_checkpoint, load_init_weights, save_checkpoint
from dass_train.config import Config
from dass_train.data.domains import Stream, eval_dataset
from dass_train.data.transforms import NORMALIZATIONS, TrainTransform, TransformConfig
from dass_train.distributed import DistInfo, all_reduce_sum, barrier
from dass_train.errors import CheckpointError, ConfigError, UserError
from dass_train.evaluation import evaluate
from dass_train.labels import CLASS_NAMES, NUM_CLASSES, SYNTHIA_13, SYNTHIA_16
from dass_train.network import DeepLabV2, deeplab_v2, zero_init_residual_
from dass_train.schedules import poly_factor


class TrainingDiverged(UserError):
    """Too many consecutive non-finite losses; the last good checkpoint is left untouched."""


@dataclass
class StageResult:
    stage: str
    last: Path
    best: Path
    metrics: dict
    seconds: float


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
    if cfg.model.zero_init_residual:
        log(f"random initialisation (model.init is null), {zero_init_residual_(model)} residual branches at zero")
        return
    log("random initialisation (model.init is null)")


@torch.no_grad()
def target_bn_statistics(
    model: nn.Module, dataset: Dataset, batch: int, device: torch.device, dist_info: DistInfo, max_images: int = 256
) -> int:
    """AdaBN: set trainable BN running statistics to their average over (eval-size) target images.

    Running statistics updated with momentum during training follow random crops; inference sees whole frames, so
    domain BN re-estimates them in one cumulative pass (``bn_statistics.cumulative_bn_statistics``: at the start of
    adaptation, at each static-label refresh and at the end). Frozen BN layers are left alone. Averaged over DDP
    ranks. Returns the number of images this rank used.
    """
    mine = list(range(dist_info.rank, min(len(dataset), max_images), dist_info.world_size))
    layers = list(batchnorm_layers(model).values())
    batches = (
        torch.stack([dataset[j]["image"] for j in mine[i : i + batch]]).to(device) for i in range(0, len(mine), batch)
    )
    cumulative_bn_statistics(model, batches, layers)
    if dist_info.enabled:
        for m in layers:
            for buf in (m.running_mean, m.running_var):
                torch.distributed.all_reduce(buf)
                buf /= dist_info.world_size
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


# ------------------------------------------------------------------------------------------------------ the loop
class StageTrainer:
    """One stage of one run; ``fit()`` trains (or resumes) it and returns the checkpoint paths.

    A stage subclass sets ``stage`` and implements ``iterations``, ``build_streams`` and ``losses``; it may override
    ``base_lr``, ``batch_size``, ``transform_config``, ``lr_factor`` and the hooks ``on_start`` (after weights are
    loaded), ``before_step``, ``on_end`` (before the final validation), ``extra_state`` / ``load_extra_state``.
    """

    stage = ""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        dist_info: DistInfo,
        init_checkpoint: Path | None = None,
        teacher_checkpoint: Path | None = None,
        max_iters: int | None = None,
    ) -> None:
        self.cfg, self.dist = cfg, dist_info
        self.device = dist_info.device
        self.run_dir = Path(run_dir)
        self.stage_dir = self.run_dir / self.stage
        self.total_iters = self.iterations()
        self.max_iters = self.total_iters if max_iters is None else min(max_iters, self.total_iters)
        self.init_checkpoint, self.teacher_checkpoint = init_checkpoint, teacher_checkpoint
        self.iteration = 0
        self.best_miou = -1.0
        self.bad_steps = 0
        self.history: list[dict] = []
        self.writer = None
        self.source: Stream | None = None
        self.target: Stream | None = None
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.normalization = normalization_of(cfg)
        self.align_corners = cfg.model.align_corners

    # ---- what a stage defines ------------------------------------------------------------------------------
    def iterations(self) -> int:
        raise NotImplementedError

    def build_streams(self) -> None:
        raise NotImplementedError

    def losses(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def base_lr(self) -> float:
        return self.cfg.optim.lr

    def batch_size(self) -> int:
        return self.cfg.optim.batch_size

    def transform_config(self) -> TransformConfig:
        d = self.cfg.data
        return TransformConfig(d.resize_short, tuple(d.scale), tuple(d.crop), d.flip)

    def lr_factor(self) -> float:
        return poly_factor(self.iteration, self.total_iters, self.cfg.optim.poly_power)

    def on_start(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def on_end(self) -> None:
        pass

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ---- setup ---------------------------------------------------------------------------------------------
    def _amp_dtype(self) -> torch.dtype | None:
        if self.device.type != "cuda" or self.cfg.run.amp == "off":
            return None
        return torch.bfloat16 if self.cfg.run.amp == "bf16" else torch.float16

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            tqdm.write(f"[{self.stage}] {msg}")
            with open(self.stage_dir / "log.txt", "a") as fh:
                fh.write(msg + "\n")

    def train_transform(self) -> TrainTransform:
        return TrainTransform(self.transform_config(), self.normalization)

    def per_rank_batch(self) -> int:
        b = self.batch_size()
        if b % self.dist.world_size:
            raise ConfigError(f"batch size {b} is not divisible by the {self.dist.world_size} processes")
        return b // self.dist.world_size

    def stream(self, dataset: Dataset, sampler) -> Stream:
        return Stream(dataset, sampler, self.per_rank_batch(), self.cfg.data.num_workers, self.device)

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
        lr = self.base_lr()
        self.optimizer = torch.optim.SGD(
            self.model.param_groups(lr),
            lr=lr,
            momentum=self.cfg.optim.momentum,
            weight_decay=self.cfg.optim.weight_decay,
        )
        self.initial_lrs = [g["lr"] for g in self.optimizer.param_groups]

    # ---- forward passes ------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.cfg.run.channels_last and self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return self.ddp_model(x, return_features=True)

    def domain_bn(self) -> bool:
        return self.cfg.model.domain_bn and not self.cfg.model.freeze_bn

    def forward_pair(self, xs: Tensor, xt: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Source and target through the network: one concatenated batch (frozen BN, the paper), or with
        ``model.domain_bn`` two batches, each normalised by its own statistics, the running statistics following
        the target only."""
        n = xs.shape[0]
        if self.domain_bn():
            with bn_statistics_frozen(self.model):
                logit_s, f_s = self.forward(xs)
            logit_t, f_t = self.forward(xt)
            return logit_s, logit_t, f_s, f_t
        logits, feats = self.forward(torch.cat([xs, xt]))
        return logits[:n], logits[n:], feats[:n], feats[n:]

    def target_bn_statistics(self) -> None:
        from dass_train.data.domains import target_dataset
        from dass_train.data.transforms import EvalTransform

        tf = EvalTransform(TransformConfig(eval_size=tuple(self.cfg.data.eval_size)), self.normalization)
        ds = target_dataset(self.cfg, "train", tf, with_labels=False, seed=self.cfg.run.seed + 1)
        n = target_bn_statistics(self.model, ds, self.per_rank_batch(), self.device, self.dist)
        self.log(f"target BN statistics re-estimated on {n} target-train images (domain_bn)")

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
            align_corners=cfg.model.align_corners,
        )

    def _state(self, metrics: dict | None) -> dict:
        consumed = self.iteration * self.per_rank_batch()
        return {
            "format": "dass-checkpoint",
            "version": 1,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "meta": self._meta(metrics),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "best_miou": self.best_miou,
            "samplers": {
                "source": self.source.sampler.state_dict(consumed=consumed) if self.source else None,
                "target": self.target.sampler.state_dict(consumed=consumed) if self.target else None,
            },
            "rng": {"torch": torch.get_rng_state()},
            "history": self.history,
            **self.extra_state(),
        }

    def weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.state_dict().values() if p.is_floating_point())

    def save(self, name: str, metrics: dict | None = None) -> Path | None:
        if not self.dist.is_main:
            return None
        if not self.weights_finite():  # never replace a good checkpoint with broken weights
            self.log(f"iteration {self.iteration}: non-finite weights, {name} not written")
            return None
        return save_checkpoint(self.stage_dir / name, self._state(metrics))

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path)
        if state.get("format") != "dass-checkpoint" or "optimizer" not in state:
            raise CheckpointError(f"{path}: not a resumable dass training checkpoint")
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.best_miou = float(state["best_miou"])
        self.history = list(state.get("history", []))
        self.load_extra_state(state)
        torch.set_rng_state(state["rng"]["torch"])
        batch = self.per_rank_batch()
        for name, stream in (("source", self.source), ("target", self.target)):
            if stream is not None and state["samplers"].get(name):
                stream.sampler.load_state_dict(state["samplers"][name])
                stream.restart(self.iteration * batch)
        self.log(f"resumed from {path} at iteration {self.iteration}")

    # ---- one optimisation step -----------------------------------------------------------------------------
    def _set_lr(self) -> float:
        factor = self.lr_factor()
        for group, lr0 in zip(self.optimizer.param_groups, self.initial_lrs, strict=True):
            group["lr"] = lr0 * factor
        return self.initial_lrs[0] * factor

    def step(self) -> dict[str, float] | None:
        """One iteration; returns the loss values, or None when the step was skipped as non-finite."""
        lr = self._set_lr()
        self.model.train()
        losses = self.losses()
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
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._build_model()
        self.build_streams()
        last = self.stage_dir / "last.pt"
        if resume and last.is_file():
            self._resume(last)
        else:
            init_model(self.model, self.cfg, self.init_checkpoint, self.log)
        if self.cfg.run.tensorboard and self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.stage_dir / "tb"))
        self.on_start()

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
            self.before_step()
            out = self.step()
            bar.update(1)
            if out is not None:
                self.history.append({"it": self.iteration, **{k: round(v, 6) for k, v in out.items()}})
                for k, v in out.items():
                    window[k].append(v)
            if self.iteration % cfg.log_every == 0 or self.iteration == self.max_iters:
                self.log_window(window, bar)
                window.clear()
            if out is None:
                continue  # a skipped step writes nothing: last.pt keeps the last good step
            if cfg.val_every and self.iteration % cfg.val_every == 0 and self.iteration < self.max_iters:
                metrics = self._validate_and_keep_best()
            if cfg.ckpt_every and self.iteration % cfg.ckpt_every == 0:
                self.save("last.pt")
            if cfg.keep_every and self.iteration % cfg.keep_every == 0 and self.iteration < self.max_iters:
                self.save(f"iter_{self.iteration:06d}.pt")
        bar.close()
        self.on_end()
        metrics = self._validate_and_keep_best()
        self.save("last.pt", metrics)
        if self.device.type == "cuda":
            self.log(f"peak CUDA memory: {torch.cuda.max_memory_allocated(self.device) / 2**20:.0f} MiB")
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
            self._log_predictions()
        if miou > self.best_miou:
            self.best_miou = miou
            self.save("best.pt", metrics)
        return metrics

    @torch.no_grad()
    def _log_predictions(self, count: int = 2) -> None:
        """Image | prediction | ground truth of the first val images, in the Cityscapes palette, to TensorBoard."""
        import torch.nn.functional as F

        from dass_train.labels import colorize

        ds = eval_dataset(self.cfg, self.normalization)
        ds.keep_raw = True
        self.model.eval()
        for i in range(min(count, len(ds))):
            item = ds[i]
            logits = self.model(item["image"][None].to(self.device))
            size = item["raw"].shape[:2]
            pred = bida.upsample_logits(logits.float(), size, self.align_corners).argmax(1)[0]
            label = F.interpolate(item["label"][None, None].float(), size=size, mode="nearest")[0, 0]
            panel = np.concatenate([item["raw"], colorize(pred.cpu().numpy()), colorize(label.long().numpy())], axis=1)
            self.writer.add_image(f"val/prediction_{i}", panel, self.iteration, dataformats="HWC")
        self.model.train()

    def log_window(self, window: dict[str, list[float]], bar) -> None:
        if not window:
            return
        means = {k: sum(v) / len(v) for k, v in window.items()}
        bar.set_postfix({k: f"{v:.3f}" for k, v in means.items() if k not in ("lr",)}, refresh=False)
        if self.writer:
            for k, v in means.items():
                self.writer.add_scalar(f"train/{k}", v, self.iteration)

    def write_json(self, name: str, payload: Any) -> None:
        if self.dist.is_main:
            (self.stage_dir / name).write_text(json.dumps(payload, indent=1))


# ------------------------------------------------------------------------------------------------------ evaluation
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
        align_corners=cfg.model.align_corners,
    )
    model.train(was)
    return plain_metrics(result)


def plain_metrics(result: dict) -> dict:
    """Scores as plain Python values (checkpoints and JSON hold no numpy)."""
    return {key: _plain_value(value) for key, value in result.items() if key != "confusion"}


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
