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
all of this (subclasses write training_losses; `frozen` names the parts it freezes) and detection_step the
student's own losses; a wrapper may also name `init_checkpoint_modules` (detectors a name-matched
train.init_checkpoint initialises; default the student) and `nchw_modules` (kept NCHW on the fast path).
A method's settings are its DEFAULTS, set under cfg.lgd.<name> (LGD's: the top-level lgd.* keys; the
method's `config_node`); lgd/configs/_lgd_config.py builds the configs' lgd node from them. A method that
runs lgd_ops reads its backend from `self.backend` (cfg.lgd.backend, or lgd-train --ops).
The baseline's build() returns the detector itself: lgd-train takes a model without a `detector` attribute as
its own student (lgd.engine.checkpoint.student_module), and a wrapper's checkpoint keeps the student's weights
under `detector.` (lgd-eval and lgd-export read any wrapper's student from there).

Methods are registered in METHOD_REGISTRY (lgd.methods.base) by importing their modules, here.
"""
from .base import (METHOD_REGISTRY, SHARED_KEYS, Stage, TrainingMethod, build_method, method_class, method_name,
                   method_names, stage_checkpoint)
from . import builtin, fgfi, labelenc, dml, ban, tfkd  # noqa: F401 - registers the methods

__all__ = ["METHOD_REGISTRY", "SHARED_KEYS", "Stage", "TrainingMethod", "build_method", "method_class",
           "method_name", "method_names", "stage_checkpoint"]
