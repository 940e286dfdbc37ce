"""LabelEnc (Hao et al., ECCV 2020), two steps on lgd's trainer (docs/methods/labelenc.md).

Step 1 (the stage "labelenc_step1", LabelEncStep1): the label-encoding network (lgd.modeling.
label_encoding_network) turns the ground truth's colour maps into FPN features, and the detector's own head
and losses run on them ("ae_" losses); as in the authors' code, a regular detector is trained on the images
alongside, sharing that head, with a distance loss from its adapted features to the (detached) label
features. Its length and LR steps are the authors' (STEP1_SCHEDULE), scaled as the run's schedule is, and
its detector is the run's with lgd.labelenc.step1_overrides (the configs: the authors' R-50). Step 2 (the main run, LabelEncStep2): the student is initialised from step 1 (head, and the FPN from
the label-encoding network's FPN) and trained with its detection losses plus loss_labelenc, the distance from
its adapted FPN features to the frozen label-encoding network's.
"""
import copy
import dataclasses
from typing import Dict

import torch
import torch.nn as nn
from detectron2.engine import HookBase
from detectron2.utils.events import get_event_storage

from ..config import apply_overrides_strict
from ..engine.checkpoint import read_checkpoint
from ..engine.hooks import unwrap_model
from ..engine.schedule import LGDSchedule
from ..errors import UsageError
from ..modeling.detector_drivers import (FCOSDriver, RCNNDriver, RetinaNetDriver,
                                          build_detector_driver)
from ..modeling.label_encoding_network import (build_label_encoding_network, feature_adapter,
                                               feature_distance, render_colour_maps)
from ..modeling.wrapper import DetectorWrapper, detection_step
from .base import METHOD_REGISTRY, Stage, TrainingMethod

__all__ = ["LabelEnc", "LabelEncStep1", "LabelEncStep2", "LossWindow", "STEP1_SCHEDULE"]

STEP1 = "labelenc_step1"
# the authors' step 1 at batch 16: their 1x (90k) lengthened by the 30k iterations without the distance loss
# (step1_loss_start), LR steps moved to 90k and 110k. LabelEnc uses no distillation or backbone-freeze window
STEP1_SCHEDULE = LGDSchedule(120000, (90000, 110000), distill_start_iter=0, backbone_freeze_iters=0)
AE_PREFIX = "ae_"  # step 1: the head's losses on the label features (the authors' names)
AE_SCOPE = "labelenc_ae"  # EventStorage scope of the metrics the head logs on the label features
SUPPORTED = (RetinaNetDriver, FCOSDriver, RCNNDriver)


class _LabelEncModel(DetectorWrapper):
    """What both steps share: the detector, its driver, the label-encoding network, the feature adapter and
    the distance loss (on while loss_enabled; LossWindow sets it per iteration)."""

    # the label-encoding network stays NCHW on the fast path: torch 2.14's CPU backward of a 1x1 stride-2 conv
    # with 8 input channels in channels_last corrupts the heap (the demo's stage-1 shortcut; benchmarks/README.md)
    nchw_modules = ("label_net",)

    def __init__(self, detector: nn.Module, settings: Dict):
        super().__init__()
        self.detector = detector
        supported = "supported: RetinaNet, FCOS, Faster/Mask R-CNN (GeneralizedRCNN with StandardROIHeads)"
        try:
            self.detector_driver = build_detector_driver(detector)
        except ValueError as err:
            raise ValueError(f"LabelEnc: unsupported detector {type(detector).__name__}; {supported} ({err})") from err
        if not isinstance(self.detector_driver, SUPPORTED):  # a family registered later: untested here
            raise ValueError(f"LabelEnc: unsupported detector {type(detector).__name__}; {supported}")
        self.num_classes = self.detector_driver.num_classes
        self.label_net = build_label_encoding_network(detector.backbone, self.num_classes,
                                                      blocks=tuple(settings["blocks"]),
                                                      stem_channels=settings["stem_channels"])
        self.adapter = feature_adapter(self.detector_driver.feature_channels())
        self.loss_weight = float(settings["loss_weight"])
        self.loss_enabled = True

    def _label_features(self, images, gt, jitter):
        maps = render_colour_maps(gt, self.num_classes, tuple(images.tensor.shape[-2:]), jitter=jitter)
        return self.label_net(maps.to(images.tensor.dtype))

    def _distance(self, features, label_features):
        levels = self.detector_driver.in_features
        adapted = [self.adapter(features[f]) for f in levels]
        return self.loss_weight * feature_distance(adapted, [label_features[f] for f in levels])


