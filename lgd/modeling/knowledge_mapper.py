"""Intra-object knowledge mapper (docs/method.md §7): relation embeddings painted back into feature maps, and the
student-side adapter F_adapt the distillation loss puts on the student's features."""
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import lgd_ops

from .labels import PackedLabels


def _layout(weight: torch.Tensor) -> torch.memory_format:
    """The memory format of a conv weight (channels_last on the fast path), for maps that conv reads."""
    channels_last = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _conv_gn(channels, relu):
    layers = [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(1, channels, affine=False)]
    return layers + [nn.ReLU()] if relu else layers


class KnowledgeMapper(nn.Module):
    """Instructive features X^I_l [B, channels, H_l, W_l] from the per-level relation embeddings e.

    X^I_l = F_ref(ReLU(G(fill(F_inst(e_i))) + F_ctx(e_context))), weights shared across levels, with
    F_inst, F_ctx Linear(channels, channels); fill the sum of the (non-context) objects' vectors over the
    cells of their boxes (lgd_ops.box_fill, docs/method.md §3) or, with use_masks, of their masks
    (lgd_ops.mask_fill); G a 3x3 conv; F_ctx(e_context) added to every cell of its image; F_ref =
    [3x3 conv, GroupNorm(1, affine=False), ReLU] x 2, 3x3 conv, GroupNorm(1, affine=False).
    use_context=False (the authors' Faster/Mask R-CNN configs): no F_ctx and X^I_l = F_ref(ReLU(G(fill))).
    use_objects=False (the paper's Table 6a, the authors' render_using_bg_only; needs use_context): only the
    context is painted, X^I_l = F_ref(ReLU(F_ctx(e_context)) on every cell of its image): no F_inst, no G.
    use_context must match labels.context. backend goes to lgd_ops.box_fill (mask_fill is reference-only).
    """

    def __init__(self, channels: int = 256, *, use_context: bool = True, use_objects: bool = True,
                 use_masks: bool = False, backend: str = "auto"):
        super().__init__()
        if not (use_objects or use_context):
            raise ValueError("KnowledgeMapper: use_objects=False needs use_context=True (nothing else to paint)")
        self.channels, self.use_context, self.use_masks, self.backend = channels, use_context, use_masks, backend
        self.use_objects = use_objects
        self.instance_proj = nn.Linear(channels, channels) if use_objects else None  # F_inst
        self.context_proj = nn.Linear(channels, channels) if use_context else None  # F_ctx
        self.spatial = nn.Conv2d(channels, channels, 3, padding=1) if use_objects else None  # G
        self.refine = nn.Sequential(*_conv_gn(channels, True), *_conv_gn(channels, True), *_conv_gn(channels, False))

    def forward(self, embeddings: Sequence[torch.Tensor], labels: PackedLabels,
                level_sizes: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
        """embeddings: list (levels) of [N, channels]; level_sizes: (H_l, W_l) per level -> list of maps."""
        if not self.use_objects:
            return self._context_only(embeddings, labels, level_sizes)
        inst = labels.object_index(context=False)  # from the host: no read-back of the device
        ctx = labels.object_index(context=True)  # one per image, in image order (PackedLabels layout)
        batch_idx = labels.batch_idx[inst]
        regions = labels.masks[inst] if self.use_masks else labels.boxes[inst]
        # the maps in the layout of G's weight (channels_last on the fast path): no conversion before the convs
        memory_format = _layout(self.spatial.weight)
        out = []
        for e, size in zip(embeddings, level_sizes):
            output_size = (labels.num_images, *size)
            painted_values = self.instance_proj(e[inst])
            if self.use_masks:
                painted = lgd_ops.mask_fill(painted_values, regions, batch_idx, output_size)
            else:
                index = labels.box_index(size, context_objects=False)  # built on the host once per batch and level
                painted = lgd_ops.box_fill(painted_values, regions, batch_idx, labels.image_size, output_size,
                                           memory_format=memory_format, index=index, backend=self.backend)
            x = self.spatial(painted)
            if self.use_context:
                x = x + self.context_proj(e[ctx])[:, :, None, None]
            out.append(self.refine(F.relu(x)))
        return out

    def _context_only(self, embeddings, labels, level_sizes):
        """use_objects=False: each image's ReLU(F_ctx(e_context)) on all its cells, refined."""
        ctx = labels.object_index(context=True)
        memory_format = _layout(self.refine[0].weight)
        return [self.refine(F.relu(self.context_proj(e[ctx]))[:, :, None, None].expand(-1, -1, *size)
                            .contiguous(memory_format=memory_format))
                for e, size in zip(embeddings, level_sizes)]


class StudentAdapter(nn.Module):
    """F_adapt (docs/method.md §7): 3x3 conv, ReLU, 3x3 conv, ReLU, 3x3 conv on one student level; shared across
    levels. It lets the student's features match the instructive ones without being forced equal."""

    def __init__(self, channels: int = 256):
        super().__init__()
        self.channels = channels
        self.layers = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
