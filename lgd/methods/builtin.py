"""The two built-in training methods (lgd.methods): the plain detector (Baseline) and LGD itself.

Baseline  lgd.method=baseline (or lgd.enabled=False): the detector alone, one SGD over its parameters
          (lgd.engine.optim.build_sgd), the shared LR schedule only.
LGD       lgd.method=lgd (the default): LGDDistiller around the detector with the top-level lgd.* knobs
          (distill_weight, use_context, stn_pool, rcnn_branch, recompute_teacher; lgd_ops backend lgd.backend or
          --ops), one SGD
          with the teacher's groups at lgd.teacher_lr (build_lgd_optimizer), the distillation warm-up and
          backbone-freeze hooks and the op report (lgd.op_report_period). docs/method.md has the method.

Neither has stages or settings of its own (their DEFAULTS are empty: LGD's knobs predate lgd.<method>).
"""
from typing import Dict

import torch.nn as nn

from ..engine.hooks import build_distill_hooks
from ..engine.op_report import OpReport
from ..engine.optim import build_lgd_optimizer
from ..modeling.distiller import LGDDistiller
from . import TrainingMethod

__all__ = ["Baseline", "LGD"]


class Baseline(TrainingMethod):
    """The stock detector trained alone: the comparison point of every method."""

    name = "baseline"

    def build(self, detector: nn.Module, checkpoints: Dict[str, str]) -> nn.Module:
        return detector


class LGD(TrainingMethod):
    """Label-guided self-distillation (LGDDistiller) configured by the top-level lgd.* keys."""

    name = "lgd"

    def build(self, detector: nn.Module, checkpoints: Dict[str, str]) -> LGDDistiller:
        lgd = self.cfg.lgd
        use_context = lgd.get("use_context", None)
        return LGDDistiller(detector, backend=self.backend, distill_weight=float(lgd.get("distill_weight", 1.0)),
                            use_context=None if use_context is None else bool(use_context),
                            stn_pool=str(lgd.get("stn_pool", "object")),
                            rcnn_branch=str(lgd.get("rcnn_branch", "detector")),
                            recompute_teacher=bool(lgd.get("recompute_teacher", False)))

    def build_optimizer(self, model: LGDDistiller, **sgd_kwargs):
        """One SGD: the student and adapter at lr, the teacher at lgd.teacher_lr (default lr)."""
        teacher_lr = self.cfg.lgd.get("teacher_lr", None)
        return build_lgd_optimizer(model, teacher_lr=None if teacher_lr is None else float(teacher_lr), **sgd_kwargs)

    def hooks(self, schedule) -> list:
        """Distillation warm-up, backbone freeze and the op report (lgd/engine/op_report.py)."""
        return build_distill_hooks(schedule) + [OpReport(int(self.cfg.lgd.get("op_report_period", 1000)))]
