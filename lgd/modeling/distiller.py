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
the EventStorage scope "lgd_teacher/"), and loss_distill. While
distill_enabled is False, loss_distill is still computed but with the student features detached, so only
the adapter learns. Inference never touches the teacher: LGD adds zero inference cost.

A plain nn.Module wrapper rather than a META_ARCH_REGISTRY entry: the wrapped model comes from any stock
config (LazyConfig or yacs build_model) unchanged, and its checkpoint keys stay under `detector.`, so the
student can be exported by saving `lgd_model.detector`. The detector's EMA loss normalizer (RetinaNet,
FCOS), a plain attribute, travels in the state_dict as LGDDistiller's extra state, so resume is exact.

A detector family = one _DetectorHooks subclass registered in _HOOKS (keyed by the detector's class, looked
up along the MRO):
  features(images)                      -> the student's backbone output (every level)
  in_features                           -> the levels the instructive branch's heads read: distilled
  targets(images, features, gt)         -> what the losses need from the ground truth, computed ONCE
                                           (optional "student_losses": losses of the student only)
  losses(images, features, gt, targets) -> detectron2's loss dict for one feature set (student or X^I)
plus the teacher options use_context / detach_appearance / use_masks (docs/method.md §7), num_classes, and
ema_attributes. Families, with the authors' teacher settings:
  - RetinaNet (_DenseHooks): anchors + anchor labels once, head + losses() per branch; context on,
    appearance not detached; distilled levels = head_in_features (p3-p7).
  - FCOS (_FCOSHooks): the same, the head also returning centerness, which losses() takes. detectron2
    v0.6's FCOSHead does not build on recent torch: the LGD configs use lgd.modeling.fcos_head.FCOSHead.
  - Faster / Mask R-CNN (_RCNNHooks; GeneralizedRCNN with StandardROIHeads): context off, appearance
    detached (and masks, Mask R-CNN). The instructive branch is the whole detector on X^I (RPN with its own
    proposals and losses, then the ROI heads), distilled levels p2-p6; rcnn_branch="shared_proposals" is
    the cheaper variant that reuses the student's proposals and distils only the ROI heads' levels.
"""
import math
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from detectron2.modeling.meta_arch.fcos import FCOS
from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.modeling.roi_heads import CascadeROIHeads, StandardROIHeads
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage

from .distillation_loss import DistillationLoss
from .teacher import LGDTeacher

TEACHER_SUFFIX = "_tea"
TEACHER_SCOPE = "lgd_teacher"  # EventStorage prefix of the metrics the heads log on the instructive branch


class _DetectorHooks:
    """How LGDDistiller drives one detector family (see the module docstring)."""

    use_context = True
    detach_appearance = False
    ema_attributes = ()  # the detector's EMA loss normalizers, saved via LGDDistiller's extra state

    def __init__(self, detector: nn.Module):
        self.detector = detector

    @property
    def in_features(self) -> List[str]:
        """The levels the instructive branch's heads read: the ones LGD distills (and the teacher builds)."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return self.detector.num_classes

    @property
    def use_masks(self) -> bool:
        """Whether the teacher describes objects by their masks (Mask R-CNN, docs/method.md §7)."""
        return False

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
        """The student's backbone output, every level (the distilled ones are in_features)."""
        return self.detector.backbone(images.tensor)

    def targets(self, images, features, gt_instances) -> Dict:
        raise NotImplementedError

    def losses(self, images, features, gt_instances, targets) -> Dict[str, torch.Tensor]:
        raise NotImplementedError


class _DenseHooks(_DetectorHooks):
    """RetinaNet and FCOS (v0.6 DenseDetector): anchors and anchor labels once; head + losses() per feature
    set. The head's outputs after (logits, deltas) (FCOS: centerness) go to losses() as extra arguments."""

    use_context = True
    detach_appearance = False
    ema_attributes = ("loss_normalizer",)
    prediction_dims = (4,)  # per-anchor sizes of the head's outputs after the class logits

    @property
    def in_features(self):
        return list(self.detector.head_in_features)

    def label_anchors(self, anchors, gt_instances):
        return self.detector.label_anchors(anchors, gt_instances)

    def targets(self, images, features, gt_instances):
        det = self.detector
        anchors = det.anchor_generator([features[f] for f in self.in_features])
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        # losses() updates the EMA loss normalizer; both branches must see the value of one update
        return {"anchors": anchors, "gt_labels": gt_labels, "gt_boxes": gt_boxes,
                "normalizer": getattr(det, "loss_normalizer", None)}

    def losses(self, images, features, gt_instances, targets):
        det = self.detector
        predictions = det.head([features[f] for f in self.in_features])
        pred_logits, pred_deltas, *extra = det._transpose_dense_predictions(
            predictions, [det.num_classes, *self.prediction_dims])
        if targets["normalizer"] is not None:
            det.loss_normalizer = targets["normalizer"]
        elif hasattr(det, "loss_normalizer"):  # first iteration: no EMA yet
            del det.loss_normalizer
        return det.losses(targets["anchors"], pred_logits, targets["gt_labels"], pred_deltas, targets["gt_boxes"],
                          *extra)


