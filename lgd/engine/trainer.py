"""Optimizers and trainers of an LGD run (docs/method.md §8) on detectron2's SimpleTrainer.

    model = LGDDistiller(instantiate(cfg.model))
    optimizers = build_lgd_optimizers(model, lr=0.01)   # (student + adapter, teacher)
    trainer = LGDTrainer(model, data_loader, optimizers, clip=GradientClip("value", 1.0))
    trainer.register_hooks(build_lgd_hooks(scale_schedule(90000)) + [hooks.IterationTimer(), ...])
    trainer.train(start_iter, max_iter)

LGDTrainer is a SimpleTrainer: trainer.optimizer is the student optimizer (what stock hooks read),
trainer.optimizers holds both, and state_dict() carries both. LGDAMPTrainer adds autocast + one GradScaler.
"""
import dataclasses
import time
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from detectron2.engine import SimpleTrainer
from detectron2.solver.build import get_default_optimizer_params

from .hooks import unwrap_model

__all__ = ["GradientClip", "LGDAMPTrainer", "LGDTrainer", "build_lgd_optimizers", "build_sgd"]


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
    """(student + adapter, teacher) SGD optimizers, as in the authors' code (docs/method.md §8): lr 0.01 for
    RetinaNet/FCOS, 0.02 for Faster R-CNN at batch 16; each a build_sgd. Build them before any freezing:
    parameters with requires_grad=False are left out, while parameters frozen later stay in and SGD skips
    them while they have no gradient."""
    model = unwrap_model(model)
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
