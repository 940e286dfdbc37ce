"""Training hooks of an LGD run on detectron2's engine.

Every schedule hook derives its state from trainer.iter in before_step (never from toggles), so a run resumed
at any iteration gets the right distillation / backbone-freeze state and learning rates at its first step:
  DistillationSchedule   model.distill_enabled = start <= iter < end             (logs lgd/distill_enabled)
  BackboneFreezeSchedule model.set_backbone_frozen(iter < backbone_freeze_iters) (logs lgd/backbone_frozen)
  LRScheduler            detectron2's, the multiplier over the schedule's length  (logs lr, lr_teacher)
IterationSeed reseeds python/numpy/torch before each step from (seed, iteration, rank), for exact resume.

Caveat: freezing toggles requires_grad, which DistributedDataParallel does not follow after it is built;
lgd-train builds DDP with find_unused_parameters=True for that reason.
"""
from typing import List

import numpy as np
import torch.nn as nn
from detectron2.engine import HookBase, hooks
from detectron2.solver import LRMultiplier
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from fvcore.common.param_scheduler import ParamScheduler

from .schedule import LGDSchedule
from .optim import GROUP_KEY

__all__ = ["BackboneFreezeSchedule", "DistillationSchedule", "IterationSeed", "LRScheduler", "build_distill_hooks",
           "build_lgd_hooks", "build_lr_hook", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model (an LGDDistiller, any training method's model) inside a (Distributed)DataParallel wrapper."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


class DistillationSchedule(HookBase):
    """Distillation on for iterations [start_iter, end_iter) (end_iter None: to the end of the run), off
    (loss_distill trains only the adapter) outside them."""

    def __init__(self, start_iter: int, end_iter=None):
        self.start_iter = int(start_iter)
        self.end_iter = None if end_iter is None else int(end_iter)

    def before_step(self):
        it = self.trainer.iter
        enabled = self.start_iter <= it and (self.end_iter is None or it < self.end_iter)
        unwrap_model(self.trainer.model).distill_enabled = enabled
        self.trainer.storage.put_scalar("lgd/distill_enabled", float(enabled), smoothing_hint=False)


class BackboneFreezeSchedule(HookBase):
    """The student's bottom-up backbone frozen before iteration freeze_iters (the FPN always trains)."""

    def __init__(self, freeze_iters: int):
        self.freeze_iters = int(freeze_iters)

    def before_step(self):
        frozen = self.trainer.iter < self.freeze_iters
        model = unwrap_model(self.trainer.model)
        if model.backbone_frozen != frozen:
            model.set_backbone_frozen(frozen)
        self.trainer.storage.put_scalar("lgd/backbone_frozen", float(frozen), smoothing_hint=False)


class LRScheduler(hooks.LRScheduler):
    """detectron2's LRScheduler hook (the ParamScheduler multiplies every param group's initial LR), with the
    multiplier spanning the schedule's max_iter rather than the trainer's, so a run stopped early or split in
    pieces keeps the same LRs, and no state of its own: the LRs are rebuilt from trainer.iter in before_train.
    Logs "lr" (the student's, detectron2's choice of group) and, in an LGD run, "lr_teacher"."""

    def __init__(self, scheduler: ParamScheduler, max_iter: int):
        if not isinstance(scheduler, ParamScheduler):
            raise ValueError(f"LRScheduler needs an fvcore ParamScheduler, got {type(scheduler).__name__}")
        super().__init__()
        self._multiplier, self._max_iter = scheduler, int(max_iter)

    def before_train(self):
        self._optimizer = self._optimizer or self.trainer.optimizer
        for group in self._optimizer.param_groups:  # resuming without a loaded optimizer state: LR is the base
            group.setdefault("initial_lr", group["lr"])
        self._scheduler = LRMultiplier(self._optimizer, self._multiplier, self._max_iter,
                                       last_iter=self.trainer.iter - 1)
        self._best_param_group_id = self.get_best_param_group_id(self._optimizer)
        self._teacher_group_id = next((i for i, g in enumerate(self._optimizer.param_groups)
                                       if g.get(GROUP_KEY) == "teacher"), None)

    def after_step(self):
        if self._teacher_group_id is not None:
            lr = self._optimizer.param_groups[self._teacher_group_id]["lr"]
            self.trainer.storage.put_scalar("lr_teacher", lr, smoothing_hint=False)
        super().after_step()

    def state_dict(self):
        return {}


def build_lr_hook(schedule: LGDSchedule) -> LRScheduler:
    """The LR schedule of any run (every training method shares it)."""
    return LRScheduler(schedule.lr_multiplier(), schedule.max_iter)


def build_distill_hooks(schedule: LGDSchedule) -> List[HookBase]:
    """LGD's own schedule hooks: distillation warm-up and end, backbone freeze (lgd.methods.builtin.LGD.hooks)."""
    end = schedule.max_iter - schedule.final_nondistill_iters if schedule.final_nondistill_iters else None
    return [DistillationSchedule(schedule.distill_start_iter, end),
            BackboneFreezeSchedule(schedule.backbone_freeze_iters)]


def build_lgd_hooks(schedule: LGDSchedule) -> List[HookBase]:
    """The schedule hooks of an LGD run (distillation warm-up, backbone freeze, LR); register them first. A
    baseline run has build_lr_hook's alone."""
    return build_distill_hooks(schedule) + [build_lr_hook(schedule)]


class IterationSeed(HookBase):
    """Reseeds python, numpy and torch before every step from (seed, iteration, rank), so the randomness a
    step draws in the main process (augmentations with num_workers=0, any model sampling) does not depend on
    what ran before it: a resumed run draws the same numbers as an uninterrupted one."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def before_step(self):
        entropy = [self.seed, self.trainer.iter, comm.get_rank()]
        seed_all_rng(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
