"""FGFI: fine-grained feature imitation (Wang et al., CVPR 2019) as a training method (docs/methods/fgfi.md).

A frozen teacher detector (a detectron2 checkpoint, or the "teacher" stage: a baseline run of the run's config
with lgd.fgfi.teacher_overrides) runs on the same images; the student's FPN levels that carry anchors go
through one 3x3 conv adapter to the teacher's channels and imitate the teacher's levels by an L2 loss on the
locations near objects only: per ground-truth box, with M its largest IoU over every anchor of every level,
the anchors with IoU > psi * M are kept, and a location is imitated when any of its anchors is kept. The
student's detection losses are the detector's own (lgd.modeling.detector_drivers), plus

    loss_imitation = loss_weight * sum over imitated (b, l, h, w) of ||adapter(S_l) - T_l||^2 / (2 * N_p)

with N_p the number of imitated locations in the batch, all levels together (the authors' normalisation).
"""
import copy
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
from detectron2.config import instantiate
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN
from detectron2.structures import Boxes, pairwise_iou

from ..engine.checkpoint import AtomicCheckpointer
from ..modeling.detector_drivers import build_detector_driver
from ..modeling.wrapper import DetectorWrapper, detection_step
from ..errors import UsageError
from ..config import apply_overrides_strict
from .base import METHOD_REGISTRY, Stage, TrainingMethod

__all__ = ["FGFI", "FGFIDistiller", "anchor_levels", "imitation_masks"]


def anchor_levels(detector: nn.Module) -> Tuple[nn.Module, List[str]]:
    """(anchor generator, the FPN levels it puts anchors on) of a detector: RetinaNet and FCOS (DenseDetector:
    FCOS's anchors are detectron2's stride-sized boxes around its points) or an R-CNN's RPN."""
    if isinstance(detector, DenseDetector):
        return detector.anchor_generator, list(detector.head_in_features)
    if isinstance(detector, GeneralizedRCNN) and hasattr(detector.proposal_generator, "anchor_generator"):
        rpn = detector.proposal_generator
        return rpn.anchor_generator, list(rpn.in_features)
    raise ValueError(f"FGFI: the detector {type(detector).__name__} has no anchors to build the imitation mask "
                     "from (expected RetinaNet, FCOS, or a GeneralizedRCNN with an RPN)")


def imitation_masks(anchors: List[Boxes], grid_sizes: List[Tuple[int, int]], gt_boxes: Boxes,
                    psi: float) -> List[torch.Tensor]:
    """One image's imitation mask on each level, bool [H_l, W_l]: anchors[l] holds level l's H_l*W_l*A anchors,
    location-major (detectron2's anchor generators). Per ground-truth box: M = its largest IoU over the anchors
    of all levels; the anchors with IoU > psi * M are kept (none when M = 0); a location is imitated when one
    of its anchors is kept for one of the boxes."""
    if len(gt_boxes) == 0:
        return [torch.zeros(size, dtype=torch.bool, device=gt_boxes.device) for size in grid_sizes]
    ious = [pairwise_iou(gt_boxes, level) for level in anchors]  # [G, H_l*W_l*A] each
    best = torch.stack([iou.max(dim=1).values for iou in ious]).max(dim=0).values  # M per box
    threshold = (psi * best)[:, None]
    return [(iou > threshold).any(dim=0).view(h, w, -1).any(dim=-1) for iou, (h, w) in zip(ious, grid_sizes)]


