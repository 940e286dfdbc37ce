"""The LGD schedule (docs/method.md §8): LR steps, distillation warm-up (and end) and backbone freeze, in iterations.

The one table (PAPER_SCHEDULES) and the one scaling rule (LGDSchedule.scaled): the configs hold a schedule
as `lgd.schedule` (this dataclass's fields), and a run of train.max_iter iterations uses
LGDSchedule(**lgd.schedule).scaled(train.max_iter), so a short run keeps the paper's proportions.
PAPER_SCHEDULES["1x"].scaled(900) has steps (600, 800), distillation from 300, the backbone frozen for 100
and 10 warm-up iterations.
"""
import dataclasses
from typing import Tuple

from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler, ParamScheduler

__all__ = ["LGDSchedule", "PAPER_SCHEDULES"]


@dataclasses.dataclass(frozen=True)
class LGDSchedule:
    """Iteration counts of one LGD run. Iterations are 0-based: distillation is on from iteration
    distill_start_iter until iteration max_iter - final_nondistill_iters (excluded: the last
    final_nondistill_iters iterations are without it, the authors' POST_NONDISTILL_ITERS), the bottom-up
    backbone trains from iteration backbone_freeze_iters, the LR drops by 10 at each of steps, after a linear
    warm-up of warmup_iters from warmup_factor (detectron2's)."""

    max_iter: int
    steps: Tuple[int, ...]
    distill_start_iter: int
    backbone_freeze_iters: int
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    final_nondistill_iters: int = 0

    def __post_init__(self):
        counts = dict(max_iter=self.max_iter, distill_start_iter=self.distill_start_iter,
                      backbone_freeze_iters=self.backbone_freeze_iters, warmup_iters=self.warmup_iters,
                      final_nondistill_iters=self.final_nondistill_iters)
        for name, value in counts.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "max_iter" else 0):
                raise ValueError(f"LGDSchedule: {name} must be an int >= {1 if name == 'max_iter' else 0}, "
                                 f"got {value!r}")
        steps = tuple(self.steps)
        if any(not isinstance(x, int) for x in steps) or list(steps) != sorted(set(steps)) or any(
                not 0 < x < self.max_iter for x in steps):
            raise ValueError(f"LGDSchedule: steps must be increasing ints inside (0, {self.max_iter}), got {steps!r}")
        object.__setattr__(self, "steps", steps)

    def scaled(self, max_iter: int) -> "LGDSchedule":
        """This schedule with every iteration count scaled by max_iter / self.max_iter and rounded; LR steps
        kept strictly increasing inside (0, max_iter) (very short runs lose the steps that collide)."""
        if max_iter < 1:
            raise ValueError(f"LGDSchedule.scaled: max_iter must be >= 1, got {max_iter}")
        if max_iter == self.max_iter:
            return self

        def scale(n):
            return int(round(n * max_iter / self.max_iter))

        steps = tuple(sorted({min(max(scale(s), 1), max_iter - 1) for s in self.steps})) if max_iter > 1 else ()
        return dataclasses.replace(self, max_iter=max_iter, steps=steps,
                                   distill_start_iter=scale(self.distill_start_iter),
                                   backbone_freeze_iters=scale(self.backbone_freeze_iters),
                                   warmup_iters=scale(self.warmup_iters),
                                   final_nondistill_iters=scale(self.final_nondistill_iters))

    def lr_multiplier(self) -> ParamScheduler:
        """The LR multiplier over [0, max_iter) as detectron2's model-zoo configs build it."""
        values = [0.1 ** k for k in range(len(self.steps) + 1)]
        steps = MultiStepParamScheduler(values, milestones=list(self.steps) + [self.max_iter])
        return WarmupParamScheduler(steps, self.warmup_factor, self.warmup_iters / self.max_iter)


# the paper's schedules (batch 16): distillation on at 30k for both, backbone frozen 10k (1x) / 20k (2x)
PAPER_SCHEDULES = {
    "1x": LGDSchedule(90000, (60000, 80000), distill_start_iter=30000, backbone_freeze_iters=10000),
    "2x": LGDSchedule(180000, (120000, 160000), distill_start_iter=30000, backbone_freeze_iters=20000),
}