class _FCOSHooks(_DenseHooks):
    """FCOS: as RetinaNet, plus the centerness output (one value per location) and its loss."""

    prediction_dims = (4, 1)

    def label_anchors(self, anchors, gt_instances):
        """FCOS.label_anchors, except that an image without objects gets all-background labels (v0.6's
        FCOS.match_anchors fails on it: a max over zero boxes)."""
        det = self.detector
        present = [x for x in gt_instances if len(x)]
        labels, boxes = map(iter, det.label_anchors(anchors, present) if present else ([], []))
        cat = Boxes.cat(anchors).tensor
        background = torch.full((len(cat),), det.num_classes, dtype=torch.int64, device=cat.device)
        out = [(next(labels), next(boxes)) if len(x) else (background, Boxes(torch.zeros_like(cat)))
               for x in gt_instances]
        return [label for label, _ in out], [box for _, box in out]


class _RCNNHooks(_DetectorHooks):
    """Faster / Mask R-CNN (GeneralizedRCNN with StandardROIHeads and an RPN).

    rcnn_branch="detector" (the default, as in the authors' code): the instructive branch is the whole
    detector run on X^I: the RPN with its own proposals and losses, then the ROI heads (box, and mask for
    Mask R-CNN; a keypoint head likewise, untested) on those proposals. Distilled levels: every level the
    RPN or the ROI heads read (p2-p6 in the stock configs).
    rcnn_branch="shared_proposals" (a cheaper variant, not the method): the RPN runs once, on the student
    (its losses are the student's only); the proposals are labelled and sampled once and the ROI heads'
    losses run on each feature set; distilled levels: the ones the ROI heads read (p2-p5).
    """

    use_context = False
    detach_appearance = True
    branches = ("detector", "shared_proposals")

    def __init__(self, detector: nn.Module, rcnn_branch: str = "detector"):
        super().__init__(detector)
        heads = detector.roi_heads
        if not isinstance(heads, StandardROIHeads) or isinstance(heads, CascadeROIHeads):
            raise ValueError(f"LGDDistiller: R-CNN needs StandardROIHeads, got {type(heads).__name__}")
        if detector.proposal_generator is None:
            raise ValueError("LGDDistiller: R-CNN needs a proposal generator (precomputed proposals unsupported)")
        if rcnn_branch not in self.branches:
            raise ValueError(f"LGDDistiller: rcnn_branch must be one of {self.branches}, got {rcnn_branch!r}")
        self.share_proposals = rcnn_branch == "shared_proposals"

    @property
    def in_features(self):
        det = self.detector
        heads = det.roi_heads
        read = set(heads.box_in_features)
        for head in ("mask", "keypoint"):
            if getattr(heads, f"{head}_on"):
                read |= set(getattr(heads, f"{head}_in_features"))
        if not self.share_proposals:
            read |= set(det.proposal_generator.in_features)
        return [f for f in det.backbone.output_shape() if f in read]

    @property
    def num_classes(self):
        return self.detector.roi_heads.num_classes

    @property
    def use_masks(self):
        return self.detector.roi_heads.mask_on

    def targets(self, images, features, gt_instances):
        if not self.share_proposals:
            return {}
        det = self.detector
        proposals, rpn_losses = det.proposal_generator(images, features, gt_instances)
        return {"proposals": det.roi_heads.label_and_sample_proposals(proposals, gt_instances),
                "student_losses": rpn_losses}

    def losses(self, images, features, gt_instances, targets):
        det = self.detector
        heads = det.roi_heads
        if self.share_proposals:
            # a fresh Instances per branch: with train_on_pred_boxes, _forward_box rewrites proposal_boxes in place
            proposals = [Instances(p.image_size, **p.get_fields()) for p in targets["proposals"]]
            losses = {}
        else:
            proposals, losses = det.proposal_generator(images, features, gt_instances)
            proposals = heads.label_and_sample_proposals(proposals, gt_instances)
        losses.update(heads._forward_box(features, proposals))
        losses.update(heads._forward_mask(features, proposals))
        losses.update(heads._forward_keypoint(features, proposals))
        return losses


