"""LGD, label-guided self-distillation for object detection, on detectron2 and the fused lgd_ops (docs/method.md).
This namespace re-exports the paper's modules; docs/library.md shows them used outside lgd-train.

Layers, each importing only those before it: lgd.modeling (the paper's modules, LGDDistiller) < lgd.engine
(trainer, hooks, optimizer, checkpoints) < lgd.methods (LGD, the baseline, the comparison systems) < lgd.runner
(builds and runs a run from its config) < lgd.benchmarks < lgd.tools (the commands); lgd.errors, lgd.config,
lgd.data and lgd.evaluation sit below them all. lgd.demo, the bundled demo, is imported by nothing in the library.
"""
import importlib

# name -> the module that defines it; imported on first use (PEP 562), so `import lgd` loads nothing else and the
# commands can set up logging and warnings before detectron2 is imported
_EXPORTS = {
    "AppearanceEncoder": "modeling.appearance_encoder",
    "DistillationLoss": "modeling.distillation_loss",
    "LGDDistiller": "modeling.distiller",
    "KnowledgeMapper": "modeling.knowledge_mapper",
    "StudentAdapter": "modeling.knowledge_mapper",
    "LabelEncoder": "modeling.label_encoder",
    "SpatialTransformer": "modeling.label_encoder",
    "build_descriptors": "modeling.label_encoder",
    "max_per_image": "modeling.label_encoder",
    "CONTEXT_CLASS": "modeling.labels",
    "PackedLabels": "modeling.labels",
    "RelationAdapter": "modeling.relation_adapter",
    "LGDTeacher": "modeling.teacher",
    "BackboneFreezeSchedule": "engine.hooks",
    "DistillationSchedule": "engine.hooks",
    "LRScheduler": "engine.hooks",
    "build_lgd_hooks": "engine.hooks",
    "GradientClip": "engine.optim",
    "build_lgd_optimizer": "engine.optim",
    "PAPER_SCHEDULES": "engine.schedule",
    "LGDSchedule": "engine.schedule",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lgd' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__():
    return __all__
