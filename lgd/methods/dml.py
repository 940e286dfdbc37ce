"""DML (Deep Mutual Learning, Zhang et al., CVPR 2018) transferred to detection (docs/methods/dml.md).

Two students, two instances of the same detector with different random initial weights, train together:
each one with its own detection losses plus LGD's feature distillation (DistillationLoss: its own adapter,
normalized MSE over the FPN levels, docs/method.md §4) towards the other's FPN features, detached. This is the
transfer the LGD paper compares with (its Table 2): DML's KL between the peers' class posteriors becomes a
mimicry of the peer's intermediate features. The first student (`detector`) is the one evaluated and
exported; the second (`peer`) is simply a trainable part of the model, trained by the same optimizer.

feature_distillation (the distillation loss sized from a detector's driver) is shared with lgd.methods.ban.
"""
import math
from typing import Dict, List

import torch
import torch.nn as nn
from detectron2.config import instantiate
from detectron2.utils.events import get_event_storage

from ..engine.checkpoint import DetectorEMAState
from ..modeling.detector_drivers import DetectorDriver, build_detector_driver
from ..modeling.distillation_loss import DistillationLoss
from ..modeling.wrapper import DetectionStep, DetectorWrapper, detection_step
from .base import METHOD_REGISTRY, TrainingMethod

__all__ = ["DML", "MutualLearning", "PEER_SCOPE", "PEER_SUFFIX", "feature_distillation"]

PEER_SUFFIX = "_peer"  # the second student's losses: the detector's names with this suffix
PEER_SCOPE = "dml_peer"  # EventStorage prefix of the metrics the second student's heads log


def feature_distillation(driver: DetectorDriver, loss_weight: float, backend: str) -> DistillationLoss:
    """LGD's distillation loss (its own adapter F_adapt) for the levels `adapter` distills; backend: the run's
    lgd_ops backend (TrainingMethod.backend)."""
    return DistillationLoss(driver.feature_channels(), loss_weight=float(loss_weight), backend=backend)


def distilled(step: DetectionStep, driver: DetectorDriver) -> Dict[str, torch.Tensor]:
    """The levels of a DetectionStep that the adapter distills."""
    return {f: step.features[f] for f in driver.in_features}


class MutualLearning(DetectorWrapper):
    """Two detectors trained together, each mimicking the other's detached FPN features (module docstring).

    Training forward: the detector's losses, the peer's with the suffix PEER_SUFFIX (its heads' metrics
    under the EventStorage scope PEER_SCOPE), loss_distill (detector -> peer's features) and
    loss_distill_peer (peer -> detector's features). Eval: the detector's outputs. The peer's EMA loss
    normalizer (RetinaNet, FCOS) travels in the state_dict as extra state, so a resumed run restores it.
    """

    def __init__(self, detector: nn.Module, peer: nn.Module, distill_loss: DistillationLoss,
                 peer_distill_loss: DistillationLoss):
        super().__init__()
        if type(detector) is not type(peer):
            raise ValueError(f"MutualLearning: the two students must be the same detector, got "
                             f"{type(detector).__name__} and {type(peer).__name__}")
        self.detector, self.peer = detector, peer
        self.init_checkpoint_modules = ("detector", "peer")  # both students start from train.init_checkpoint
        self.distill_loss, self.peer_distill_loss = distill_loss, peer_distill_loss
        self.drivers = (build_detector_driver(detector), build_detector_driver(peer))
        self._peer_ema = DetectorEMAState(peer)

    def training_losses(self, batched_inputs: List[Dict]):
        driver, peer_driver = self.drivers
        first = detection_step(driver, batched_inputs)
        with get_event_storage().name_scope(PEER_SCOPE):
            second = detection_step(peer_driver, batched_inputs, images=first.images)
        losses = dict(first.losses)
        losses.update({name + PEER_SUFFIX: value for name, value in second.losses.items()})
        mine, theirs = distilled(first, driver), distilled(second, peer_driver)
        losses["loss_distill"] = self.distill_loss(mine, theirs)  # DistillationLoss detaches its target
        losses["loss_distill" + PEER_SUFFIX] = self.peer_distill_loss(theirs, mine)
        return losses

    def get_extra_state(self):
        """The peer's EMA loss normalizers as a float64 tensor (NaN: not set yet), in _peer_ema's order."""
        state = self._peer_ema.state_dict()
        return torch.tensor([state.get(name, math.nan) for name in self._peer_ema.names], dtype=torch.float64)

    def set_extra_state(self, state):
        values = [float(v) for v in torch.as_tensor(state).reshape(-1)]
        if len(values) != len(self._peer_ema.names):
            raise ValueError(f"MutualLearning: extra state holds {len(values)} EMA values, the peer has "
                             f"{len(self._peer_ema.names)} ({self._peer_ema.names})")
        self._peer_ema.load_state_dict({n: v for n, v in zip(self._peer_ema.names, values) if not math.isnan(v)})


@METHOD_REGISTRY.register()
class DML(TrainingMethod):
    """lgd.method="dml": MutualLearning of the run's detector and a second instance of cfg.model.

    Settings (cfg.lgd.dml): distill_weight, the weight of each student's loss_distill (LGD's λ = 1).
    The peer is instantiated right after the student from the same random stream, so its random initial
    weights differ from the student's and are fixed by the run's seed."""

    name = "dml"
    DEFAULTS = {"distill_weight": 1.0}

    def build(self, detector: nn.Module, checkpoints: Dict[str, str]) -> nn.Module:
        peer = instantiate(self.cfg.model)
        weight = self.settings["distill_weight"]
        losses = [feature_distillation(build_detector_driver(d), weight, self.backend) for d in (detector, peer)]
        return MutualLearning(detector, peer, *losses).to(detector.device)
