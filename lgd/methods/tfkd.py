"""tf-KD_reg (Yuan et al., CVPR 2020, "Revisiting Knowledge Distillation via Label Smoothing Regularization")
on the box classifier of Faster / Mask R-CNN (docs/methods/tfkd.md).

Teacher-free KD with a manually designed teacher: for a sample of class c among K, the virtual teacher gives
c the probability a and every other class (1 - a) / (K - 1); softened by the temperature T (a softmax of
those probabilities divided by T, as the authors' code does), it is the target of a KL term on the
classifier's softmax:

    loss = (1 - α) · CE(z, c) + α · KL( softmax(p^d / T) || softmax(z) )

with the authors' a = 0.99, T = 20, α = 0.1. It is defined for a softmax classifier: the R-CNN box
classifier, over the K + 1 classes of its sampled proposals (background included). RetinaNet and FCOS
classify with per-class sigmoids (focal loss), where the method has no defined counterpart: refused.
"""
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modeling.detector_drivers import RCNNDriver, build_detector_driver
from ..modeling.wrapper import DetectorWrapper, detection_step
from .base import METHOD_REGISTRY, TrainingMethod

__all__ = ["TfKD", "TfKDRegularized", "tfkd_reg_loss", "virtual_teacher"]


def virtual_teacher(labels: torch.Tensor, num_classes: int, correct_prob: float, temperature: float) -> torch.Tensor:
    """[N, num_classes] float32: softmax(p^d / temperature), p^d the manually designed distribution of each label
    (correct_prob on the label, the rest spread uniformly)."""
    if num_classes < 2:
        raise ValueError(f"virtual_teacher: num_classes must be >= 2, got {num_classes}")
    p = torch.full((labels.shape[0], num_classes), (1.0 - correct_prob) / (num_classes - 1), device=labels.device)
    p.scatter_(1, labels.reshape(-1, 1).long(), correct_prob)
    return F.softmax(p / temperature, dim=1)


def tfkd_reg_loss(logits: torch.Tensor, labels: torch.Tensor, correct_prob: float = 0.99,
                  temperature: float = 20.0) -> torch.Tensor:
    """KL(virtual teacher || softmax(logits)) of each row, summed over classes, averaged over rows (in fp32;
    0 without rows). logits [N, K] (K >= 2), labels [N] in [0, K)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"tfkd_reg_loss: logits must be [N, K] and labels [N], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if not len(logits):
        return logits.sum().float() * 0.0
    target = virtual_teacher(labels, logits.shape[1], correct_prob, temperature)
    return F.kl_div(F.log_softmax(logits.float(), dim=1), target, reduction="batchmean")


class TfKDRegularized(DetectorWrapper):
    """A Faster / Mask R-CNN trained with tf-KD_reg on its box classifier (module docstring).

    Training forward: the detector's losses with loss_cls scaled by (1 - alpha), and loss_tfkd (alpha times
    tfkd_reg_loss of the box classifier's scores over the sampled proposals). Eval: the detector's outputs.
    """

    def __init__(self, detector: nn.Module, *, alpha: float = 0.1, correct_prob: float = 0.99,
                 temperature: float = 20.0):
        super().__init__()
        # the student's own computation: one RPN, then the ROI heads on its sampled proposals
        driver = build_detector_driver(detector, rcnn_branch="shared_proposals")
        if not isinstance(driver, RCNNDriver):
            raise ValueError(f"tf-KD_reg (lgd.method='tfkd') is defined for softmax box classifiers: Faster R-CNN "
                             f"and Mask R-CNN; {type(detector).__name__} classifies with sigmoids (focal loss)")
        num_classes = driver.num_classes + 1  # and background
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"lgd.tfkd.alpha must be in [0, 1], got {alpha!r}")
        if not 1.0 / num_classes <= correct_prob <= 1.0:
            raise ValueError(f"lgd.tfkd.correct_prob must be in [1/{num_classes}, 1] (the correct class at least "
                             f"as likely as the others), got {correct_prob!r}")
        if not temperature > 0:
            raise ValueError(f"lgd.tfkd.temperature must be > 0, got {temperature!r}")
        self.detector, self.driver = detector, driver
        self.alpha, self.correct_prob, self.temperature = float(alpha), float(correct_prob), float(temperature)

    def training_losses(self, batched_inputs: List[Dict]):
        scores = []
        hook = self.detector.roi_heads.box_predictor.register_forward_hook(
            lambda module, inputs, outputs: scores.append(outputs[0]))
        try:
            step = detection_step(self.driver, batched_inputs)
        finally:
            hook.remove()
        labels = torch.cat([p.gt_classes for p in step.targets["proposals"]])
        losses = dict(step.losses)
        losses["loss_cls"] = (1.0 - self.alpha) * losses["loss_cls"]
        losses["loss_tfkd"] = self.alpha * tfkd_reg_loss(scores[0], labels, self.correct_prob, self.temperature)
        return losses


@METHOD_REGISTRY.register()
class TfKD(TrainingMethod):
    """lgd.method="tfkd": TfKDRegularized. Settings (cfg.lgd.tfkd): alpha (α, the KD term's weight; the
    cross-entropy gets 1 - α), correct_prob (a) and temperature (T): the authors' 0.1, 0.99 and 20."""

    name = "tfkd"
    DEFAULTS = {"alpha": 0.1, "correct_prob": 0.99, "temperature": 20.0}

    def build(self, detector: nn.Module, checkpoints: Dict[str, str]) -> nn.Module:
        return TfKDRegularized(detector, **{k: float(v) for k, v in self.settings.items()})