_HOOKS = {RetinaNet: _DenseHooks, FCOS: _FCOSHooks, GeneralizedRCNN: _RCNNHooks}


def _hooks_for(detector: nn.Module, **options) -> _DetectorHooks:
    """The family's _DetectorHooks; options (rcnn_branch) go to the R-CNN family only."""
    for cls in type(detector).__mro__:
        if cls in _HOOKS:
            hooks_cls = _HOOKS[cls]
            return hooks_cls(detector, **options) if hooks_cls is _RCNNHooks else hooks_cls(detector)
    raise ValueError(f"LGDDistiller: unsupported detector {type(detector).__name__}; supported: "
                     f"{[c.__name__ for c in _HOOKS]}")


class LGDDistiller(nn.Module):
    """A detectron2 detector (the student) plus LGD's teacher and distillation loss (see the module docstring).

    detector: a built detectron2 RetinaNet, FCOS or (Faster/Mask) R-CNN. num_classes and the feature channels
    are read from it. teacher / distill_loss: pass your own to override the defaults (LGDTeacher with the
    detector's context/detach/mask settings, DistillationLoss()). use_context: the context object (None: the
    family's default, on for RetinaNet/FCOS, off for R-CNN; the authors' FCOS R50 configs turn it off).
    stn_pool: the label encoder's STN ("object", the method; "image", a variant). rcnn_branch: see _RCNNHooks.
    backend goes to every lgd_ops call ("auto", "reference", "cpu", ...). distill_enabled: see the property.
    """

    def __init__(self, detector: nn.Module, *, teacher: Optional[LGDTeacher] = None,
                 distill_loss: Optional[DistillationLoss] = None, distill_weight: float = 1.0,
                 distill_enabled: bool = True, use_context: Optional[bool] = None, stn_pool: str = "object",
                 rcnn_branch: str = "detector", backend: str = "auto"):
        super().__init__()
        self.detector = detector
        self._hooks = _hooks_for(detector, rcnn_branch=rcnn_branch)
        channels = self._hooks.feature_channels()
        self.teacher = teacher if teacher is not None else LGDTeacher(
            self._hooks.num_classes, channels=channels,
            use_context=self._hooks.use_context if use_context is None else bool(use_context),
            detach_appearance=self._hooks.detach_appearance, use_masks=self._hooks.use_masks, stn_pool=stn_pool,
            backend=backend)
        self.distill_loss = distill_loss if distill_loss is not None else DistillationLoss(
            channels, loss_weight=distill_weight, backend=backend)
        self.distill_enabled = distill_enabled
        self._backbone_frozen = False
        # what the stock detector trains (detectron2's FREEZE_AT keeps the stem and res2 frozen for good)
        self._freezable = [p for p in self._hooks.bottom_up.parameters() if p.requires_grad]

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
        losses = dict(targets.get("student_losses", {}))
        losses.update(hooks.losses(images, features, gt_instances, targets))

        distilled = {f: features[f] for f in hooks.in_features}
        instructive = self.teacher(distilled, gt_instances, tuple(images.tensor.shape[-2:]))
        with get_event_storage().name_scope(TEACHER_SCOPE):  # the heads' own metrics, kept apart
            for name, value in hooks.losses(images, instructive, gt_instances, targets).items():
                losses[name + TEACHER_SUFFIX] = value
        losses["loss_distill"] = self.distill_loss(distilled, instructive, warmup=not self.distill_enabled)
        return losses

    def get_extra_state(self) -> torch.Tensor:
        """The detector's EMA loss normalizers (RetinaNet/FCOS loss_normalizer; plain attributes, not in its
        state_dict) as a float64 tensor, NaN while not yet set, so a resumed run continues exactly. A tensor of
        fixed shape, as detectron2's checkpointer loads only tensors and skips shape mismatches."""
        return torch.tensor([float(getattr(self.detector, name, math.nan)) for name in self._hooks.ema_attributes],
                            dtype=torch.float64)

    def set_extra_state(self, state: torch.Tensor):
        names = self._hooks.ema_attributes
        if not isinstance(state, torch.Tensor) or state.shape != (len(names),):
            raise ValueError(f"LGDDistiller.set_extra_state: state must be a tensor of shape ({len(names)},) "
                             f"holding {names}, got {state!r}")
        for name, value in zip(names, state.tolist()):
            if not math.isnan(value):
                setattr(self.detector, name, value)
            elif hasattr(self.detector, name):
                delattr(self.detector, name)
