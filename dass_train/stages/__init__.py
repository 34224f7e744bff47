"""The training stages, one module each: ``source_only`` (+ ``oracle``), ``adapt`` (BiDA), ``distill``.

Each is a small subclass of ``engine.StageTrainer`` that says what it trains on and which losses it minimises; the
loop, checkpoints and resume are shared.
"""

from __future__ import annotations

from pathlib import Path

from dass_train.config import Config
from dass_train.distributed import DistInfo
from dass_train.engine import StageTrainer
from dass_train.errors import ConfigError
from dass_train.stages.adapt import AdaptStage
from dass_train.stages.distill import DistillStage
from dass_train.stages.source_only import OracleStage, SourceOnlyStage

STAGE_CLASSES: dict[str, type[StageTrainer]] = {
    "source_only": SourceOnlyStage,
    "adapt": AdaptStage,
    "distill": DistillStage,
    "oracle": OracleStage,
}
STAGES = tuple(STAGE_CLASSES)


def make_stage(
    cfg: Config,
    stage: str,
    run_dir: Path,
    dist_info: DistInfo,
    init_checkpoint: Path | None = None,
    teacher_checkpoint: Path | None = None,
    max_iters: int | None = None,
) -> StageTrainer:
    """The trainer of one stage of one run."""
    if stage not in STAGE_CLASSES:
        raise ConfigError(f"unknown stage '{stage}' (choose from {', '.join(STAGES)})")
    return STAGE_CLASSES[stage](cfg, run_dir, dist_info, init_checkpoint, teacher_checkpoint, max_iters)


__all__ = ["STAGES", "STAGE_CLASSES", "AdaptStage", "DistillStage", "OracleStage", "SourceOnlyStage", "make_stage"]
