"""LGD training on detectron2's engine (LGD_SPEC §8): two optimizers, a trainer, and the schedule hooks.

    model = LGDDistiller(instantiate(cfg.model))
    schedule = scale_schedule(90000)                  # the paper's 1x; scale_schedule(2000) for a short run
    optimizers = build_lgd_optimizers(model, lr=0.01)   # (student + adapter, teacher)
    trainer = LGDTrainer(model, data_loader, optimizers, clip=GradientClip("value", 1.0))
    trainer.register_hooks(build_lgd_hooks(schedule) + [hooks.IterationTimer(), hooks.PeriodicWriter(...)])
    trainer.train(start_iter, schedule.max_iter)

Every schedule hook derives its state from trainer.iter in before_step (never from toggles), so a run resumed
at any iteration gets the right distillation / backbone-freeze state and learning rates at its first step:
  DistillationSchedule   model.distill_enabled = iter >= distill_start_iter      (logs lgd/distill_enabled)
  BackboneFreezeSchedule model.set_backbone_frozen(iter < backbone_freeze_iters) (logs lgd/backbone_frozen)
  MultiOptimizerLRScheduler  one detectron2 LRMultiplier per optimizer, same ParamScheduler (logs lr, lr_teacher)
detectron2's own LRScheduler hook drives one optimizer only, hence the last hook.

LGDTrainer is a SimpleTrainer: trainer.optimizer is the student optimizer (what stock hooks read),
trainer.optimizers holds both, and state_dict() carries both (so DetectionCheckpointer(..., trainer=trainer)
saves and resumes them). LGDAMPTrainer adds autocast + one GradScaler shared by the two optimizers.

Exact resume (lgd-train): ResumableTrainingSampler makes the data order a function of (seed, iteration) and
IterationSeed reseeds python/numpy/torch before each step from (seed, iteration, rank), so augmentations drawn
in the main process (num_workers=0) are too; the distiller checkpoints RetinaNet's EMA loss normalizer.

Caveat: freezing toggles requires_grad, which DistributedDataParallel does not follow after it is built;
under DDP use find_unused_parameters=True or rebuild the wrapper at the unfreeze iteration (not done here).
"""
import dataclasses
import itertools
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import HookBase, SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.solver import LRMultiplier, WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import MultiStepParamScheduler, ParamScheduler

__all__ = [
    "BackboneFreezeSchedule",
    "DistillationSchedule",
    "GradientClip",
    "IterationSeed",
    "LGDAMPTrainer",
    "LGDSchedule",
    "LGDTrainer",
    "MultiOptimizerLRScheduler",
    "ResumableTrainingSampler",
    "build_lgd_hooks",
    "build_lgd_optimizers",
    "build_sgd",
    "scale_schedule",
]


# ----------------------------------------------------------------------------------------------
# Schedule (LGD_SPEC §8)
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LGDSchedule:
    """Iteration counts of one LGD run. Iterations are 0-based: distillation is on from iteration
    distill_start_iter, the bottom-up backbone trains from iteration backbone_freeze_iters, the LR drops
    by 10 at each of steps, after a linear warm-up of warmup_iters from warmup_factor (detectron2's)."""

    max_iter: int
    steps: Tuple[int, ...]
    distill_start_iter: int
    backbone_freeze_iters: int
    warmup_iters: int = 1000
    warmup_factor: float = 0.001

    def scaled(self, max_iter: int) -> "LGDSchedule":
        """This schedule with every iteration count scaled by max_iter / self.max_iter and rounded; LR steps
        kept strictly increasing inside (0, max_iter) (very short runs lose the steps that collide)."""
        if max_iter < 1:
            raise ValueError(f"LGDSchedule.scaled: max_iter must be >= 1, got {max_iter}")
        if max_iter == self.max_iter:
            return self

        def scale(n):
            return int(round(n * max_iter / self.max_iter))

        steps = tuple(sorted({min(max(scale(s), 1), max_iter - 1) for s in self.steps})) if max_iter > 1 else ()
        return dataclasses.replace(self, max_iter=max_iter, steps=steps,
                                   distill_start_iter=scale(self.distill_start_iter),
                                   backbone_freeze_iters=scale(self.backbone_freeze_iters),
                                   warmup_iters=scale(self.warmup_iters))

    def lr_multiplier(self) -> ParamScheduler:
        """The LR multiplier over [0, max_iter) as detectron2's model-zoo configs build it."""
        values = [0.1 ** k for k in range(len(self.steps) + 1)]
        steps = MultiStepParamScheduler(values, milestones=list(self.steps) + [self.max_iter])
        return WarmupParamScheduler(steps, self.warmup_factor, self.warmup_iters / self.max_iter)


