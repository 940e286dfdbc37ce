"""LGDDistiller: a stock detectron2 detector trained with LGD (docs/method.md §8), the student kept unchanged.

    model = instantiate(model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.py").model)  # or build_model
    lgd_model = LGDDistiller(model)                  # teacher + distillation loss sized from the detector
    lgd_model.distill_enabled = False                # first 30k iterations (a trainer hook flips it)
    lgd_model.set_backbone_frozen(True)              # first 10k (1x) / 20k (2x) iterations
    opt_student = SGD(lgd_model.student_parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    opt_teacher = SGD(lgd_model.teacher_parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    with EventStorage(it):
        losses = lgd_model(batched_inputs)           # training: dict of losses, sum them
    results = lgd_model.eval()(batched_inputs)       # inference: exactly the wrapped detector's output

Training forward: the student's backbone (FPN) runs once; LGDTeacher turns the distilled levels plus the
ground truth into the instructive features X^I; the detector's OWN heads and losses run on both, with the
targets computed once and reused; DistillationLoss compares the adapted student features with X^I
detached. Loss names: the detector's (RetinaNet: loss_cls, loss_box_reg; FCOS: loss_fcos_cls/_loc/_ctr;
R-CNN: loss_rpn_cls, loss_rpn_loc, loss_cls, loss_box_reg, Mask R-CNN also loss_mask), the same names
with the suffix "_tea" for the instructive branch (TEACHER_SUFFIX; the metrics the heads log there go under
the EventStorage scope "lgd_teacher/"), and loss_distill. While distill_enabled is False, loss_distill is
still computed but with the student features detached, so only the student adapter F_adapt learns. Inference never touches the teacher: LGD adds zero inference cost.

A plain nn.Module wrapper rather than a META_ARCH_REGISTRY entry: the wrapped model comes from any stock
config (LazyConfig or yacs build_model) unchanged, and its checkpoint keys stay under `detector.`, so the
student can be exported by saving `lgd_model.detector`. The detector's EMA loss normalizer (RetinaNet,
FCOS) is a plain attribute of the detector: lgd.engine.checkpoint.DetectorEMAState checkpoints it, for LGD
and baseline runs alike, so resume is exact.

A detector family = one adapter (lgd.modeling.detector_adapters, a detectron2 Registry): RetinaNet, FCOS,
Faster / Mask R-CNN. The teacher settings follow the family (docs/method.md §7): context on for RetinaNet and
FCOS (off for R-CNN and, in its configs, FCOS R50), appearance detached and the whole detector run on X^I for
R-CNN (rcnn_branch="shared_proposals": the cheaper variant that reuses the student's proposals).
"""
from typing import Dict, List, Optional

import torch.nn as nn
from detectron2.utils.events import get_event_storage
from torch.utils.checkpoint import checkpoint

from .detector_adapters import build_detector_adapter
from .distillation_loss import DistillationLoss
from .teacher import LGDTeacher
from .wrapper import DetectorWrapper, detection_step

TEACHER_SUFFIX = "_tea"
TEACHER_SCOPE = "lgd_teacher"  # EventStorage prefix of the metrics the heads log on the instructive branch


