"""The public face of training: ``Trainer(cfg, stage, run_dir, dist_info, ...)`` builds one stage's trainer.

Where things live, to read next to the paper:
  dass_train/bida.py            Eq. 1-10 as small pure functions;
  dass_train/losses.py          one step's objective, Eq. 11-12, composed from them (``bida_losses``);
  dass_train/stages/            source_only (+ oracle), adapt (BiDA), distill: one small module per stage;
  dass_train/engine.py          the loop they share (NaN guard, schedule, checkpoints, resume, DDP, AMP);
  dass_train/data/domains.py    which data each domain reads; dass_train/pseudo_labels.py static labels (CBST).
"""

from __future__ import annotations

from dass_train.data.domains import (
    ensure_synthetic,
    eval_dataset,
    source_dataset,
    synthetic_settings,
    target_dataset,
)
from dass_train.engine import (
    StageResult,
    StageTrainer,
    TrainingDiverged,
    build_model,
    normalization_of,
    run_evaluation,
    target_bn_statistics,
)
from dass_train.losses import BidaStep, bida_losses, bida_step
from dass_train.schedules import poly_factor
from dass_train.stages import STAGES, make_stage

Trainer = make_stage

__all__ = [
    "STAGES",
    "BidaStep",
    "StageResult",
    "StageTrainer",
    "Trainer",
    "TrainingDiverged",
    "bida_losses",
    "bida_step",
    "build_model",
    "ensure_synthetic",
    "eval_dataset",
    "normalization_of",
    "poly_factor",
    "run_evaluation",
    "source_dataset",
    "synthetic_settings",
    "target_bn_statistics",
    "target_dataset",
]
