"""Appearance encoder (docs/method.md §2): each object's mean projected student feature over its region, per level."""
from typing import List, Sequence

import torch
import torch.nn as nn

import lgd_ops

from .labels import PackedLabels


class AppearanceEncoder(nn.Module):
    """Per-level appearance embeddings [N, channels] of every packed object, context objects included.

    F_proj (3x3 conv, GroupNorm(1, affine=False), ReLU; shared across levels) on each level X_l, then the
    mean over each object's cells: lgd_ops.box_pool on its box (docs/method.md §1-2), or with use_masks (Mask
    R-CNN variant) lgd_ops.mask_pool on its instance mask. A context object pools the whole padded input.
    detach_input: X_l is detached before F_proj, so the teacher's losses do not reach the student through
    this path (the authors' Faster/Mask R-CNN configs: True; RetinaNet/FCOS: False).
    backend goes to lgd_ops.box_pool; mask_pool has only its reference implementation.
    """

    def __init__(self, channels: int = 256, *, detach_input: bool = False, use_masks: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.channels, self.detach_input, self.use_masks, self.backend = channels, detach_input, use_masks, backend
        self.proj = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.GroupNorm(1, channels, affine=False), nn.ReLU())

    def forward(self, features: Sequence[torch.Tensor], labels: PackedLabels) -> List[torch.Tensor]:
        """features: list of [B, channels, H_l, W_l] (B = labels.num_images) -> list of [N, channels].
        Inputs are validated by the caller (LGDTeacher)."""
        out = []
        for x in features:
            projected = self.proj(x.detach() if self.detach_input else x)
            if self.use_masks:
                out.append(lgd_ops.mask_pool(projected, labels.masks, labels.batch_idx))
            else:
                index = labels.box_index(x.shape[-2:])  # built on the host once per batch and level
                out.append(lgd_ops.box_pool(projected, labels.boxes, labels.batch_idx, labels.image_size,
                                            index=index, backend=self.backend))
        return out