class LabelEncStep1(_LabelEncModel):
    """Step 1: detection losses on the images (the detector) and on the label features ("ae_" names, the same
    head), plus loss_labelenc (detector features -> detached label features) while loss_enabled. The colour
    maps are jittered (the authors' step-1 augmentation). Everything here trains."""

    def training_losses(self, batched_inputs):
        driver = self.detector_driver
        # the targets are reused on the label features: they have the same sizes
        images, gt, features, targets, losses = detection_step(driver, batched_inputs)
        label_features = self._label_features(images, gt, jitter=True)
        with get_event_storage().name_scope(AE_SCOPE):
            for name, value in driver.losses(images, label_features, gt, targets).items():
                losses[AE_PREFIX + name] = value
        if self.loss_enabled:  # off: not computed, so the adapter gets no gradient and no weight decay
            losses["loss_labelenc"] = self._distance(features, label_features)
        return losses


class LabelEncStep2(_LabelEncModel):
    """Step 2: the student's detection losses plus loss_labelenc (student features through the adapter ->
    the frozen label-encoding network's features) while loss_enabled. `step1_state`: step 1's model
    state_dict: the label-encoding network is loaded from it and frozen; the student's head (every detector
    weight outside backbone.*) comes from step 1's detector and the student's FPN from the label-encoding
    network's FPN, as the authors' code initialises step 2."""

    def __init__(self, detector: nn.Module, settings: Dict, step1_state: Dict[str, torch.Tensor]):
        super().__init__(detector, settings)
        self.label_net.load_state_dict(_under(step1_state, "label_net."))
        head = {k: v for k, v in _under(step1_state, "detector.").items() if not k.startswith("backbone.")}
        fpn = {"backbone." + k: v for k, v in self.label_net.state_dict().items() if not k.startswith("bottom_up.")}
        current = detector.state_dict()
        unexpected = sorted((set(head) | set(fpn)) - set(current))
        missing = sorted(k for k in current if not k.startswith("backbone.bottom_up.") and k not in {**head, **fpn})
        if unexpected or missing:
            raise ValueError(f"LabelEnc: the step-1 checkpoint does not fit the student: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}")
        # a complete state_dict: a partial one (strict=False) makes detectron2's FrozenBatchNorm2d fill the
        # bottom-up's missing running_mean / running_var with 0 / 1, wiping the backbone's ImageNet statistics
        detector.load_state_dict({**current, **head, **fpn})

    frozen = ("label_net",)

    def training_losses(self, batched_inputs):
        images, gt, features, _, losses = detection_step(self.detector_driver, batched_inputs)
        if self.loss_enabled:
            with torch.no_grad():
                label_features = self._label_features(images, gt, jitter=False)
            losses["loss_labelenc"] = self._distance(features, label_features)
        return losses


def _under(state: Dict, prefix: str) -> Dict:
    part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not part:
        raise ValueError(f"LabelEnc: the step-1 checkpoint has no '{prefix}' weights (not a LabelEnc step-1 run?)")
    return part


class LossWindow(HookBase):
    """loss_labelenc on for iterations [start, end) of the run (model.loss_enabled; logs labelenc/loss_enabled)."""

    def __init__(self, start: int, end: int):
        self.start, self.end = int(start), int(end)

    def before_step(self):
        enabled = self.start <= self.trainer.iter < self.end
        unwrap_model(self.trainer.model).loss_enabled = enabled
        self.trainer.storage.put_scalar("labelenc/loss_enabled", float(enabled), smoothing_hint=False)