# the paper's schedules (batch 16): distillation on at 30k for both, backbone frozen 10k (1x) / 20k (2x)
PAPER_SCHEDULES = {
    "1x": LGDSchedule(90000, (60000, 80000), distill_start_iter=30000, backbone_freeze_iters=10000),
    "2x": LGDSchedule(180000, (120000, 160000), distill_start_iter=30000, backbone_freeze_iters=20000),
}


def scale_schedule(max_iter: int, base: str = "1x") -> LGDSchedule:
    """The paper's `base` schedule ("1x" or "2x") with every iteration count scaled by max_iter / its length.

    scale_schedule(90000) is the paper's 1x; scale_schedule(900) has steps (600, 800), distillation from 300,
    the backbone frozen for 100 and 10 warm-up iterations. Steps stay strictly inside (0, max_iter).
    """
    if base not in PAPER_SCHEDULES:
        raise ValueError(f"scale_schedule: base must be one of {sorted(PAPER_SCHEDULES)}, got {base!r}")
    if max_iter < 1:
        raise ValueError(f"scale_schedule: max_iter must be >= 1, got {max_iter}")
    return PAPER_SCHEDULES[base].scaled(max_iter)


# ----------------------------------------------------------------------------------------------
# Hooks
# ----------------------------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    """The LGDDistiller inside a (Distributed)DataParallel wrapper."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


class DistillationSchedule(HookBase):
    """Distillation off (loss_distill trains only the adapter) before iteration start_iter, on from it."""

    def __init__(self, start_iter: int):
        self.start_iter = int(start_iter)

    def before_step(self):
        enabled = self.trainer.iter >= self.start_iter
        _unwrap(self.trainer.model).distill_enabled = enabled
        self.trainer.storage.put_scalar("lgd/distill_enabled", float(enabled), smoothing_hint=False)


class BackboneFreezeSchedule(HookBase):
    """The student's bottom-up backbone frozen before iteration freeze_iters (the FPN always trains)."""

    def __init__(self, freeze_iters: int):
        self.freeze_iters = int(freeze_iters)

    def before_step(self):
        frozen = self.trainer.iter < self.freeze_iters
        model = _unwrap(self.trainer.model)
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


class ResumableTrainingSampler(TrainingSampler):
    """detectron2's TrainingSampler (same infinite, seeded, rank-sharded index stream) started at global
    position `start`: resuming at iteration i with start = i * total_batch_size continues the very stream an
    uninterrupted run reads, where TrainingSampler would restart it from the beginning. `seed` must be fixed
    (not None) for the stream to be reproducible across runs."""

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, start: int = 0):
        if start < 0:
            raise ValueError(f"ResumableTrainingSampler: start must be >= 0, got {start}")
        super().__init__(size, shuffle=shuffle, seed=seed)
        self._start = int(start)

    def __iter__(self):
        yield from itertools.islice(self._infinite_indices(), self._start + self._rank, None, self._world_size)


# ----------------------------------------------------------------------------------------------
# Optimizers and trainers
# ----------------------------------------------------------------------------------------------

def build_sgd(module: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
              weight_decay_norm: Optional[float] = None) -> torch.optim.SGD:
    """SGD over `module` with detectron2's parameter groups (get_default_optimizer_params); frozen parameters
    are left out. weight_decay_norm: the decay of norm layers' parameters; None = weight_decay, as in the
    authors' configs (detectron2's later default, 0, is the option weight_decay_norm=0)."""
    if weight_decay_norm is None:
        weight_decay_norm = weight_decay
    return torch.optim.SGD(get_default_optimizer_params(module, base_lr=lr, weight_decay=weight_decay,
                                                        weight_decay_norm=weight_decay_norm),
                           lr=lr, momentum=momentum)


