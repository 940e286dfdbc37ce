"""The training-method contract (TrainingMethod, Stage), the registry of methods and build_method.

A method is a TrainingMethod subclass registered in METHOD_REGISTRY (a detectron2 Registry) under its `name`,
the value of lgd.method that picks it. Its settings are its DEFAULTS, overridden by the config node its
`config_node` names: "lgd.<name>" unless the class says otherwise (LGD's knobs are the top-level lgd.* keys).
"""
import copy
import dataclasses
import os
from typing import Dict, List, Optional

import torch.nn as nn
from detectron2.utils.registry import Registry

from ..config import check_removed_keys

__all__ = ["METHOD_REGISTRY", "SHARED_KEYS", "Stage", "TrainingMethod", "build_method", "method_class",
           "method_name", "method_names", "stage_checkpoint"]

# lgd.* keys every run reads whatever its method: no method's settings
SHARED_KEYS = ("method", "backend", "schedule")


class _MethodRegistry(Registry):
    """detectron2's Registry naming each entry by its `name` (the lgd.method value), not its class name."""

    def register(self, obj=None):
        if obj is None:
            return self.register
        self._do_register(obj.name, obj)
        return obj


METHOD_REGISTRY = _MethodRegistry("LGD_METHOD")
METHOD_REGISTRY.__doc__ = """Training methods (TrainingMethod subclasses), each under its `name`: lgd.method's value."""


@dataclasses.dataclass
class Stage:
    """A run a method needs before its own (a teacher's pretraining, LabelEnc's step 1, BAN's earlier
    generation): trained by lgd-train with `cfg` (a full LazyConfig; lgd-train sets its train.output_dir to
    OUTPUT/<name> and keeps its other keys) and handed to the method's build() as the path of its final
    checkpoint (stage_checkpoint). `name` is a folder name: letters, digits, "_" and "-". A stage's cfg may
    point at an earlier stage's checkpoint by its path, stage_checkpoint(run output_dir, earlier name)."""

    name: str
    cfg: object


def stage_checkpoint(output_dir: str, name: str) -> str:
    """Where the stage `name` of a run writing into output_dir leaves its final checkpoint."""
    return os.path.join(output_dir, name, "model_final.pth")


def _node(cfg, key: str) -> Dict:
    node = cfg
    for part in key.split("."):
        node = node.get(part) if hasattr(node, "get") else None
    return dict(node or {})


class TrainingMethod:
    """One way to train the student (lgd.methods' docstring). Subclasses set `name` (their registry key) and
    DEFAULTS (every setting, with its default) and implement build(); stages() and build_optimizer() have
    defaults (no prerequisite; one SGD over every trainable parameter). config_node: the config node holding
    the settings, None for lgd.<name>."""

    name = ""
    DEFAULTS: Dict = {}
    config_node: Optional[str] = None

    @classmethod
    def settings_key(cls) -> str:
        """The dotted config key of the method's settings."""
        return cls.config_node or f"lgd.{cls.name}"

    def __init__(self, cfg):
        self.cfg = cfg
        key = self.settings_key()
        given = _node(cfg, key)
        if key == "lgd":  # the run's shared keys and the other methods' nodes sit beside the settings
            given = {k: v for k, v in given.items() if k not in SHARED_KEYS and k not in METHOD_REGISTRY}
        unknown = sorted(set(given) - set(self.DEFAULTS))
        if unknown:
            raise ValueError(f"{key}: unknown settings {unknown}; known: {sorted(self.DEFAULTS)}")
        self.settings = {**copy.deepcopy(self.DEFAULTS), **given}
        self.backend = str(_node(cfg, "lgd").get("backend", "auto"))

    def stages(self) -> List[Stage]:
        """The prerequisite runs, in order (each may use the checkpoints of the ones before it)."""
        return []

    def build(self, detector: nn.Module, checkpoints: Dict[str, str]) -> nn.Module:
        """The model to train around `detector` (the student, already built from cfg.model), given the final
        checkpoint of every stage by name."""
        raise NotImplementedError

    def build_optimizer(self, model: nn.Module, **sgd_kwargs):
        """The run's optimizer; sgd_kwargs are lgd.engine.optim.build_sgd's (lr, momentum, weight decay, clip)."""
        from ..engine.optim import build_sgd

        return build_sgd(model, **sgd_kwargs)

    def hooks(self, schedule) -> list:
        """detectron2 hooks this method adds to the run (schedule: the run's lgd.engine.schedule.LGDSchedule)."""
        return []


def method_names() -> List[str]:
    """The registered methods' names, sorted: lgd.method's valid values."""
    return sorted(name for name, _ in METHOD_REGISTRY)


def method_class(name: str):
    """The TrainingMethod subclass registered as `name`; a ValueError naming the known ones otherwise."""
    if name not in METHOD_REGISTRY:
        raise ValueError(f"lgd.method must be one of {method_names()}, got {name!r}")
    return METHOD_REGISTRY.get(name)


def method_name(cfg) -> str:
    """The run's method: cfg.lgd.method (default "lgd"), checked against the registry."""
    name = str(_node(cfg, "lgd").get("method", "lgd"))
    method_class(name)
    return name


def build_method(cfg, name=None, backend=None) -> TrainingMethod:
    """The TrainingMethod `name` (default: the run's, method_name) built from cfg; backend (lgd-train --ops)
    replaces cfg.lgd.backend as its lgd_ops backend when given. A config setting a removed key (lgd.enabled,
    a trainer knob that moved to train.*) is a UsageError naming its replacement."""
    check_removed_keys(cfg)
    method = method_class(name or method_name(cfg))(cfg)
    if backend is not None:
        method.backend = str(backend)
    return method
