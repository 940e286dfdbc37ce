"""The optimizer of an LGD run (docs/method.md §8): one SGD with the student's and the teacher's parameter
groups, and gradient clipping inside its step, so that detectron2's own trainers and LR hook drive it.

    optimizer = build_lgd_optimizer(model, lr=0.01, clip=GradientClip("value", 1.0))
    trainer = SimpleTrainer(model, data_loader, optimizer)   # or lgd.engine.trainer.AMPTrainer

The authors train two SGD optimizers (student + adapter, and the instructive modules) with the same
hyper-parameters but the teacher's LR; one SGD whose param groups carry those settings computes the same
update for every parameter, and value clipping is per parameter either way. Norm clipping acts on each part
(student, teacher) separately, as it did per optimizer. Each group is tagged with its part under GROUP_KEY.
"""
import dataclasses
from typing import Optional

import torch
import torch.nn as nn
from detectron2.solver.build import get_default_optimizer_params

__all__ = ["GROUP_KEY", "ClippedSGD", "GradientClip", "build_lgd_optimizer", "build_sgd"]

GROUP_KEY = "lgd_part"  # param-group key: "student" (detector + adapter F_adapt) or "teacher"


@dataclasses.dataclass(frozen=True)
class GradientClip:
    """Gradient clipping before each optimizer step.

    kind "value" (the authors' configs: detectron2's CLIP_TYPE "value", CLIP_VALUE 1.0): every gradient
    element clamped to [-value, value]. kind "norm": the gradients of each part (student, teacher) scaled so
    that their total L2 norm is at most value.
    """

    kind: str = "value"
    value: float = 1.0

    KINDS = ("value", "norm")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"GradientClip: kind must be one of {self.KINDS}, got {self.kind!r}")
        if not self.value > 0:
            raise ValueError(f"GradientClip: value must be > 0, got {self.value!r}")

    def __call__(self, param_groups):
        parts = {}
        for group in param_groups:
            parts.setdefault(group.get(GROUP_KEY), []).extend(p for p in group["params"] if p.grad is not None)
        for params in parts.values():
            if not params:
                continue
            if self.kind == "value":
                torch.nn.utils.clip_grad_value_(params, self.value)
            else:
                torch.nn.utils.clip_grad_norm_(params, self.value)


class ClippedSGD(torch.optim.SGD):
    """torch.optim.SGD that applies `clip` (a GradientClip, or None) to the gradients at the start of step().
    Under a GradScaler the gradients are already unscaled then (GradScaler.step unscales before stepping)."""

    def __init__(self, params, clip: Optional[GradientClip] = None, **kwargs):
        super().__init__(params, **kwargs)
        self.clip = clip

    def step(self, closure=None):
        if self.clip is not None:
            self.clip(self.param_groups)
        return super().step(closure)


def _groups(module: nn.Module, part: str, lr: float, weight_decay: float, weight_decay_norm: Optional[float]):
    groups = get_default_optimizer_params(module, base_lr=lr, weight_decay=weight_decay,
                                          weight_decay_norm=weight_decay if weight_decay_norm is None
                                          else weight_decay_norm)
    return [dict(group, **{GROUP_KEY: part}) for group in groups]


def build_sgd(module: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
              weight_decay_norm: Optional[float] = None, clip: Optional[GradientClip] = None) -> ClippedSGD:
    """SGD over a plain detector (baseline runs) with detectron2's parameter groups; frozen parameters are
    left out. weight_decay_norm: the decay of norm layers' parameters; None = weight_decay, as in the
    authors' configs (detectron2's later default, 0, is the option weight_decay_norm=0)."""
    return ClippedSGD(_groups(module, "student", lr, weight_decay, weight_decay_norm), clip=clip, lr=lr,
                      momentum=momentum)


def build_lgd_optimizer(model: nn.Module, lr: float, teacher_lr: Optional[float] = None, momentum: float = 0.9,
                        weight_decay: float = 1e-4, weight_decay_norm: Optional[float] = None,
                        clip: Optional[GradientClip] = None) -> ClippedSGD:
    """One SGD for an LGDDistiller: the student part (detector + adapter F_adapt) at lr, the teacher part
    (label/appearance encoders, relation adapter, knowledge mapper, an unshared instructive head:
    model.teacher_modules()) at teacher_lr (default lr); lr 0.01 for
    RetinaNet/FCOS, 0.02 for R-CNN at batch 16. Build it before any freezing: parameters with
    requires_grad=False are left out, while parameters frozen later stay in and SGD skips them while they
    have no gradient."""
    student = nn.ModuleList([model.detector, model.distill_loss])
    teacher_lr = lr if teacher_lr is None else teacher_lr
    groups = (_groups(student, "student", lr, weight_decay, weight_decay_norm)
              + _groups(model.teacher_modules(), "teacher", teacher_lr, weight_decay, weight_decay_norm))
    return ClippedSGD(groups, clip=clip, lr=lr, momentum=momentum)
