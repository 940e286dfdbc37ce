"""Detector drivers: how LGDDistiller drives one detectron2 detector family (docs/method.md §7-8).

Why drivers: LGD runs the detector's OWN heads and losses a second time, on the instructive features X^I, with
the targets computed once; where a family keeps its features, targets and losses differs, so each family gets
one registered DetectorDriver (DETECTOR_DRIVER_REGISTRY, a detectron2 Registry) and the distiller stays generic.
"""
from typing import Dict, List

import torch
import torch.nn as nn
from detectron2.modeling.meta_arch.fcos import FCOS
from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.modeling.roi_heads import CascadeROIHeads, StandardROIHeads
from detectron2.structures import Boxes, Instances
from detectron2.utils.registry import Registry

__all__ = ["DETECTOR_DRIVER_REGISTRY", "DetectorDriver", "FCOSDriver", "RCNNDriver", "RetinaNetDriver",
           "build_detector_driver"]

DETECTOR_DRIVER_REGISTRY = Registry("LGD_DETECTOR_DRIVER")
DETECTOR_DRIVER_REGISTRY.__doc__ = """LGD detector drivers (DetectorDriver subclasses), one per detector family;
each names the detector class it drives in `detector_class`."""


class DetectorDriver:
    """How LGDDistiller drives one detector family:
      features(images)                      -> the student's backbone output (every level)
      in_features                           -> the levels the instructive branch reads: the distilled ones
      targets(images, features, gt)         -> what the losses need from the ground truth, computed ONCE
                                               (optional "student_losses": losses of the student only)
      losses(images, features, gt, targets, heads=None)
                                            -> detectron2's loss dict for one feature set (student or X^I),
                                               run by the detector's heads or by `heads`, copies of
                                               instructive_heads() (lgd.instructive_head="unshared")
    plus the teacher settings use_context / detach_appearance / use_masks, num_classes and ema_attributes (the
    detector's EMA loss normalizers, which lgd.engine.checkpoint.DetectorEMAState saves). A subclass names the
    detector class it drives in `detector_class`; build_detector_driver picks the registered one nearest in the
    detector's MRO, so a new family is one registered subclass."""

    detector_class = None  # the detectron2 meta-architecture this driver drives

    use_context = True
    detach_appearance = False
    ema_attributes = ()  # the detector's EMA loss normalizers, saved via LGDDistiller's extra state

    def __init__(self, detector: nn.Module, rcnn_branch: str = "detector"):
        self.detector = detector  # rcnn_branch: R-CNN only (RCNNDriver)

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

    def instructive_heads(self) -> Dict[str, nn.Module]:
        """The detector's modules, by attribute name, that run on X^I in the instructive branch."""
        raise NotImplementedError

    def losses(self, images, features, gt_instances, targets, heads=None) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def _head(self, name: str, heads) -> nn.Module:
        """The module `name` a loss pass runs: its copy in heads when given, else the detector's own."""
        return heads[name] if heads is not None else getattr(self.detector, name)


@DETECTOR_DRIVER_REGISTRY.register()
class RetinaNetDriver(DetectorDriver):
    """RetinaNet (and, through FCOSDriver, FCOS; v0.6 DenseDetector): anchors and anchor labels once; head +
    losses() per feature set. The head's outputs after (logits, deltas) (FCOS: centerness) go to losses() as
    extra arguments. Context on, appearance not detached; distilled levels = head_in_features (p3-p7)."""

    detector_class = RetinaNet

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

    def instructive_heads(self):
        return {"head": self.detector.head}

    def losses(self, images, features, gt_instances, targets, heads=None):
        det = self.detector
        predictions = self._head("head", heads)([features[f] for f in self.in_features])
        pred_logits, pred_deltas, *extra = det._transpose_dense_predictions(
            predictions, [det.num_classes, *self.prediction_dims])
        if targets["normalizer"] is not None:
            det.loss_normalizer = targets["normalizer"]
        elif hasattr(det, "loss_normalizer"):  # first iteration: no EMA yet
            del det.loss_normalizer
        # the losses in fp32 under autocast (lgd.engine.trainer): the focal loss' sigmoid and modulating factor
        # would otherwise run in the head's bf16/fp16; the predictions are small, the casts cheap
        pred_logits, pred_deltas, *extra = ([p.float() for p in preds] for preds in (pred_logits, pred_deltas, *extra))
        with torch.autocast(pred_logits[0].device.type, enabled=False):
            return det.losses(targets["anchors"], pred_logits, targets["gt_labels"], pred_deltas,
                              targets["gt_boxes"], *extra)


@DETECTOR_DRIVER_REGISTRY.register()
class FCOSDriver(RetinaNetDriver):
    """FCOS: as RetinaNet, plus the centerness output (one value per location) and its loss. detectron2
    v0.6's FCOSHead does not build on recent torch: the LGD configs use lgd.modeling.fcos_head.FCOSHead."""

    detector_class = FCOS

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


@DETECTOR_DRIVER_REGISTRY.register()
class RCNNDriver(DetectorDriver):
    """Faster / Mask R-CNN (GeneralizedRCNN with StandardROIHeads and an RPN).

    rcnn_branch="detector" (the default, as in the authors' code): the instructive branch is the whole
    detector run on X^I: the RPN with its own proposals and losses, then the ROI heads (box, and mask for
    Mask R-CNN; a keypoint head likewise, untested) on those proposals. Distilled levels: every level the
    RPN or the ROI heads read (p2-p6 in the stock configs).
    rcnn_branch="shared_proposals" (a cheaper variant, not the method): the RPN runs once, on the student
    (its losses are the student's only); the proposals are labelled and sampled once and the ROI heads'
    losses run on each feature set; distilled levels: the ones the ROI heads read (p2-p5).
    """

    detector_class = GeneralizedRCNN
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

    def instructive_heads(self):
        det = self.detector
        parts = {"roi_heads": det.roi_heads}
        return parts if self.share_proposals else {"proposal_generator": det.proposal_generator, **parts}

    def losses(self, images, features, gt_instances, targets, heads=None):
        roi_heads = self._head("roi_heads", heads)
        if self.share_proposals:
            # a fresh Instances per branch: with train_on_pred_boxes, _forward_box rewrites proposal_boxes in place
            proposals = [Instances(p.image_size, **p.get_fields()) for p in targets["proposals"]]
            losses = {}
        else:
            proposals, losses = self._head("proposal_generator", heads)(images, features, gt_instances)
            proposals = roi_heads.label_and_sample_proposals(proposals, gt_instances)
        losses.update(roi_heads._forward_box(features, proposals))
        losses.update(roi_heads._forward_mask(features, proposals))
        losses.update(roi_heads._forward_keypoint(features, proposals))
        return losses


def build_detector_driver(detector: nn.Module, *, rcnn_branch: str = "detector") -> DetectorDriver:
    """The registered driver for `detector` (the one whose detector_class is nearest in its MRO).
    rcnn_branch: see RCNNDriver (other families ignore it)."""
    drivers = {cls.detector_class: cls for _, cls in DETECTOR_DRIVER_REGISTRY}
    for cls in type(detector).__mro__:
        if cls in drivers:
            return drivers[cls](detector, rcnn_branch=rcnn_branch)
    raise ValueError(f"LGDDistiller: unsupported detector {type(detector).__name__}; supported: "
                     f"{sorted(c.__name__ for c in drivers)} (register a DetectorDriver for others)")
