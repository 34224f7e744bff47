"""Stage 1, the paper's initial model: cross-entropy on labelled source crops (and the oracle, on target labels).

The oracle is not part of the method: it trains the same network with the same recipe on target-train labels, only
to measure how far apart the two domains are (the domain gap of the synthetic benchmark).
"""

from __future__ import annotations

from torch import Tensor

from dass_train import bida
from dass_train.data.domains import source_dataset, target_dataset
from dass_train.data.sampling import InfiniteSampler, RareClassSampler, class_stats
from dass_train.data.transforms import TransformConfig
from dass_train.engine import StageTrainer


class SourceOnlyStage(StageTrainer):
    stage = "source_only"

    def iterations(self) -> int:
        return self.cfg.stages.source_only_iters

    def base_lr(self) -> float:
        return self.cfg.stages.source_only_lr

    def batch_size(self) -> int:
        return self.cfg.stages.source_only_batch_size or self.cfg.optim.batch_size

    def transform_config(self) -> TransformConfig:
        s = self.cfg.stages
        return TransformConfig(
            s.source_only_resize_short, tuple(s.source_only_scale), tuple(s.source_only_crop), self.cfg.data.flip
        )

    def build_streams(self) -> None:
        self.source = source_stream(self)

    def losses(self) -> dict[str, Tensor]:
        return supervised_losses(self, self.source.next())


class OracleStage(SourceOnlyStage):
    stage = "oracle"

    def iterations(self) -> int:
        return self.cfg.stages.oracle_iters or self.cfg.stages.source_only_iters

    def build_streams(self) -> None:
        cfg, seed = self.cfg, self.cfg.run.seed
        base = target_dataset(cfg, "train", self.train_transform(), with_labels=True, seed=seed + 1)
        if self.dist.is_main:
            base.verify()
        sampler = InfiniteSampler(
            len(base), seed=seed + 1, rank=self.dist.rank, world_size=self.dist.world_size, with_draw=True
        )
        self.target = self.stream(base, sampler)

    def losses(self) -> dict[str, Tensor]:
        return supervised_losses(self, self.target.next())


def supervised_losses(trainer: StageTrainer, batch: dict) -> dict[str, Tensor]:
    logits, _ = trainer.forward(batch["image"])
    return {"seg": bida.segmentation_loss(logits.float(), batch["label"], align_corners=trainer.align_corners)}


def source_stream(trainer: StageTrainer):
    """Labelled source crops, drawn with rare-class sampling (paper 4.1) unless its temperature is null."""
    cfg, seed = trainer.cfg, trainer.cfg.run.seed
    rank, world = trainer.dist.rank, trainer.dist.world_size
    src = source_dataset(cfg, trainer.train_transform(), seed)
    if trainer.dist.is_main:
        src.verify()
    temperature = cfg.data.rare_class_temperature
    if temperature:
        stats = class_stats(src, progress=cfg.run.progress and trainer.dist.is_main)
        sampler = RareClassSampler(
            stats,
            temperature,
            seed=seed,
            rank=rank,
            world_size=world,
            min_pixels=cfg.data.rare_class_min_pixels,
            with_draw=True,
        )
    else:
        sampler = InfiniteSampler(len(src), seed=seed, rank=rank, world_size=world, with_draw=True)
    return trainer.stream(src, sampler)
