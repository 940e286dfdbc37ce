"""LGDDistiller: a stock detectron2 detector trained with LGD (LGD_SPEC §8), the student kept unchanged.

    model = instantiate(model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.py").model)  # or build_model
    lgd_model = LGDDistiller(model)                  # teacher + distillation loss sized from the detector
    lgd_model.distill_enabled = False                # first 30k iterations (a trainer hook flips it)
    lgd_model.set_backbone_frozen(True)              # first 10k (1x) / 20k (2x) iterations
    opt_student = SGD(lgd_model.student_parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    opt_teacher = SGD(lgd_model.teacher_parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    with EventStorage(it):
        losses = lgd_model(batched_inputs)           # training: dict of losses, sum them
    results = lgd_model.eval()(batched_inputs)       # inference: exactly the wrapped detector's output

Training forward: the student's backbone (FPN) runs once; LGDTeacher turns those features plus the ground
truth into the instructive features X^I; the detector's OWN head and loss run on both, with the targets
(anchor labels) computed once and reused; DistillationLoss compares the adapted student features with X^I
detached. Loss names: the detector's (loss_cls, loss_box_reg), the same names with the suffix "_tea" for the
instructive branch (loss_cls_tea, loss_box_reg_tea; TEACHER_SUFFIX), and loss_distill. While distill_enabled
is False, loss_distill is still computed but with the student features detached, so only the adapter learns.
Inference never touches the teacher: LGD adds zero inference cost.

A plain nn.Module wrapper rather than a META_ARCH_REGISTRY entry: the wrapped model comes from any stock
config (LazyConfig or yacs build_model) unchanged, and its checkpoint keys stay under `detector.`, so the
student can be exported by saving `lgd_model.detector`.

Adding a detector = one _DetectorHooks subclass registered in _HOOKS (keyed by the detector's class, looked up
along the MRO), with three methods:
  features(images)                      -> the student's feature dict (levels the head reads, same order)
  targets(images, features, gt)         -> whatever the loss needs from the ground truth, computed ONCE
  losses(images, features, gt, targets) -> detectron2's loss dict for one feature set (student or X^I)
plus the class attributes use_context / detach_appearance (the teacher options, LGD_SPEC §7) and
bottom_up (how to reach the bottom-up backbone). Planned:
  - FCOS (detectron2.modeling.meta_arch.fcos.FCOS, a DenseDetector like RetinaNet): same as _RetinaNetHooks
    but the head returns (logits, deltas, centerness), dims [num_classes, 4, 1], and losses() takes
    pred_centerness; context on. Its v0.6 head fails to build on new torch (ENVIRONMENT.md): needs the
    head-subclass/shim first.
  - Faster R-CNN (GeneralizedRCNN): use_context=False, detach_appearance=True; features = backbone output;
    targets = proposals from the RPN on the student features (plus the RPN losses, student only) and the
    roi_heads' label_and_sample_proposals(proposals, gt) sampled once; losses = roi_heads box losses
    (_forward_box with the sampled proposals) on each feature set.
  - Mask R-CNN: as Faster R-CNN plus the mask head's loss, and LGDTeacher(use_masks=True) (gt_masks).
"""
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from detectron2.modeling.meta_arch.retinanet import RetinaNet

from .distillation_loss import DistillationLoss
from .teacher import LGDTeacher

TEACHER_SUFFIX = "_tea"


class _DetectorHooks:
    """How LGDDistiller drives one detector family (see the module docstring)."""

    use_context = True
    detach_appearance = False
    in_features: List[str] = []  # the levels the head reads (and LGD distills)

    def __init__(self, detector: nn.Module):
        self.detector = detector

    @property
    def bottom_up(self) -> nn.Module:
        backbone = self.detector.backbone
        if not hasattr(backbone, "bottom_up"):
            raise ValueError(f"LGDDistiller: the backbone {type(backbone).__name__} has no bottom_up part "
                             "(an FPN backbone is expected)")
        return backbone.bottom_up

    def feature_channels(self) -> int:
        shapes = self.detector.backbone.output_shape()
        channels = {shapes[f].channels for f in self.in_features}
        if len(channels) != 1:
            raise ValueError(f"LGDDistiller: the distilled levels must share one channel count, got {channels}")
        return channels.pop()

    def features(self, images) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def targets(self, images, features, gt_instances):
        raise NotImplementedError

    def losses(self, images, features, gt_instances, targets) -> Dict[str, torch.Tensor]:
        raise NotImplementedError


