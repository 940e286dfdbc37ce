"""What every training method's model shares (LGDDistiller, and lgd.methods' FGFI, LabelEnc, DML, BAN, tf-KD).

DetectorWrapper: a detectron2 detector, the student, in `detector`, plus what the method trains it with.
Inference is the student's alone (no cost at test time); training checks that every input carries its ground
truth and returns the method's losses; parts named in `frozen` (a pretrained teacher) are frozen where they
are declared: no gradient (so no optimizer slot) and eval mode for the whole run.
detection_step: the detector's own training pass on a batch through its lgd.modeling.detector_drivers driver
(the stock training forward, keeping the features, targets and padded images for the method's extra losses).
"""
from typing import Dict, List, NamedTuple

import torch
import torch.nn as nn

from .detector_drivers import DetectorDriver

__all__ = ["DetectionStep", "DetectorWrapper", "detection_step"]


class DetectionStep(NamedTuple):
    """One training pass of a detector: its padded images, ground truth on its device, backbone features
    (every level), the adapter's targets and the detector's own loss dict."""

    images: object
    gt_instances: list
    features: Dict[str, torch.Tensor]
    targets: Dict
    losses: Dict[str, torch.Tensor]


def detection_step(driver: DetectorDriver, batched_inputs: List[Dict], images=None) -> DetectionStep:
    """The detector's own training losses on batched_inputs, run through its driver, keeping the features for
    distillation. images: the batch already preprocessed (ImageList) by a detector with the same pixel
    normalization, or None."""
    detector = driver.detector
    if images is None:
        images = detector.preprocess_image(batched_inputs)
    gt_instances = [x["instances"].to(detector.device) for x in batched_inputs]
    features = driver.features(images)
    targets = driver.targets(images, features, gt_instances)
    losses = dict(targets.get("student_losses", {}))
    losses.update(driver.losses(images, features, gt_instances, targets))
    return DetectionStep(images, gt_instances, features, targets, losses)


class DetectorWrapper(nn.Module):
    """Base of the methods' models (module docstring). Subclasses set `detector` and implement
    training_losses(batched_inputs) -> dict of losses; `frozen` names the submodules that get requires_grad=False
    when assigned and stay in eval mode."""

    frozen = ()

    @property
    def device(self):
        return self.detector.device

    def __setattr__(self, name, value):
        if name in self.frozen and isinstance(value, nn.Module):
            value.requires_grad_(False).eval()
        super().__setattr__(name, value)

    def train(self, mode: bool = True):
        """As nn.Module.train, except that the `frozen` parts stay in eval mode (frozen norm statistics)."""
        super().train(mode)
        for name in self.frozen:
            getattr(self, name).eval()
        return self

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.detector(batched_inputs)
        if not batched_inputs or any("instances" not in x for x in batched_inputs):
            raise ValueError(f"{type(self).__name__}: training needs 'instances' in every input dict")
        return self.training_losses(batched_inputs)

    def training_losses(self, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError
