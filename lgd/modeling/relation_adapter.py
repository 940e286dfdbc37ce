"""Inter-object relation adapter (docs/method.md §6): attention between appearance and label embeddings, per image.

per_image / padding_mask batch the packed objects as [images, most objects, ...] for an attention over each
image's own objects (also the transformer label encoder's).
"""
from typing import List, Sequence

import torch
import torch.nn as nn

from .labels import PackedLabels

QUERIES = ("student", "label")


def per_image(x: torch.Tensor, labels: PackedLabels) -> torch.Tensor:
    """[B, N_max, *x.shape[1:]]: each image's rows of x [N, ...] in its own block, zero-padded after them."""
    return x.new_zeros(labels.num_images, labels.max_count(), *x.shape[1:]).index_put(
        (labels.batch_idx, labels.slots()), x)


def padding_mask(labels: PackedLabels) -> torch.Tensor:
    """[B, N_max] bool key_padding_mask of per_image: True = no object there. An image without objects is left
    unmasked, so its (padding) rows get no all-masked NaN."""
    counts = labels.counts_tensor()
    padding = torch.arange(labels.max_count(), device=counts.device) >= counts[:, None]
    return padding & (counts > 0)[:, None]


class RelationAdapter(nn.Module):
    """Per-level relation embeddings e [N, channels] (docs/method.md §6).

    One nn.MultiheadAttention(channels, num_heads, dropout 0), shared across levels; an object attends only to
    the objects of its own image. query="student" (the method, the authors' "stuGuided"): query = a level's
    appearance embeddings, key = value = the label embeddings. query="label" (the authors' "labelGuided", the
    paper's Table 5 variant): query = the label embeddings, key = value = a level's appearance embeddings.
    Its output is e itself: no residual, no FFN. The context object takes part like any object (its query is
    its appearance or label embedding, which gives the image's context e).
    Batching: each image's objects are padded to the batch's largest image and the padding masked
    (key_padding_mask) - the authors' block-diagonal mask over all N objects up to float rounding, at
    O(B * N_max^2) rather than O(N^2) attention memory; all levels go through one attention call.
    """

    def __init__(self, channels: int = 256, num_heads: int = 8, *, query: str = "student"):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"RelationAdapter: channels ({channels}) must be divisible by num_heads ({num_heads})")
        if query not in QUERIES:
            raise ValueError(f"RelationAdapter: query must be one of {QUERIES}, got {query!r}")
        self.channels, self.query = channels, query
        self.attention = nn.MultiheadAttention(channels, num_heads, dropout=0.0, batch_first=True)

    def forward(self, appearance: Sequence[torch.Tensor], label_embeddings: torch.Tensor,
                labels: PackedLabels) -> List[torch.Tensor]:
        """appearance: list (levels) of [N, channels]; label_embeddings [N, channels] -> list of [N, channels]."""
        n, c = labels.num_objects, self.channels
        if n == 0:
            return [torch.zeros_like(a) for a in appearance]
        num_images, levels = labels.num_images, len(appearance)
        n_max = labels.max_count()  # from the host: no read-back of the device
        per_level = per_image(torch.stack(list(appearance), dim=1), labels)  # [B, N_max, L, C]
        per_level = per_level.permute(2, 0, 1, 3).reshape(levels * num_images, n_max, c)
        shared = per_image(label_embeddings, labels).expand(levels, -1, -1, -1).reshape(levels * num_images, n_max, c)
        padding = padding_mask(labels).expand(levels, -1, -1).reshape(levels * num_images, n_max)
        query, key = (per_level, shared) if self.query == "student" else (shared, per_level)
        out, _ = self.attention(query, key, key, key_padding_mask=padding, need_weights=False)
        out = out.view(levels, num_images, n_max, c)[:, labels.batch_idx, labels.slots()]  # [L, N, C]
        return list(out.unbind(0))