class FGFIDistiller(DetectorWrapper):
    """The student `detector` trained with its own losses plus FGFI's loss_imitation towards a frozen `teacher`
    (module docstring). The teacher's weights are frozen and it stays in eval mode; in eval mode forward() is
    the student's. The adapter (a 3x3 conv, student channels -> teacher channels) is shared by the levels."""

    frozen = ("teacher",)

    def __init__(self, detector: nn.Module, teacher: nn.Module, *, psi: float = 0.5, loss_weight: float = 0.01):
        super().__init__()
        self.detector = detector
        self.detector_driver = build_detector_driver(detector)
        self.anchor_generator, self.levels = anchor_levels(detector)
        self.teacher = teacher
        self.psi, self.loss_weight = float(psi), float(loss_weight)
        student_ch = self._channels(detector, "student")
        teacher_ch = self._channels(teacher, "teacher")
        self.adapter = nn.Conv2d(student_ch, teacher_ch, kernel_size=3, padding=1)
        # the authors' init: weights ~ N(0, 1e-4) within two standard deviations, PyTorch's default bias
        nn.init.trunc_normal_(self.adapter.weight, std=1e-4, a=-2e-4, b=2e-4)

    def _channels(self, detector, role) -> int:
        shapes = detector.backbone.output_shape()
        missing = [f for f in self.levels if f not in shapes]
        if missing:
            raise ValueError(f"FGFI: the {role}'s backbone has no level {missing} (imitated levels: {self.levels}; "
                             f"it has {sorted(shapes)})")
        channels = {shapes[f].channels for f in self.levels}
        if len(channels) != 1:
            raise ValueError(f"FGFI: the {role}'s imitated levels {self.levels} must share one channel count "
                             f"(one adapter for all levels), got {sorted(channels)}")
        return channels.pop()

    def training_losses(self, batched_inputs: List[Dict]):
        step = detection_step(self.detector_driver, batched_inputs)
        with torch.no_grad():  # the teacher's own pixel normalization
            teacher_features = self.teacher.backbone(self.teacher.preprocess_image(batched_inputs).tensor)
        gt_boxes = [x["instances"].gt_boxes.to(self.device) for x in batched_inputs]
        losses = dict(step.losses)
        losses["loss_imitation"] = self.imitation_loss(step.features, teacher_features, gt_boxes)
        return losses

    def masks(self, features: Dict[str, torch.Tensor], gt_boxes: List[Boxes]) -> List[torch.Tensor]:
        """The batch's imitation masks per level, bool [B, H_l, W_l] (imitation_masks per image)."""
        maps = [features[f] for f in self.levels]
        anchors = self.anchor_generator(maps)
        sizes = [tuple(m.shape[-2:]) for m in maps]
        per_image = [imitation_masks(anchors, sizes, boxes, self.psi) for boxes in gt_boxes]
        return [torch.stack(level) for level in zip(*per_image)]

    def imitation_loss(self, features: Dict[str, torch.Tensor], teacher_features: Dict[str, torch.Tensor],
                       gt_boxes: List[Boxes]) -> torch.Tensor:
        """loss_imitation (module docstring) of the student's and the teacher's levels, in fp32."""
        squares, count = [], 0
        for name, mask in zip(self.levels, self.masks(features, gt_boxes)):
            student, teacher = self.adapter(features[name]), teacher_features[name]
            if student.shape != teacher.shape:
                raise ValueError(f"FGFI: level {name} is {tuple(student.shape)} for the adapted student and "
                                 f"{tuple(teacher.shape)} for the teacher (both must see the same padded input: "
                                 "same size_divisibility and strides)")
            per_location = (student.float() - teacher.float()).pow(2).sum(dim=1)  # [B, H, W]
            squares.append(torch.where(mask, per_location, 0.0).sum())
            count = count + mask.sum()
        # no imitated location (no objects in the batch): 0, still connected to the adapter
        return self.loss_weight * torch.stack(squares).sum() / (2 * torch.clamp(count, min=1))


@METHOD_REGISTRY.register()
class FGFI(TrainingMethod):
    """FGFI on lgd's trainer (module docstring; settings in DEFAULTS, documented in docs/methods/fgfi.md)."""

    name = "fgfi"
    DEFAULTS = dict(
        teacher_checkpoint="",   # the teacher's weights (a detectron2 or lgd checkpoint); "": the "teacher" stage
        teacher_overrides=[],    # key=value overrides of the run's config that give the teacher's architecture
        psi=0.5,                 # the mask's threshold factor: anchors with IoU > psi * (the box's best IoU)
        loss_weight=0.01,        # lambda, the weight of loss_imitation (the authors' code: 0.01)
    )

    def __init__(self, cfg):
        super().__init__(cfg)
        s = self.settings
        if not 0.0 <= float(s["psi"]) < 1.0:
            raise ValueError(f"lgd.fgfi.psi must be in [0, 1), got {s['psi']!r}")
        if float(s["loss_weight"]) < 0.0:
            raise ValueError(f"lgd.fgfi.loss_weight must be >= 0, got {s['loss_weight']!r}")
        overrides = s["teacher_overrides"]
        if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
            raise ValueError(f"lgd.fgfi.teacher_overrides must be a list of key=value strings, got {overrides!r}")
        if not isinstance(s["teacher_checkpoint"], str):
            raise ValueError(f"lgd.fgfi.teacher_checkpoint must be a path (a string), got {s['teacher_checkpoint']!r}")

    def teacher_config(self):
        """The run's config with teacher_overrides applied: the teacher's architecture (and its stage's run)."""
        cfg = copy.deepcopy(self.cfg)
        try:
            return apply_overrides_strict(cfg, list(self.settings["teacher_overrides"]))
        except UsageError as exc:
            raise UsageError(f"lgd.fgfi.teacher_overrides: {exc}", hint=exc.hint) from None

    def stages(self) -> List[Stage]:
        """The teacher's pretraining (a baseline run of teacher_config()), unless teacher_checkpoint is given."""
        if self.settings["teacher_checkpoint"]:
            return []
        cfg = self.teacher_config()
        cfg.lgd.method = "baseline"
        return [Stage("teacher", cfg)]

    def build(self, detector: nn.Module, checkpoints: Dict[str, str]) -> nn.Module:
        path = self.settings["teacher_checkpoint"] or checkpoints.get("teacher")
        if not path:
            raise ValueError("FGFI: no teacher weights: set lgd.fgfi.teacher_checkpoint or pass the 'teacher' "
                             f"stage's checkpoint (got checkpoints for {sorted(checkpoints)})")
        teacher = instantiate(self.teacher_config().model).to(detector.device)
        AtomicCheckpointer(teacher).load_checked(path)  # refuses missing or misshapen weights
        return FGFIDistiller(detector, teacher, psi=self.settings["psi"], loss_weight=self.settings["loss_weight"])
