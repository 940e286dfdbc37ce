"""The two built-in training methods (lgd.methods): the plain detector (Baseline) and LGD itself.

Baseline  lgd.method=baseline: the detector alone, one SGD over its parameters (lgd.engine.optim.build_sgd),
          the shared LR schedule only.
LGD       lgd.method=lgd (the default): LGDDistiller around the detector, one SGD with the teacher's groups at
          teacher_lr (build_lgd_optimizer), the distillation warm-up and backbone-freeze hooks and the op
          report. Its settings (DEFAULTS) are the top-level lgd.* keys (config_node "lgd"), where the paper's
          configs have always set them. docs/method.md has the method.
"""
from typing import Dict

import torch.nn as nn

from ..engine.hooks import build_distill_hooks
from ..engine.op_report import OpReport
from ..engine.optim import build_lgd_optimizer
from ..modeling.detector_drivers import RCNNDriver
from ..modeling.distiller import INSTRUCTIVE_HEADS, LGDDistiller
from ..modeling.label_encoder import LABEL_ENCODERS, STN_POOLS
from ..modeling.teacher import INTERACTIONS
from .base import METHOD_REGISTRY, TrainingMethod

__all__ = ["Baseline", "LGD"]


@METHOD_REGISTRY.register()
class Baseline(TrainingMethod):
    """The stock detector trained alone: the comparison point of every method."""

    name = "baseline"

    def build(self, detector: nn.Module, checkpoints: Dict[str, str]) -> nn.Module:
        return detector


@METHOD_REGISTRY.register()
class LGD(TrainingMethod):
    """Label-guided self-distillation (LGDDistiller) configured by the top-level lgd.* keys."""

    name = "lgd"
    config_node = "lgd"
    DEFAULTS = dict(
        distill_weight=1.0,        # λ, the weight of loss_distill (docs/method.md §4)
        teacher_lr=None,           # LR of the teacher's parameter group (label/appearance encoders, relation
                                   # adapter, knowledge mapper); None: optimizer.lr. The configs set optimizer.lr
        use_context=None,          # the context object; None: the detector's default (RetinaNet/FCOS on, R-CNN
                                   # off); the FCOS R50 configs set False, as the authors' configs do
        use_objects=True,          # the objects' embeddings are painted into X^I; False: only the context
                                   # object's (Table 6a), which turns the context on unless use_context=False,
                                   # an error then
        label_encoder="pointnet",  # "pointnet" (the method), "mlp" or "transformer" (6 heads; Table 4)
        interaction="student_guided",  # relation adapter: "student_guided" (appearance queries the label
                                   # embeddings, the method), "label_guided" (the reverse; Table 5), or no
                                   # attention: "student_fill" / "teacher_fill" paint the appearance / label
                                   # embeddings themselves (the authors' code; docs/method.md §6)
        instructive_head="shared",  # "shared" (the method: X^I goes through the detector's own heads) or
                                   # "unshared" (a copy of them for the instructive branch; Table 6b)
        stn_pool="object",         # label encoder STN: "object" (each object its own transform, the authors'
                                   # code) or "image" (one transform per image, PointNet's; a variant)
        rcnn_branch="detector",    # R-CNN instructive branch: "detector" (RPN + ROI heads on X^I, p2-p6
                                   # distilled, the authors' code) or "shared_proposals" (the student's
                                   # proposals, p2-p5 distilled: cheaper, not the method)
        recompute_teacher=False,   # run the teacher's forward again in backward instead of keeping its
                                   # activations (same numbers; less memory, one more teacher forward)
        op_report_period=1000,     # every this many iterations time the three ops vs the reference (0: off)
    )

    # the settings that name a variant, with their valid values
    CHOICES = dict(label_encoder=LABEL_ENCODERS, interaction=INTERACTIONS, instructive_head=INSTRUCTIVE_HEADS,
                   stn_pool=STN_POOLS, rcnn_branch=RCNNDriver.branches)

    def __init__(self, cfg):
        super().__init__(cfg)
        for key, valid in self.CHOICES.items():
            if self.settings[key] not in valid:
                raise ValueError(f"lgd.{key} must be one of {list(valid)}, got {self.settings[key]!r}")
        if not self.settings["use_objects"] and self.settings["use_context"] is False:
            raise ValueError("lgd.use_objects=False paints only the context object: it needs lgd.use_context "
                             "True or None, got False")

    def build(self, detector: nn.Module, checkpoints: Dict[str, str]) -> LGDDistiller:
        s = self.settings
        use_context = None if s["use_context"] is None else bool(s["use_context"])
        if not s["use_objects"] and use_context is None:
            use_context = True  # only the context is painted: on whatever the detector's default
        return LGDDistiller(detector, backend=self.backend, distill_weight=float(s["distill_weight"]),
                            use_context=use_context, stn_pool=str(s["stn_pool"]), rcnn_branch=str(s["rcnn_branch"]),
                            label_encoder=str(s["label_encoder"]), interaction=str(s["interaction"]),
                            use_objects=bool(s["use_objects"]), instructive_head=str(s["instructive_head"]),
                            recompute_teacher=bool(s["recompute_teacher"]))

    def build_optimizer(self, model: LGDDistiller, **sgd_kwargs):
        """One SGD: the student and adapter at lr, the teacher at teacher_lr (default lr)."""
        teacher_lr = self.settings["teacher_lr"]
        return build_lgd_optimizer(model, teacher_lr=None if teacher_lr is None else float(teacher_lr), **sgd_kwargs)

    def hooks(self, schedule) -> list:
        """Distillation warm-up, backbone freeze and the op report (lgd/engine/op_report.py)."""
        return build_distill_hooks(schedule) + [OpReport(int(self.settings["op_report_period"]))]
