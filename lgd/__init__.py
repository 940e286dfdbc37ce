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

Layout: lgd.modeling holds the paper's modules, the label structures, the teacher, LGDDistiller (a built
detectron2 RetinaNet, FCOS, Faster or Mask R-CNN with all of the above) and its detector adapters;
lgd.engine trains it on detectron2's engine (schedule, hooks, one optimizer with the student's and the
teacher's parameter groups, checkpoints, the op report); lgd.data and lgd.evaluation the datasets and mMR;
lgd.tools the commands (lgd-train, lgd-eval, lgd-export, lgd-demo, lgd-bench; not imported here, so that
`python -m lgd.tools.train_net` runs cleanly); lgd/configs the LazyConfigs.
"""
import warnings

# two deprecation notices our pinned dependencies print at import (fvcore/detectron2 call torch.jit.script;
# detectron2 v0.6's model zoo imports pkg_resources): noise on every command's stderr, nothing a user can act on
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated", category=UserWarning)

from .modeling.appearance_encoder import AppearanceEncoder  # noqa: E402
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
