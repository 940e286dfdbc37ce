"""LGD, label-guided self-distillation for object detection, on detectron2 and the fused lgd_ops (docs/method.md).
This namespace re-exports the paper's modules; docs/library.md shows them used outside lgd-train.

Layers, each importing only those before it: lgd.modeling (the paper's modules, LGDDistiller) < lgd.engine
(trainer, hooks, optimizer, checkpoints) < lgd.methods (LGD, the baseline, the comparison systems) < lgd.runner
(builds and runs a run from its config) < lgd.benchmarks < lgd.tools (the commands); lgd.errors, lgd.config,
lgd.data and lgd.evaluation sit below them all. lgd.demo, the bundled demo, is imported by nothing in the library.
"""
from .modeling.appearance_encoder import AppearanceEncoder
from .modeling.distillation_loss import DistillationLoss
from .modeling.distiller import LGDDistiller
from .modeling.knowledge_mapper import KnowledgeMapper, StudentAdapter
from .modeling.label_encoder import LabelEncoder, SpatialTransformer, build_descriptors, max_per_image
from .modeling.labels import CONTEXT_CLASS, PackedLabels
from .modeling.relation_adapter import RelationAdapter
from .modeling.teacher import LGDTeacher
from .engine.hooks import BackboneFreezeSchedule, DistillationSchedule, LRScheduler, build_lgd_hooks
from .engine.optim import GradientClip, build_lgd_optimizer
from .engine.schedule import PAPER_SCHEDULES, LGDSchedule

__all__ = [
    "AppearanceEncoder",
    "BackboneFreezeSchedule",
    "CONTEXT_CLASS",
    "DistillationLoss",
    "DistillationSchedule",
    "GradientClip",
    "KnowledgeMapper",
    "LGDDistiller",
    "LGDSchedule",
    "LGDTeacher",
    "LabelEncoder",
    "PAPER_SCHEDULES",
    "LRScheduler",
    "PackedLabels",
    "RelationAdapter",
    "SpatialTransformer",
    "StudentAdapter",
    "build_descriptors",
    "build_lgd_hooks",
    "build_lgd_optimizer",
    "max_per_image",
]