def build_lgd_optimizers(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
                         weight_decay_norm: Optional[float] = None) -> Tuple[torch.optim.SGD, torch.optim.SGD]:
    """(student + adapter, teacher) SGD optimizers, as in the authors' code (LGD_SPEC §8): lr 0.01 for
    RetinaNet/FCOS, 0.02 for Faster R-CNN at batch 16; each a build_sgd. Build them before any freezing:
    parameters with requires_grad=False are left out, while parameters frozen later stay in and SGD skips
    them while they have no gradient."""
    model = _unwrap(model)
    student = nn.ModuleList([model.detector, model.distill_loss])
    return tuple(build_sgd(part, lr, momentum, weight_decay, weight_decay_norm) for part in (student, model.teacher))


@dataclasses.dataclass(frozen=True)
class GradientClip:
    """Gradient clipping applied to each optimizer before its step.

    kind "value" (the authors' configs: detectron2's CLIP_TYPE "value", CLIP_VALUE 1.0): every gradient
    element clamped to [-value, value], parameter by parameter. kind "norm": the optimizer's gradients scaled
    so that their total L2 norm is at most value (each optimizer separately).
    """

    kind: str = "value"
    value: float = 1.0

    KINDS = ("value", "norm")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"GradientClip: kind must be one of {self.KINDS}, got {self.kind!r}")
        if not self.value > 0:
            raise ValueError(f"GradientClip: value must be > 0, got {self.value!r}")

    def __call__(self, optimizer: torch.optim.Optimizer):
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return
        if self.kind == "value":
            torch.nn.utils.clip_grad_value_(params, self.value)
        else:
            torch.nn.utils.clip_grad_norm_(params, self.value)


class LGDTrainer(SimpleTrainer):
    """SimpleTrainer for an LGDDistiller: sums its loss dict, zeroes and steps both optimizers.

    optimizers: (student, teacher) from build_lgd_optimizers, or any sequence of optimizers.
    clip: a GradientClip applied to each optimizer before its step (None: no clipping).
    """

    def __init__(self, model: nn.Module, data_loader, optimizers: Sequence[torch.optim.Optimizer],
                 clip: Optional[GradientClip] = None):
        optimizers = list(optimizers)
        if not optimizers:
            raise ValueError("LGDTrainer needs at least one optimizer")
        super().__init__(model, data_loader, optimizers[0])
        self.optimizers = optimizers
        self.clip = clip

    def _next_data(self):
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        return data, time.perf_counter() - start

    def _zero_grad(self):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def run_step(self):
        assert self.model.training, "[LGDTrainer] model was changed to eval mode!"
        data, data_time = self._next_data()
        loss_dict = self.model(data)
        losses = sum(loss_dict.values())
        self._zero_grad()
        losses.backward()
        self._write_metrics(loss_dict, data_time)
        for opt in self.optimizers:
            if self.clip is not None:
                self.clip(opt)
            opt.step()

    def state_dict(self):
        ret = super().state_dict()  # "optimizer": the first (student) one
        ret["optimizers"] = [opt.state_dict() for opt in self.optimizers]
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for opt, sd in zip(self.optimizers, state_dict["optimizers"]):
            opt.load_state_dict(sd)


class LGDAMPTrainer(LGDTrainer):
    """LGDTrainer with autocast and one GradScaler for both optimizers (detectron2's AMPTrainer, two optimizers).

    device_type / dtype: autocast's ("cuda", float16 by default). grad_scaler: defaults to
    torch.amp.GradScaler(device_type).
    """

    def __init__(self, model, data_loader, optimizers, clip=None, grad_scaler=None,
                 device_type: str = "cuda", dtype: Optional[torch.dtype] = None):
        super().__init__(model, data_loader, optimizers, clip)
        self.device_type = device_type
        self.dtype = dtype
        self.grad_scaler = grad_scaler if grad_scaler is not None else torch.amp.GradScaler(device_type)

    def run_step(self):
        assert self.model.training, "[LGDAMPTrainer] model was changed to eval mode!"
        data, data_time = self._next_data()
        with torch.autocast(self.device_type, dtype=self.dtype):
            loss_dict = self.model(data)
            losses = sum(loss_dict.values())
        self._zero_grad()
        self.grad_scaler.scale(losses).backward()
        self._write_metrics(loss_dict, data_time)
        for opt in self.optimizers:
            if self.clip is not None:
                self.grad_scaler.unscale_(opt)
                self.clip(opt)
            self.grad_scaler.step(opt)
        self.grad_scaler.update()

    def state_dict(self):
        ret = super().state_dict()
        ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
