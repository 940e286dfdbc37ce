"""Distillation loss (docs/method.md §4): normalized MSE between the adapted student features and the instructive
ones."""
import functools

import torch
import torch.nn as nn

import lgd_ops

from .levels import Levels, check_levels, split_levels
from .knowledge_mapper import StudentAdapter


class DistillationLoss(nn.Module):
    """loss_weight * lgd_ops.normalized_mse([F_adapt(X_l)], [X^I_l detached]) over all shared levels.

    Owns the student-side adapter F_adapt (self.adapter, trained with the student). Gradient reaches the
    adapter and, unless warmup, the student features; never the instructive features. The value is one
    mean over all levels together (docs/method.md §4); backend goes to lgd_ops.normalized_mse.
    """

    def __init__(self, channels: int = 256, *, loss_weight: float = 1.0, eps: float = 1e-5, backend: str = "auto"):
        super().__init__()
        self.channels, self.loss_weight, self.eps, self.backend = channels, loss_weight, eps, backend
        self.adapter = StudentAdapter(channels)

    def forward(self, student: Levels, instructive: Levels, *, warmup: bool = False) -> torch.Tensor:
        """student, instructive: dicts with the same keys, or lists of equal length, of [B, channels, H, W].

        warmup=True while distillation is off (the first iterations, docs/method.md §4 and §8): the student
        features are detached too, so only the adapter learns and the student is left alone.
        """
        s_levels, s_keys = split_levels(student, "DistillationLoss(student)")
        t_levels, t_keys = split_levels(instructive, "DistillationLoss(instructive)")
        if (s_keys is None) != (t_keys is None) or (s_keys is not None and set(s_keys) != set(t_keys)):
            raise ValueError(f"DistillationLoss: student and instructive must both be dicts with the same keys or "
                             f"both lists, got keys {s_keys} and {t_keys}")
        if s_keys is not None:
            t_levels = [instructive[k] for k in s_keys]
        elif len(s_levels) != len(t_levels):
            raise ValueError(f"DistillationLoss: {len(s_levels)} student levels but {len(t_levels)} instructive")
        check_levels(s_levels, self.channels, None, "DistillationLoss", "student")
        check_levels(t_levels, self.channels, s_levels[0].shape[0], "DistillationLoss", "instructive")
        adapted = [self.adapter(x.detach() if warmup else x) for x in s_levels]
        # one dtype for the op: under autocast the adapter ends in a conv (half) and X^I in a GroupNorm (float)
        dtype = functools.reduce(torch.promote_types, [x.dtype for x in adapted + t_levels])
        loss = lgd_ops.normalized_mse([x.to(dtype) for x in adapted], [t.detach().to(dtype) for t in t_levels],
                                      eps=self.eps, backend=self.backend)
        # at least fp32, like the other losses, also under autocast
        return self.loss_weight * loss.to(torch.promote_types(loss.dtype, torch.float32))