class _RetinaNetHooks(_DetectorHooks):
    """RetinaNet (v0.6 DenseDetector): anchors and anchor labels once; head + losses() per feature set."""

    use_context = True
    detach_appearance = False

    @property
    def in_features(self):
        return list(self.detector.head_in_features)

    def features(self, images):
        out = self.detector.backbone(images.tensor)
        return {f: out[f] for f in self.in_features}

    def targets(self, images, features, gt_instances):
        det = self.detector
        anchors = det.anchor_generator(list(features.values()))
        gt_labels, gt_boxes = det.label_anchors(anchors, gt_instances)
        # losses() updates the EMA loss normalizer; both branches must see the value of one update
        return {"anchors": anchors, "gt_labels": gt_labels, "gt_boxes": gt_boxes,
                "normalizer": getattr(det, "loss_normalizer", None)}

    def losses(self, images, features, gt_instances, targets):
        det = self.detector
        predictions = det.head(list(features.values()))
        pred_logits, pred_deltas = det._transpose_dense_predictions(predictions, [det.num_classes, 4])
        if targets["normalizer"] is not None:
            det.loss_normalizer = targets["normalizer"]
        elif hasattr(det, "loss_normalizer"):  # first iteration: no EMA yet
            del det.loss_normalizer
        return det.losses(targets["anchors"], pred_logits, targets["gt_labels"], pred_deltas, targets["gt_boxes"])


_HOOKS = {RetinaNet: _RetinaNetHooks}


def _hooks_for(detector: nn.Module) -> _DetectorHooks:
    for cls in type(detector).__mro__:
        if cls in _HOOKS:
            return _HOOKS[cls](detector)
    raise ValueError(f"LGDDistiller: unsupported detector {type(detector).__name__}; supported: "
                     f"{[c.__name__ for c in _HOOKS]}")


class LGDDistiller(nn.Module):
    """A detectron2 detector (the student) plus LGD's teacher and distillation loss (see the module docstring).

    detector: a built detectron2 model (RetinaNet for now). num_classes and the feature channels are read
    from it. teacher / distill_loss: pass your own to override the defaults (LGDTeacher with the detector's
    context/detach settings, DistillationLoss()). backend goes to every lgd_ops call ("auto", "reference",
    "cpu", ...). distill_enabled: see the property.
    """

    def __init__(self, detector: nn.Module, *, teacher: Optional[LGDTeacher] = None,
                 distill_loss: Optional[DistillationLoss] = None, distill_weight: float = 1.0,
                 distill_enabled: bool = True, backend: str = "auto"):
        super().__init__()
        self.detector = detector
        self._hooks = _hooks_for(detector)
        channels = self._hooks.feature_channels()
        self.teacher = teacher if teacher is not None else LGDTeacher(
            detector.num_classes, channels=channels, use_context=self._hooks.use_context,
            detach_appearance=self._hooks.detach_appearance, backend=backend)
        self.distill_loss = distill_loss if distill_loss is not None else DistillationLoss(
            channels, loss_weight=distill_weight, backend=backend)
        self.distill_enabled = distill_enabled
        self._backbone_frozen = False

    @property
    def distill_enabled(self) -> bool:
        """False during the distillation warm-up (LGD_SPEC §4, §8): loss_distill then trains only the adapter."""
        return self._distill_enabled

    @distill_enabled.setter
    def distill_enabled(self, value: bool):
        self._distill_enabled = bool(value)

    @property
    def backbone_frozen(self) -> bool:
        return self._backbone_frozen

    def set_backbone_frozen(self, frozen: bool):
        """Stop (or resume) updates of the student's bottom-up backbone; the FPN keeps training (LGD_SPEC §8).

        Sets requires_grad and clears stale gradients, so optimizers built from student_parameters() skip
        these weights (SGD skips parameters without a gradient, weight decay included). Norm layers' running
        statistics still follow train()/eval(), as in the authors' setup.
        """
        self._backbone_frozen = bool(frozen)
        for p in self._hooks.bottom_up.parameters():
            p.requires_grad_(not frozen)
            if frozen:
                p.grad = None

    def student_parameters(self):
        """The detector and the distillation adapter: the student optimizer's parameters (LGD_SPEC §8)."""
        return list(self.detector.parameters()) + list(self.distill_loss.parameters())

    def teacher_parameters(self):
        """The LGD teacher (label/appearance encoders, relation adapter, knowledge mapper)."""
        return list(self.teacher.parameters())

    @property
    def device(self):
        return self.detector.device

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.detector(batched_inputs)
        if not batched_inputs or any("instances" not in x for x in batched_inputs):
            raise ValueError("LGDDistiller: training needs 'instances' in every input dict")
        hooks = self._hooks
        images = self.detector.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        features = hooks.features(images)
        targets = hooks.targets(images, features, gt_instances)
        losses = dict(hooks.losses(images, features, gt_instances, targets))

        instructive = self.teacher(features, gt_instances, tuple(images.tensor.shape[-2:]))
        for name, value in hooks.losses(images, instructive, gt_instances, targets).items():
            losses[name + TEACHER_SUFFIX] = value
        losses["loss_distill"] = self.distill_loss(features, instructive, warmup=not self.distill_enabled)
        return losses
