"""Training methods on one trainer: LGD, the baseline and the paper's comparison systems, selected by lgd.method.

A method says how a stock detectron2 detector (the student) is trained; everything else (data, schedule, LR,
seeds, evaluation of the student, checkpoints, writers) is the runner's and shared, so methods compare on equal
terms. Each is registered in METHOD_REGISTRY (lgd.methods.base) by importing its module here; the contract a
method fulfils is in docs/methods/README.md.
"""
from .base import (METHOD_REGISTRY, SHARED_KEYS, Stage, TrainingMethod, build_method, method_class, method_name,
                   method_names, stage_checkpoint)
from . import builtin, fgfi, labelenc, dml, ban, tfkd  # noqa: F401 - registers the methods

__all__ = ["METHOD_REGISTRY", "SHARED_KEYS", "Stage", "TrainingMethod", "build_method", "method_class",
           "method_name", "method_names", "stage_checkpoint"]
