"""Training hooks of an LGD run on detectron2's engine.

Every schedule hook derives its state from trainer.iter in before_step (never from toggles), so a run resumed
at any iteration gets the right distillation / backbone-freeze state and learning rates at its first step:
  DistillationSchedule   model.distill_enabled = iter >= distill_start_iter      (logs lgd/distill_enabled)
  BackboneFreezeSchedule model.set_backbone_frozen(iter < backbone_freeze_iters) (logs lgd/backbone_frozen)
  MultiOptimizerLRScheduler  one detectron2 LRMultiplier per optimizer, same ParamScheduler (logs lr, lr_teacher)
IterationSeed reseeds python/numpy/torch before each step from (seed, iteration, rank), for exact resume.

Caveat: freezing toggles requires_grad, which DistributedDataParallel does not follow after it is built;
lgd-train builds DDP with find_unused_parameters=True for that reason.
"""
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from detectron2.engine import HookBase
from detectron2.solver import LRMultiplier
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from fvcore.common.param_scheduler import ParamScheduler

from .schedule import LGDSchedule

__all__ = ["BackboneFreezeSchedule", "DistillationSchedule", "IterationSeed", "MultiOptimizerLRScheduler",
           "build_lgd_hooks", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The LGDDistiller inside a (Distributed)DataParallel wrapper."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


class DistillationSchedule(HookBase):
    """Distillation off (loss_distill trains only the adapter) before iteration start_iter, on from it."""

    def __init__(self, start_iter: int):
        self.start_iter = int(start_iter)

    def before_step(self):
        enabled = self.trainer.iter >= self.start_iter
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


class MultiOptimizerLRScheduler(HookBase):
    """detectron2's LRScheduler hook for several optimizers: one LRMultiplier per optimizer, all driven by the
    same ParamScheduler (a multiplier of each param group's initial LR). The LRs are a function of
    trainer.iter only (rebuilt in before_train at trainer.iter), so there is no state to checkpoint.

    optimizers: defaults to trainer.optimizers. names: the EventStorage key of each optimizer's LR
    (default "lr" for the first, "lr_1", ... for the others; build_lgd_hooks uses "lr", "lr_teacher").
    max_iter: the length the ParamScheduler spans (default trainer.max_iter, as detectron2's hook);
    build_lgd_hooks passes the schedule's, so a run stopped early or split in pieces keeps the same LRs.
    """

    def __init__(self, scheduler: ParamScheduler, optimizers: Optional[Sequence[torch.optim.Optimizer]] = None,
                 names: Optional[Sequence[str]] = None, max_iter: Optional[int] = None):
        if not isinstance(scheduler, ParamScheduler):
            raise ValueError(f"MultiOptimizerLRScheduler needs an fvcore ParamScheduler, got {type(scheduler)}")
        self._param_scheduler = scheduler
        self._optimizers = list(optimizers) if optimizers is not None else None
        self._names = list(names) if names is not None else None
        self._max_iter = max_iter
        self.schedulers: List[LRMultiplier] = []

    def before_train(self):
        optimizers = self._optimizers if self._optimizers is not None else list(self.trainer.optimizers)
        names = self._names or ["lr"] + [f"lr_{i}" for i in range(1, len(optimizers))]
        if len(names) != len(optimizers):
            raise ValueError(f"MultiOptimizerLRScheduler: {len(names)} names for {len(optimizers)} optimizers")
        self._names = names
        self.schedulers = []
        for opt in optimizers:
            for group in opt.param_groups:  # resuming without a loaded optimizer state: current LR is the base
                group.setdefault("initial_lr", group["lr"])
            max_iter = self._max_iter if self._max_iter is not None else self.trainer.max_iter
            self.schedulers.append(LRMultiplier(opt, self._param_scheduler, max_iter,
                                                last_iter=self.trainer.iter - 1))

    def after_step(self):
        for name, sched in zip(self._names, self.schedulers):
            self.trainer.storage.put_scalar(name, sched.optimizer.param_groups[0]["lr"], smoothing_hint=False)
            sched.step()


def build_lgd_hooks(schedule: LGDSchedule, lgd_enabled: bool = True) -> List[HookBase]:
    """The three LGD schedule hooks, LR names "lr" (student) and "lr_teacher"; register them first.
    lgd_enabled=False (baseline: a plain detector, one optimizer): the LR schedule only, named "lr"."""
    if not lgd_enabled:
        return [MultiOptimizerLRScheduler(schedule.lr_multiplier(), names=["lr"], max_iter=schedule.max_iter)]
    return [DistillationSchedule(schedule.distill_start_iter), BackboneFreezeSchedule(schedule.backbone_freeze_iters),
            MultiOptimizerLRScheduler(schedule.lr_multiplier(), names=["lr", "lr_teacher"],
                                      max_iter=schedule.max_iter)]


class IterationSeed(HookBase):
    """Reseeds python, numpy and torch before every step from (seed, iteration, rank), so the randomness a
    step draws in the main process (augmentations with num_workers=0, any model sampling) does not depend on
    what ran before it: a resumed run draws the same numbers as an uninterrupted one."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def before_step(self):
        entropy = [self.seed, self.trainer.iter, comm.get_rank()]
        seed_all_rng(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
