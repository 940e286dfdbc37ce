"""The LGD teacher: the instructive knowledge X^I computed from the labels and the student's own features."""
from typing import Optional, Sequence, Tuple, Union

import torch.nn as nn
from detectron2.structures import Instances

from .levels import Levels, check_levels, join_levels, split_levels
from .appearance_encoder import AppearanceEncoder
from .knowledge_mapper import KnowledgeMapper
from .label_encoder import LABEL_ENCODERS, build_label_encoder
from .labels import PackedLabels
from .relation_adapter import RelationAdapter

# lgd.interaction: how the relation embeddings e come about (docs/method.md §6; the authors' INTERACT_PATTERN)
INTERACTIONS = ("student_guided", "label_guided", "student_fill", "teacher_fill")
GUIDED_QUERY = {"student_guided": "student", "label_guided": "label"}  # the attention's query per variant


class LGDTeacher(nn.Module):
    """Label encoder + appearance encoder + relation adapter + knowledge mapper (docs/method.md §5-7) in one module.

    forward(features, targets, image_size) -> instructive features X^I, one map per level, the same shapes
    as the student's FPN features (and the same container: dict with the same keys, or list).
    Options, with the authors' settings: use_context (context object; RetinaNet and FCOS on, Faster/Mask
    R-CNN off), detach_appearance (X_l detached before F_proj; Faster/Mask R-CNN on, RetinaNet/FCOS off),
    use_masks (Mask R-CNN variant: instance masks instead of boxes, mask crop in the descriptor),
    stn_pool (see label_encoder.SpatialTransformer). backend goes to every lgd_ops call.
    The paper's ablations (docs/method.md §5-7), the method first: label_encoder "pointnet" | "mlp" |
    "transformer" (Table 4); interaction (Table 5 and the authors' fill variants) "student_guided" (attention,
    appearance as the query) | "label_guided" (label embeddings as the query) | "student_fill" (e = the
    appearance embeddings: no attention, no label encoder) | "teacher_fill" (e = the label embeddings: no
    attention, no appearance encoder); use_objects (Table 6a): False paints only the context object. A part a
    variant does not use is not built (None), so it has no parameters.
    The whole module is trained by the teacher's optimizer (docs/method.md §8) and dropped at inference.
    """

    def __init__(self, num_classes: int, *, channels: int = 256, num_heads: int = 8, use_context: bool = True,
                 detach_appearance: bool = False, use_masks: bool = False, stn_pool: str = "object",
                 label_encoder: str = "pointnet", interaction: str = "student_guided", use_objects: bool = True,
                 backend: str = "auto"):
        super().__init__()
        for name, value, valid in (("label_encoder", label_encoder, LABEL_ENCODERS),
                                   ("interaction", interaction, INTERACTIONS)):
            if value not in valid:
                raise ValueError(f"LGDTeacher: {name} must be one of {valid}, got {value!r}")
        self.channels, self.use_context, self.use_masks = channels, use_context, use_masks
        self.num_classes, self.interaction, self.backend = num_classes, interaction, backend
        self.label_encoder = None if interaction == "student_fill" else build_label_encoder(
            label_encoder, num_classes, channels=channels, use_masks=use_masks, stn_pool=stn_pool)
        self.appearance_encoder = None if interaction == "teacher_fill" else AppearanceEncoder(
            channels, detach_input=detach_appearance, use_masks=use_masks, backend=backend)
        self.relation_adapter = (RelationAdapter(channels, num_heads, query=GUIDED_QUERY[interaction])
                                 if interaction in GUIDED_QUERY else None)
        self.knowledge_mapper = KnowledgeMapper(channels, use_context=use_context, use_objects=use_objects,
                                                use_masks=use_masks, backend=backend)

    def pack(self, targets: Sequence[Instances], image_size: Tuple[int, int]) -> PackedLabels:
        """PackedLabels of detectron2 Instances (gt_boxes, gt_classes, gt_masks with use_masks) for this teacher,
        checked where they are (the loader's CPU Instances in a training step: PackedLabels.pack_on_host)."""
        return PackedLabels.pack_on_host(targets, image_size, context=self.use_context, masks=self.use_masks,
                                         num_classes=self.num_classes)

    def forward(self, features: Levels, targets: Union[Sequence[Instances], PackedLabels],
                image_size: Optional[Tuple[int, int]] = None) -> Levels:
        """features: dict or list of [B, channels, H_l, W_l] (the student's FPN outputs); targets: one
        Instances per image, or PackedLabels (built with this teacher's context/masks settings);
        image_size: the padded input size (H_in, W_in), required with Instances."""
        levels, keys = split_levels(features, "LGDTeacher")
        if isinstance(targets, PackedLabels):
            labels = targets
            if image_size is not None and tuple(image_size) != labels.image_size:
                raise ValueError(f"LGDTeacher: image_size {tuple(image_size)} differs from the labels' "
                                 f"{labels.image_size}")
            if labels.context != self.use_context or (self.use_masks and labels.masks is None):
                raise ValueError(f"LGDTeacher: labels built with context={labels.context}, "
                                 f"masks={labels.masks is not None}; this teacher needs context={self.use_context}"
                                 f"{', masks' if self.use_masks else ''}")
        elif image_size is None:
            raise ValueError("LGDTeacher: image_size (the padded input size) is required with Instances targets")
        else:
            labels = self.pack(targets, image_size)
        check_levels(levels, self.channels, labels.num_images, "LGDTeacher")
        num_classes = self.num_classes
        if labels.num_classes is not None:  # checked when packed (pack_on_host): nothing to read back
            if labels.num_classes > num_classes:
                raise ValueError(f"LGDTeacher: labels checked for {labels.num_classes} classes, this teacher has "
                                 f"{num_classes}")
        elif labels.num_objects and bool((labels.classes >= num_classes).any()):  # PackedLabels checked >= 0
            raise ValueError(f"LGDTeacher: classes must be in [0, {num_classes}), got max {int(labels.classes.max())}")
        labels = labels.to(levels[0].device)
        label_embeddings = self.label_encoder(labels) if self.label_encoder is not None else None
        appearance = self.appearance_encoder(levels, labels) if self.appearance_encoder is not None else None
        if self.relation_adapter is not None:
            relations = self.relation_adapter(appearance, label_embeddings, labels)
        else:  # the fill variants: one set of embeddings painted as it is
            relations = appearance if self.interaction == "student_fill" else [label_embeddings] * len(levels)
        instructive = self.knowledge_mapper(relations, labels, [tuple(x.shape[-2:]) for x in levels])
        return join_levels(instructive, keys)
