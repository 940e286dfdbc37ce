"""LGDDistiller: a stock detectron2 detector trained with LGD (docs/method.md §8), the student kept unchanged.

In training the student's backbone runs once; LGDTeacher turns its distilled levels plus the ground truth into the
instructive features X^I; the detector's OWN heads and losses run on both, with the targets computed once; and
DistillationLoss compares the adapted student features with X^I detached. Inference is the detector's alone, so
LGD adds no inference cost. A plain nn.Module wrapper rather than a META_ARCH_REGISTRY entry: any stock config's
model (LazyConfig or yacs build_model) is wrapped unchanged and its weights stay under `detector.`, so the
student is exported by saving `lgd_model.detector`. Use in a training loop of your own: docs/library.md.
"""
import copy
from typing import Dict, List, Optional

import torch.nn as nn
from detectron2.utils.events import get_event_storage
from torch.utils.checkpoint import checkpoint

from .detector_drivers import build_detector_driver
from .distillation_loss import DistillationLoss
from .teacher import LGDTeacher
from .wrapper import DetectorWrapper, detection_step

TEACHER_SUFFIX = "_tea"
TEACHER_SCOPE = "lgd_teacher"  # EventStorage prefix of the metrics the heads log on the instructive branch
INSTRUCTIVE_HEADS = ("shared", "unshared")  # lgd.instructive_head


class LGDDistiller(DetectorWrapper):
    """A detectron2 detector (the student) plus LGD's teacher and distillation loss (see the module docstring).

    detector: a built detectron2 RetinaNet, FCOS or (Faster/Mask) R-CNN. num_classes and the feature channels
    are read from it. teacher / distill_loss: pass your own to override the defaults (LGDTeacher with the
    detector's context/detach/mask settings, DistillationLoss()). use_context: the context object (None: the
    family's default, on for RetinaNet/FCOS, off for R-CNN; the authors' FCOS R50 configs turn it off).
    stn_pool: the label encoder's STN ("object", the method; "image", a variant). rcnn_branch: see RCNNDriver.
    label_encoder, interaction, use_objects: the paper's ablations of the teacher (LGDTeacher; defaults: the
    method). instructive_head: "shared" (the method: the instructive branch runs the detector's own heads) or
    "unshared" (the paper's Table 6b): it runs `instructive_head`, copies of the modules the driver names
    (RetinaNet/FCOS: the head; R-CNN: the RPN and the ROI heads, the ROI heads only with shared proposals)
    made when the distiller is built, so the same architecture and initial weights as the student's; from
    then on they learn from the instructive losses only, the student's heads from the student's only, and
    inference never runs them (docs/method.md §8).
    backend goes to every lgd_ops call ("auto", "reference", "cpu", ...). distill_enabled: see the property.
    recompute_teacher: keep none of the teacher's activations for backward and run its forward again there
    (torch.utils.checkpoint, RNG state preserved): the same losses and gradients for less peak memory and one
    more teacher forward per step (benchmarks/README.md, "Training step", has the trade).
    """

    def __init__(self, detector: nn.Module, *, teacher: Optional[LGDTeacher] = None,
                 distill_loss: Optional[DistillationLoss] = None, distill_weight: float = 1.0,
                 distill_enabled: bool = True, use_context: Optional[bool] = None, stn_pool: str = "object",
                 rcnn_branch: str = "detector", label_encoder: str = "pointnet", interaction: str = "student_guided",
                 use_objects: bool = True, instructive_head: str = "shared", backend: str = "auto",
                 recompute_teacher: bool = False):
        super().__init__()
        if instructive_head not in INSTRUCTIVE_HEADS:
            raise ValueError(f"LGDDistiller: instructive_head must be one of {INSTRUCTIVE_HEADS}, "
                             f"got {instructive_head!r}")
        self.detector = detector
        self.detector_driver = build_detector_driver(detector, rcnn_branch=rcnn_branch)
        channels = self.detector_driver.feature_channels()
        self.teacher = teacher if teacher is not None else LGDTeacher(
            self.detector_driver.num_classes, channels=channels,
            use_context=self.detector_driver.use_context if use_context is None else bool(use_context),
            detach_appearance=self.detector_driver.detach_appearance, use_masks=self.detector_driver.use_masks,
            stn_pool=stn_pool, label_encoder=label_encoder, interaction=interaction, use_objects=use_objects,
            backend=backend)
        self.instructive_head = (nn.ModuleDict({name: copy.deepcopy(module) for name, module
                                                in self.detector_driver.instructive_heads().items()})
                                 if instructive_head == "unshared" else None)
        self.distill_loss = distill_loss if distill_loss is not None else DistillationLoss(
            channels, loss_weight=distill_weight, backend=backend)
        self.distill_enabled = distill_enabled
        self.recompute_teacher = bool(recompute_teacher)
        self._backbone_frozen = False
        # what the stock detector trains (detectron2's FREEZE_AT keeps the stem and res2 frozen for good)
        self._freezable = [p for p in self.detector_driver.bottom_up.parameters() if p.requires_grad]

    @property
    def distill_enabled(self) -> bool:
        """False during the distillation warm-up (docs/method.md §4, §8): loss_distill then trains only the
        student adapter."""
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
        """The LGD teacher (label/appearance encoders, relation adapter, knowledge mapper) and the unshared
        instructive head, if any: the teacher optimizer's parameters (docs/method.md §8)."""
        return list(self.teacher_modules().parameters())

    def teacher_modules(self) -> nn.ModuleList:
        """The modules teacher_parameters() holds."""
        return nn.ModuleList([self.teacher] + ([self.instructive_head] if self.instructive_head is not None else []))

    def training_losses(self, batched_inputs: List[Dict]):
        driver = self.detector_driver
        images, gt_instances, features, targets, losses = detection_step(driver, batched_inputs)
        distilled = {f: features[f] for f in driver.in_features}
        image_size = tuple(images.tensor.shape[-2:])
        # packed and checked once, on the host, from the loader's CPU boxes; moved to the device without waiting
        labels = self.teacher.pack([x["instances"] for x in batched_inputs], image_size).to(self.device)
        if self.recompute_teacher:
            instructive = checkpoint(self.teacher, distilled, labels, image_size, use_reentrant=False)
        else:
            instructive = self.teacher(distilled, labels, image_size)
        with get_event_storage().name_scope(TEACHER_SCOPE):  # the heads' own metrics, kept apart
            for name, value in driver.losses(images, instructive, gt_instances, targets,
                                             heads=self.instructive_head).items():
                losses[name + TEACHER_SUFFIX] = value
        losses["loss_distill"] = self.distill_loss(distilled, instructive, warmup=not self.distill_enabled)
        return losses
