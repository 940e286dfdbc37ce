"""Inter-object relation adapter (docs/method.md §6): attention from appearance to label embeddings, per image."""
from typing import List, Sequence

import torch
import torch.nn as nn

from .labels import PackedLabels


class RelationAdapter(nn.Module):
    """Per-level relation embeddings e [N, channels] (docs/method.md §6).

    One nn.MultiheadAttention(channels, num_heads, dropout 0), shared across levels ("student-guided"):
    query = a level's appearance embeddings, key = value = the label embeddings; an object attends only to
    the objects of its own image. Its output is e itself: no residual, no FFN. The context object takes
    part like any object: its label embedding is a key/value for every object of its image, and its own
    query is its appearance embedding (the whole-image box), which gives the image's context e.
    Batching: each image's objects are padded to the batch's largest image and the padding masked
    (key_padding_mask) - the authors' block-diagonal mask over all N objects up to float rounding, at
    O(B * N_max^2) rather than O(N^2) attention memory; all levels go through one attention call.
    """

    def __init__(self, channels: int = 256, num_heads: int = 8):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"RelationAdapter: channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.channels = channels
        self.attention = nn.MultiheadAttention(channels, num_heads, dropout=0.0, batch_first=True)

    def forward(self, appearance: Sequence[torch.Tensor], label_embeddings: torch.Tensor,
                labels: PackedLabels) -> List[torch.Tensor]:
        """appearance: list (levels) of [N, channels]; label_embeddings [N, channels] -> list of [N, channels]."""
        n, c = labels.num_objects, self.channels
        if n == 0:
            return [torch.zeros_like(a) for a in appearance]
        idx, num_images, levels = labels.batch_idx, labels.num_images, len(appearance)
        slot, n_max = labels.slots(), labels.max_count()  # from the host: no read-back of the device
        counts = labels.counts_tensor()
        queries = torch.stack(list(appearance), dim=1)  # [N, L, C]
        queries = queries.new_zeros(num_images, n_max, levels, c).index_put((idx, slot), queries)
        queries = queries.permute(2, 0, 1, 3).reshape(levels * num_images, n_max, c)
        keys = label_embeddings.new_zeros(num_images, n_max, c).index_put((idx, slot), label_embeddings)
        keys = keys.expand(levels, -1, -1, -1).reshape(levels * num_images, n_max, c)
        padding = torch.arange(n_max, device=idx.device) >= counts[:, None]  # [B, N_max], True = no object
        padding &= (counts > 0)[:, None]  # an image without objects: unmasked, so no all-masked NaN row
        padding = padding.expand(levels, -1, -1).reshape(levels * num_images, n_max)
        out, _ = self.attention(queries, keys, keys, key_padding_mask=padding, need_weights=False)
        out = out.view(levels, num_images, n_max, c)[:, idx, slot]  # [L, N, C]
        return list(out.unbind(0))
