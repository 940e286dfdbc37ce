"""BAN (Born-Again Neural Networks, Furlanello et al., ICML 2018) transferred to detection (docs/methods/ban.md).

Generations of one detector: generation 1 is a baseline run; generation k is trained from scratch (the run's
initialisation rule) with the detection losses plus LGD's feature distillation (DistillationLoss, docs/method.md
§4) towards the FPN features of the frozen generation k-1. As in the LGD paper's Table 2, the born-again
student mimics its predecessor's intermediate features instead of its class posteriors.

The method declares generations 1 .. n-1 as stages "ban_gen1" .. "ban_gen{n-1}" (n = lgd.ban.generations);
lgd-train trains each into OUTPUT/ban_gen<k>/ with the run's config, lgd.ban.generation=k and
lgd.ban.teacher_checkpoint = the previous stage's final checkpoint; the run itself is generation n.
"""
import copy
from typing import Dict, List

import torch
import torch.nn as nn
from detectron2.config import instantiate

from ..engine.checkpoint import AtomicCheckpointer
from ..modeling.detector_drivers import build_detector_driver
from ..modeling.distillation_loss import DistillationLoss
from ..modeling.wrapper import DetectorWrapper, detection_step
from .base import METHOD_REGISTRY, Stage, TrainingMethod, stage_checkpoint
from .dml import distilled, feature_distillation

__all__ = ["BAN", "BornAgain"]


class BornAgain(DetectorWrapper):
    """A detector trained with its detection losses plus feature distillation (loss_distill) from a frozen
    teacher detector of the same kind, the previous generation. The teacher runs without gradient on the
    student's preprocessed images, has requires_grad False and stays in eval mode; eval: the student's outputs."""

    def __init__(self, detector: nn.Module, teacher: nn.Module, distill_loss: DistillationLoss):
        super().__init__()
        if type(teacher) is not type(detector):
            raise ValueError(f"BornAgain: the teacher must be the same detector as the student, got "
                             f"{type(teacher).__name__} and {type(detector).__name__}")
        self.detector, self.teacher, self.distill_loss = detector, teacher, distill_loss
        self.drivers = (build_detector_driver(detector), build_detector_driver(teacher))

    frozen = ("teacher",)

    def training_losses(self, batched_inputs: List[Dict]):
        driver, teacher_driver = self.drivers
        step = detection_step(driver, batched_inputs)
        with torch.no_grad():
            teacher_features = teacher_driver.features(step.images)
        losses = dict(step.losses)
        losses["loss_distill"] = self.distill_loss(
            distilled(step, driver), {f: teacher_features[f] for f in teacher_driver.in_features})
        return losses


@METHOD_REGISTRY.register()
class BAN(TrainingMethod):
    """lgd.method="ban": generation n of a born-again sequence, after generations 1 .. n-1 as stages.

    Settings (cfg.lgd.ban): generations (n, default 2: one baseline run, then one born-again generation, i.e.
    two full trainings; n costs n trainings); distill_weight (LGD's λ = 1); generation and teacher_checkpoint,
    which the stages' configs set (None in the main run: it is generation n, its teacher the final checkpoint
    of stage ban_gen{n-1}). A run with generation=k > 1 given by hand needs teacher_checkpoint and has no stages.
    """

    name = "ban"
    DEFAULTS = {"generations": 2, "generation": None, "teacher_checkpoint": None, "distill_weight": 1.0}

    def __init__(self, cfg):
        super().__init__(cfg)
        n, k, teacher = (self.settings[key] for key in ("generations", "generation", "teacher_checkpoint"))
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"lgd.ban.generations must be an integer >= 1, got {n!r}")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n):
            raise ValueError(f"lgd.ban.generation must be None or an integer in [1, generations={n}], got {k!r}")
        if teacher is not None and (k is None or k == 1):
            raise ValueError(f"lgd.ban.teacher_checkpoint is the generation-(k-1) teacher of a run with "
                             f"lgd.ban.generation=k >= 2; got it with generation={k!r}")
        if k is not None and k > 1 and teacher is None:
            raise ValueError(f"lgd.ban.generation={k} needs lgd.ban.teacher_checkpoint (generation {k - 1}'s "
                             "final checkpoint); or leave generation unset to train every generation")

    @property
    def generation(self) -> int:
        """The generation this run trains: lgd.ban.generation, or the last one (generations)."""
        k = self.settings["generation"]
        return self.settings["generations"] if k is None else k

    def stages(self) -> List[Stage]:
        if self.settings["generation"] is not None:
            return []  # a stage of a BAN run, or a generation started by hand from its teacher
        output_dir = self.cfg.train.output_dir
        return [Stage(f"ban_gen{k}", self.stage_config(k, output_dir)) for k in range(1, self.generation)]

    def stage_config(self, k: int, output_dir: str):
        """The run's config for generation k, whose teacher is generation k-1's final checkpoint under output_dir."""
        cfg = copy.deepcopy(self.cfg)
        cfg.lgd.method = self.name
        teacher = None if k == 1 else stage_checkpoint(output_dir, f"ban_gen{k - 1}")
        cfg.lgd[self.name] = dict(self.settings, generation=k, teacher_checkpoint=teacher)
        return cfg

    def build(self, detector: nn.Module, checkpoints: Dict[str, str]) -> nn.Module:
        k = self.generation
        if k == 1:
            return detector  # the baseline, as lgd.methods.builtin.Baseline
        path = self.settings["teacher_checkpoint"]
        if path is None:
            name = f"ban_gen{k - 1}"
            if name not in checkpoints:
                raise ValueError(f"BAN: generation {k} needs the checkpoint of stage {name!r}; "
                                 f"got {sorted(checkpoints)}")
            path = checkpoints[name]
        teacher = instantiate(self.cfg.model)
        AtomicCheckpointer(teacher).load_checked(path)  # its student part; refuses missing or misshapen weights
        distill_loss = feature_distillation(build_detector_driver(detector), self.settings["distill_weight"],
                                            self.backend)
        return BornAgain(detector, teacher, distill_loss).to(detector.device)
