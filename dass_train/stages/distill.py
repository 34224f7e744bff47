"""Optional stage 3, self-distillation (paper 4.1, following ProDA): a fresh student learns the adapted model's soft
predictions on target crops (KL divergence) while keeping the cross-entropy on labelled source crops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dass_train import bida
from dass_train.checkpoint import load_checkpoint
from dass_train.engine import StageTrainer, build_model
from dass_train.errors import ConfigError
from dass_train.stages.adapt import target_stream
from dass_train.stages.source_only import source_stream


class DistillStage(StageTrainer):
    stage = "distill"

    def iterations(self) -> int:
        return self.cfg.stages.distill_iters

    def base_lr(self) -> float:
        return self.cfg.stages.distill_lr

    def build_streams(self) -> None:
        self.source = source_stream(self)
        self.target = target_stream(self, with_gt=False)

    def on_start(self) -> None:
        if self.teacher_checkpoint is None:
            raise ConfigError("the distill stage needs the adapted model (run the adapt stage first)")
        payload = load_checkpoint(self.teacher_checkpoint)
        teacher = build_model(self.cfg, self.device)
        teacher.load_state_dict(payload["model"], strict=True)
        self.teacher = teacher.eval().requires_grad_(False)

    def losses(self) -> dict[str, Tensor]:
        src, tgt = self.source.next(), self.target.next()
        logit_s, logit_t, _, _ = self.forward_pair(src["image"], tgt["image"])
        with (
            torch.no_grad(),
            torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None),
        ):
            teacher = self.teacher(tgt["image"]).float()
        log_p = F.log_softmax(logit_t.float(), dim=1)
        kl = F.kl_div(log_p, F.log_softmax(teacher, dim=1), log_target=True, reduction="none").sum(1).mean()
        seg = bida.segmentation_loss(logit_s.float(), src["label"], align_corners=self.align_corners)
        return {"seg_s": self.cfg.loss.seg_source * seg, "kd": kl}

    def on_end(self) -> None:
        if self.domain_bn():
            self.target_bn_statistics()
