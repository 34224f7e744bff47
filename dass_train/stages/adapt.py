"""Stage 2, BiDA adaptation (paper section 3, Eq. 12), starting from the source-only model.

Per iteration: a labelled source batch and a target batch with static pseudo labels go through the network (one
concatenated batch with frozen BN as in the paper; two batches with ``model.domain_bn``, so the trainable BN of
from-scratch models normalises each domain by its own statistics) and ``losses.bida_losses`` composes Eq. 1-12.
Static labels (CBST) are regenerated every ``method.refresh_every`` iterations, or at the start of every round of
the authors' ``optim.schedule=rounds``. Table 4's label statistics are accumulated against target-train ground
truth where it exists (measurement only), and the feature diagnostics are measured at the end.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from dass_train import bida
from dass_train.data.domains import SizedTarget, Stream, TargetWithLabels, target_dataset, target_root
from dass_train.data.sampling import InfiniteSampler
from dass_train.data.transforms import EvalTransform, TransformConfig
from dass_train.engine import StageTrainer
from dass_train.labels import NUM_CLASSES
from dass_train.losses import bida_losses
from dass_train.pseudo_labels import generate_static_labels
from dass_train.schedules import round_length, rounds_factor
from dass_train.stages.source_only import source_stream


def target_stream(trainer: StageTrainer, with_gt: bool) -> Stream:
    """Target-train crops; labels come from a folder set later (static pseudo labels), the ground truth only for
    measurements (Table 4), never for a loss."""
    cfg, seed = trainer.cfg, trainer.cfg.run.seed
    has_gt = (target_root(cfg) / "gtFine" / "train").is_dir()
    base = target_dataset(cfg, "train", None, with_labels=with_gt and has_gt, seed=seed + 1)
    if trainer.dist.is_main:
        base.verify()
    ds = TargetWithLabels(base, trainer.train_transform(), None, with_gt=with_gt)
    sampler = InfiniteSampler(
        len(base), seed=seed + 1, rank=trainer.dist.rank, world_size=trainer.dist.world_size, with_draw=True
    )
    return trainer.stream(ds, sampler)


class AdaptStage(StageTrainer):
    stage = "adapt"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pseudo_round = -1
        self.label_stats: dict[str, Tensor] = defaultdict(lambda: torch.zeros(3, dtype=torch.float64))

    def iterations(self) -> int:
        return self.cfg.stages.adapt_iters

    # ---- schedule and label rounds -------------------------------------------------------------------------
    def refresh_interval(self) -> int:
        """Iterations between static-label regenerations: a round of the authors' schedule, or refresh_every."""
        if self.cfg.optim.schedule == "rounds":
            return round_length(self.total_iters, self.cfg.optim.rounds)
        return self.cfg.method.refresh_every

    def lr_factor(self) -> float:
        o = self.cfg.optim
        if o.schedule == "rounds":
            return rounds_factor(self.iteration, self.total_iters, o.poly_power, o.rounds, o.round_decay)
        return super().lr_factor()

    # ---- streams, state ------------------------------------------------------------------------------------
    def build_streams(self) -> None:
        self.source = source_stream(self)
        self.target = target_stream(self, with_gt=True)
        self.memory = bida.PrototypeMemory(NUM_CLASSES, self.model.feature_dim, self.cfg.method.prototype_momentum)
        self.memory.to(self.device)

    def extra_state(self) -> dict:
        return {"memory": {k: v.cpu() for k, v in self.memory.state_dict().items()}, "pseudo_round": self.pseudo_round}

    def load_extra_state(self, state: dict) -> None:
        self.memory.load_state_dict(state["memory"])
        self.pseudo_round = int(state["pseudo_round"])

    # ---- static pseudo labels ------------------------------------------------------------------------------
    def on_start(self) -> None:
        if self.pseudo_round < 0:
            self.refresh_static_labels()
        else:
            self.point_target_labels(self.pseudo_dir())

    def before_step(self) -> None:
        every = self.refresh_interval()
        if self.iteration > 0 and every and self.iteration % every == 0 and self.pseudo_round < self.iteration // every:
            self.refresh_static_labels()

    def pseudo_dir(self):
        return self.stage_dir / "pseudo" / f"round_{self.pseudo_round:02d}"

    def refresh_static_labels(self) -> None:
        if self.domain_bn():
            self.target_bn_statistics()
        self.pseudo_round += 1
        tf = EvalTransform(TransformConfig(eval_size=tuple(self.cfg.data.eval_size)), self.normalization)
        ds = SizedTarget(target_dataset(self.cfg, "train", tf, with_labels=False, seed=self.cfg.run.seed + 1))
        result = generate_static_labels(
            self.model,
            ds,
            self.pseudo_dir(),
            num_classes=NUM_CLASSES,
            portion=self.cfg.method.cbst_portion,
            image_portion=self.cfg.method.image_portion,
            excluded_classes=tuple(self.cfg.method.excluded_classes),
            device=self.device,
            dist_info=self.dist,
            amp_dtype=self.amp_dtype,
            progress=self.cfg.run.progress,
            align_corners=self.align_corners,
        )
        self.log(
            f"static labels round {self.pseudo_round}: {result.images} images, density {100 * result.density:.1f}%, "
            f"{result.images / max(result.seconds, 1e-9):.1f} img/s"
        )
        self.point_target_labels(self.pseudo_dir())

    def point_target_labels(self, directory) -> None:
        self.target.dataset.label_dir = directory
        self.target.restart(self.iteration * self.per_rank_batch())

    # ---- Eq. 12 --------------------------------------------------------------------------------------------
    def losses(self) -> dict[str, Tensor]:
        src, tgt = self.source.next(), self.target.next()
        logit_s, logit_t, f_s, f_t = self.forward_pair(src["image"], tgt["image"])
        losses, counts = bida_losses(
            logit_s,
            logit_t,
            f_s,
            f_t,
            src["label"],
            tgt["label"],
            self.memory,
            self.cfg.method,
            self.cfg.loss,
            distributed=self.dist.enabled,
            target_gt=tgt.get("gt"),
            align_corners=self.align_corners,
        )
        for key, value in counts.items():
            self.label_stats[key] += value
        return losses

    # ---- measurements --------------------------------------------------------------------------------------
    def log_window(self, window, bar) -> None:
        super().log_window(window, bar)
        if not window:
            return
        if self.writer:
            for key, counts in self.label_stats.items():
                labelled, correct, valid = counts.tolist()
                if valid:
                    self.writer.add_scalar(f"labels/{key}_density", labelled / valid, self.iteration)
                if labelled:
                    self.writer.add_scalar(f"labels/{key}_accuracy", correct / labelled, self.iteration)
        if self.label_stats:
            rows = {}
            for key, counts in self.label_stats.items():
                labelled, correct, valid = counts.tolist()
                rows[key] = {
                    "density": labelled / valid if valid else 0.0,
                    "accuracy": correct / labelled if labelled else None,
                    "pixels": valid,
                }
            self.write_json("label_stats.json", rows)

    def on_end(self) -> None:
        if self.domain_bn():
            self.target_bn_statistics()
        if self.cfg.run.diagnostics and self.dist.is_main and self.has_val_labels():
            from dass_train.diagnostics import feature_diagnostics

            report = feature_diagnostics(
                self.model, self.cfg, self.normalization, self.device, memory=self.memory, log=self.log
            )
            self.write_json("diagnostics.json", report)

    def has_val_labels(self) -> bool:
        return (target_root(self.cfg) / "gtFine" / self.cfg.data.val_split).is_dir()