@METHOD_REGISTRY.register()
class LabelEnc(TrainingMethod):
    """LabelEnc: step 1 as a stage (unless step1_checkpoint is given), step 2 as the main run."""

    name = "labelenc"
    DEFAULTS = dict(
        step=2,                 # 1: the label-encoding run (the stage), 2: the student (the main run)
        step1_checkpoint=None,  # a step-1 model_final.pth: no stage, step 2 starts from it
        step1_iters=None,       # step 1's train.max_iter; None: STEP1_SCHEDULE's 120k scaled as the run's
                                # schedule is (train.max_iter / lgd.schedule.max_iter)
        step1_overrides=[],     # key=value overrides of the run's config that give step 1's detector (the
                                # configs: the authors' R-50 for R-101 and DCN runs)
        loss_weight=1.0,        # weight of loss_labelenc (both steps; the authors' 1.0)
        step1_loss_start=0.25,  # step 1: loss_labelenc from this fraction of the run (the authors: 30k of 120k)
        step2_loss_end=80000 / 90000,  # step 2: loss_labelenc until this fraction (the authors: 80k of 90k)
        stem_channels=None,     # the label CNN's stem width (None: half the first stage's; 128 for ResNet-50)
        blocks=(1, 2, 2, 1),    # bottleneck blocks per stage of the label CNN (strides 4, 8, 16, 32)
    )

    def __init__(self, cfg):
        super().__init__(cfg)
        s = self.settings
        if s["step"] not in (1, 2) or isinstance(s["step"], bool):
            raise ValueError(f"lgd.labelenc.step must be 1 or 2, got {s['step']!r}")
        if s["step1_iters"] is not None and (not isinstance(s["step1_iters"], int) or s["step1_iters"] < 1):
            raise ValueError(f"lgd.labelenc.step1_iters must be None or an int >= 1, got {s['step1_iters']!r}")
        for key in ("step1_loss_start", "step2_loss_end"):
            if not 0 <= float(s[key]) <= 1:
                raise ValueError(f"lgd.labelenc.{key} must be a fraction in [0, 1], got {s[key]!r}")
        overrides = s["step1_overrides"]
        if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
            raise ValueError(f"lgd.labelenc.step1_overrides must be a list of key=value strings, got {overrides!r}")

    def step1_iters(self) -> int:
        """Step 1's train.max_iter: step1_iters, or STEP1_SCHEDULE's length scaled as the run's schedule is."""
        if self.settings["step1_iters"] is not None:
            return int(self.settings["step1_iters"])
        fraction = int(self.cfg.train.max_iter) / int(self.cfg.lgd.schedule.max_iter)
        return max(1, int(round(STEP1_SCHEDULE.max_iter * fraction)))

    def stages(self):
        """Step 1: the run's config with step1_overrides, STEP1_SCHEDULE over step1_iters(), no evaluation."""
        s = self.settings
        if s["step"] == 1 or s["step1_checkpoint"] is not None:
            return []
        cfg = copy.deepcopy(self.cfg)
        try:
            apply_overrides_strict(cfg, list(s["step1_overrides"]))
        except UsageError as exc:
            raise UsageError(f"lgd.labelenc.step1_overrides: {exc}", hint=exc.hint) from None
        cfg.lgd.method = self.name
        cfg.lgd[self.name] = {**s, "step": 1, "step1_checkpoint": None, "step1_overrides": []}
        cfg.lgd.schedule = dataclasses.asdict(STEP1_SCHEDULE)
        cfg.dataloader.evaluator = None
        cfg.train.max_iter = self.step1_iters()
        return [Stage(STEP1, cfg)]

    def build(self, detector, checkpoints):
        s = self.settings
        if s["step"] == 1:
            return LabelEncStep1(detector, s)
        path = s["step1_checkpoint"] or checkpoints.get(STEP1)
        if path is None:
            raise ValueError(f"LabelEnc step 2 needs the step-1 checkpoint: lgd.labelenc.step1_checkpoint or the "
                             f"stage '{STEP1}'")
        state = read_checkpoint(str(path))
        return LabelEncStep2(detector, s, state.get("model", state))

    def hooks(self, schedule):
        s, max_iter = self.settings, schedule.max_iter
        if s["step"] == 1:
            return [LossWindow(round(float(s["step1_loss_start"]) * max_iter), max_iter)]
        return [LossWindow(0, round(float(s["step2_loss_end"]) * max_iter))]
