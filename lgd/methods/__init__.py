"""Training methods on one trainer: LGD, the baseline and the paper's comparison systems (docs/methods/).

A method says how a stock detectron2 detector (the student) is trained; lgd-train picks it with `lgd.method`
and everything else (data, schedule, LR, seeds, evaluation of the student, checkpoints, writers) is shared:

    method = build_method(cfg)                      # cfg.lgd.method, e.g. "fgfi"
    for stage in method.stages():                   # prerequisite runs (teacher pretraining, LabelEnc step 1, ...)
        ...                                         # lgd-train trains each into OUTPUT/<stage.name>/ first
    model = method.build(instantiate(cfg.model), {stage.name: checkpoint, ...})
    losses = model(batched_inputs)                  # training: a dict of losses to sum
    model.detector                                  # the student: evaluated, exported, its EMA checkpointed

Contract of the model build() returns: an nn.Module with attribute `detector` (the student, a plain detectron2
detector); in training mode forward(batched_inputs) returns a dict of scalar losses; in eval mode it returns
the student's outputs. Every parameter with requires_grad=True when the model is built is trained by one SGD at
optimizer.lr (lgd.engine.optim.build_sgd), unless the method overrides build_optimizer; frozen parts (a
pretrained teacher) have requires_grad=False and stay in eval mode. lgd.modeling.wrapper.DetectorWrapper gives
all of this (subclasses write training_losses; `frozen` names the eval-mode parts) and detection_step the
student's own losses; a wrapper may also name `init_checkpoint_modules` (detectors a name-matched
train.init_checkpoint initialises; default the student) and `nchw_modules` (kept NCHW on the fast path).
The method's settings live under cfg.lgd.<name> (its DEFAULTS; lgd/configs/_lgd_config.py adds every
method's DEFAULTS to the configs). A method that runs lgd_ops reads its backend from `self.backend`
(cfg.lgd.backend, or lgd-train --ops).
The baseline's build() returns the detector itself: lgd-train takes a model without a `detector` attribute as
its own student (lgd.engine.checkpoint.student_module), and a wrapper's checkpoint keeps the student's weights
under `detector.` (lgd-eval and lgd-export read any wrapper's student from there).

METHODS maps each name to "module:Class"; a method's module is imported only when it is used.
"""
import copy
import dataclasses
import importlib
import os
from typing import Dict, List

import torch.nn as nn

__all__ = ["METHODS", "Stage", "TrainingMethod", "build_method", "method_class", "method_name",
           "stage_checkpoint"]

METHODS = {
    "baseline": "lgd.methods.builtin:Baseline",
    "lgd": "lgd.methods.builtin:LGD",
    "fgfi": "lgd.methods.fgfi:FGFI",
    "labelenc": "lgd.methods.labelenc:LabelEnc",
    "dml": "lgd.methods.dml:DML",
    "ban": "lgd.methods.ban:BAN",
    "tfkd": "lgd.methods.tfkd:TfKD",
}


@dataclasses.dataclass
class Stage:
    """A run a method needs before its own (a teacher's pretraining, LabelEnc's step 1, BAN's earlier
    generation): trained by lgd-train with `cfg` (a full LazyConfig; lgd-train sets its train.output_dir to
    OUTPUT/<name> and keeps its other keys) and handed to the method's build() as the path of its final
    checkpoint (stage_checkpoint). `name` is a folder name: letters, digits, "_" and "-". A stage's cfg may
    point at an earlier stage's checkpoint by its path, stage_checkpoint(run output_dir, earlier name)."""

    name: str
    cfg: object


def stage_checkpoint(output_dir: str, name: str) -> str:
    """Where the stage `name` of a run writing into output_dir leaves its final checkpoint."""
    return os.path.join(output_dir, name, "model_final.pth")


class TrainingMethod:
    """One way to train the student (module docstring). Subclasses set `name` (the key in METHODS) and
    DEFAULTS (their settings under cfg.lgd.<name>) and implement build(); stages() and build_optimizer()
    have defaults (no prerequisite; one SGD over every trainable parameter)."""

    name = ""
    DEFAULTS: Dict = {}

    def __init__(self, cfg):
        self.cfg = cfg
        given = dict(cfg.lgd.get(self.name, {}) or {}) if "lgd" in cfg else {}
        unknown = sorted(set(given) - set(self.DEFAULTS))
        if unknown:
            raise ValueError(f"lgd.{self.name}: unknown settings {unknown}; known: {sorted(self.DEFAULTS)}")
        self.settings = {**copy.deepcopy(self.DEFAULTS), **given}
        self.backend = str(cfg.lgd.get("backend", "auto")) if "lgd" in cfg else "auto"

    def stages(self) -> List[Stage]:
        """The prerequisite runs, in order (each may use the checkpoints of the ones before it)."""
        return []

    def build(self, detector: nn.Module, checkpoints: Dict[str, str]) -> nn.Module:
        """The model to train around `detector` (the student, already built from cfg.model), given the final
        checkpoint of every stage by name."""
        raise NotImplementedError

    def build_optimizer(self, model: nn.Module, **sgd_kwargs):
        """The run's optimizer; sgd_kwargs are lgd.engine.optim.build_sgd's (lr, momentum, weight decay, clip)."""
        from ..engine.optim import build_sgd

        return build_sgd(model, **sgd_kwargs)

    def hooks(self, schedule) -> list:
        """detectron2 hooks this method adds to the run (schedule: the run's lgd.engine.schedule.LGDSchedule)."""
        return []


def method_name(cfg) -> str:
    """The run's method: "baseline" when lgd.enabled is False, else cfg.lgd.method (default "lgd")."""
    lgd = cfg.get("lgd", {}) or {}
    name = str(lgd.get("method", "lgd")) if bool(lgd.get("enabled", True)) else "baseline"
    if name not in METHODS:
        raise ValueError(f"lgd.method must be one of {sorted(METHODS)}, got {name!r}")
    return name


def method_class(name: str):
    """The TrainingMethod subclass registered as `name` in METHODS (imported on first use)."""
    if name not in METHODS:
        raise ValueError(f"lgd.method must be one of {sorted(METHODS)}, got {name!r}")
    module, _, attr = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def build_method(cfg, name=None, backend=None) -> TrainingMethod:
    """The TrainingMethod `name` (default: the run's, method_name) built from cfg; backend (lgd-train --ops)
    replaces cfg.lgd.backend as its lgd_ops backend when given."""
    method = method_class(name or method_name(cfg))(cfg)
    if backend is not None:
        method.backend = str(backend)
    return method
