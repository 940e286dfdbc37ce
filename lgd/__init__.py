"""LGD's modules (docs/method.md §4-7), on top of lgd_ops.

Objects of a batch travel as PackedLabels (flat tensors + batch_idx, context object last per image);
feature pyramids as dicts or lists of [B, C, H_l, W_l]. LGDTeacher composes the four teacher modules
(label encoder, appearance encoder, relation adapter, knowledge mapper); DistillationLoss holds the
student-side adapter. Every module that calls lgd_ops takes backend= (mask ops: reference only).

    teacher = LGDTeacher(num_classes, use_context=True, detach_appearance=False)   # RetinaNet / FCOS
    loss_fn = DistillationLoss()
    instructive = teacher(fpn_features, gt_instances, images.tensor.shape[-2:])     # same keys as fpn_features
    loss_distill = loss_fn(fpn_features, instructive, warmup=iteration < 30000)
    # the detection head also runs on `instructive` with the same targets (docs/method.md §8)

Layers, each importing only those before it: lgd.modeling (the paper's modules, LGDDistiller) < lgd.engine
(trainer, hooks, optimizer, checkpoints) < lgd.methods (LGD, the baseline, the comparison systems) < lgd.runner
(builds and runs a run from its config) < lgd.tools (the commands); lgd.errors, lgd.config, lgd.data and
lgd.evaluation sit below them all. lgd.demo, the bundled demo, is imported by nothing in the library.
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