class LGDDistiller(DetectorWrapper):
    """A detectron2 detector (the student) plus LGD's teacher and distillation loss (see the module docstring).

    detector: a built detectron2 RetinaNet, FCOS or (Faster/Mask) R-CNN. num_classes and the feature channels
    are read from it. teacher / distill_loss: pass your own to override the defaults (LGDTeacher with the
    detector's context/detach/mask settings, DistillationLoss()). use_context: the context object (None: the
    family's default, on for RetinaNet/FCOS, off for R-CNN; the authors' FCOS R50 configs turn it off).
    stn_pool: the label encoder's STN ("object", the method; "image", a variant). rcnn_branch: see RCNNAdapter.
    backend goes to every lgd_ops call ("auto", "reference", "cpu", ...). distill_enabled: see the property.
    recompute_teacher: keep none of the teacher's activations for backward and run its forward again there
    (torch.utils.checkpoint, RNG state preserved): the same losses and gradients for less peak memory and one
    more teacher forward per step (benchmarks/README.md, "The fast path" has the measured trade).
    """

    def __init__(self, detector: nn.Module, *, teacher: Optional[LGDTeacher] = None,
                 distill_loss: Optional[DistillationLoss] = None, distill_weight: float = 1.0,
                 distill_enabled: bool = True, use_context: Optional[bool] = None, stn_pool: str = "object",
                 rcnn_branch: str = "detector", backend: str = "auto", recompute_teacher: bool = False):
        super().__init__()
        self.detector = detector
        self.detector_adapter = build_detector_adapter(detector, rcnn_branch=rcnn_branch)
        channels = self.detector_adapter.feature_channels()
        self.teacher = teacher if teacher is not None else LGDTeacher(
            self.detector_adapter.num_classes, channels=channels,
            use_context=self.detector_adapter.use_context if use_context is None else bool(use_context),
            detach_appearance=self.detector_adapter.detach_appearance, use_masks=self.detector_adapter.use_masks, stn_pool=stn_pool,
            backend=backend)
        self.distill_loss = distill_loss if distill_loss is not None else DistillationLoss(
            channels, loss_weight=distill_weight, backend=backend)
        self.distill_enabled = distill_enabled
        self.recompute_teacher = bool(recompute_teacher)
        self._backbone_frozen = False
        # what the stock detector trains (detectron2's FREEZE_AT keeps the stem and res2 frozen for good)
        self._freezable = [p for p in self.detector_adapter.bottom_up.parameters() if p.requires_grad]

    @property
    def distill_enabled(self) -> bool:
        """False during the distillation warm-up (docs/method.md §4, §8): loss_distill then trains only the adapter."""
        return self._distill_enabled

    @distill_enabled.setter
    def distill_enabled(self, value: bool):
        self._distill_enabled = bool(value)

    @property
    def backbone_frozen(self) -> bool:
        return self._backbone_frozen

    def set_backbone_frozen(self, frozen: bool):
        """Stop (or resume) updates of the student's bottom-up backbone; the FPN keeps training (docs/method.md §8).

        Touches only the bottom-up parameters the stock detector trains (those with requires_grad when the
        distiller was built): the stem and res2 that FREEZE_AT=2 freezes stay frozen for the whole run.
        Sets requires_grad and clears stale gradients, so optimizers built from student_parameters() skip
        these weights (SGD skips parameters without a gradient, weight decay included). Norm layers' running
        statistics still follow train()/eval(), as in the authors' setup.
        """
        self._backbone_frozen = bool(frozen)
        for p in self._freezable:
            p.requires_grad_(not frozen)
            if frozen:
                p.grad = None

    def student_parameters(self):
        """The detector and the distillation adapter: the student optimizer's parameters (docs/method.md §8)."""
        return list(self.detector.parameters()) + list(self.distill_loss.parameters())

    def teacher_parameters(self):
        """The LGD teacher (label/appearance encoders, relation adapter, knowledge mapper)."""
        return list(self.teacher.parameters())

    def training_losses(self, batched_inputs: List[Dict]):
        adapter = self.detector_adapter
        images, gt_instances, features, targets, losses = detection_step(adapter, batched_inputs)
        distilled = {f: features[f] for f in adapter.in_features}
        image_size = tuple(images.tensor.shape[-2:])
        labels = self.teacher.pack(gt_instances, image_size)
        if self.recompute_teacher:
            instructive = checkpoint(self.teacher, distilled, labels, image_size, use_reentrant=False)
        else:
            instructive = self.teacher(distilled, labels, image_size)
        with get_event_storage().name_scope(TEACHER_SCOPE):  # the heads' own metrics, kept apart
            for name, value in adapter.losses(images, instructive, gt_instances, targets).items():
                losses[name + TEACHER_SUFFIX] = value
        losses["loss_distill"] = self.distill_loss(distilled, instructive, warmup=not self.distill_enabled)
        return losses
