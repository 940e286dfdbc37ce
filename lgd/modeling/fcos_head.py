"""An FCOSHead that builds on any torch: detectron2 v0.6's, with its GroupNorm type probe made harmless.
that is nn.GroupNorm(32, 1), which recent torch rejects (channels not divisible by groups), so the stock
FCOS config cannot build; upstream detectron2 later changed the probe. This head passes "GN" on as a
callable that makes exactly detectron2's GroupNorm(32, C) for every real layer and a one-group GroupNorm
only for the 1-channel probe: same modules, parameters and state_dict keys as the stock head, so
checkpoints move freely between the two. The LGD FCOS configs use it (lgd.configs._lgd_config).
"""
import torch.nn as nn
from detectron2.modeling.meta_arch.fcos import FCOSHead as _StockFCOSHead

GN_GROUPS = 32  # detectron2's get_norm("GN", C) = nn.GroupNorm(32, C)


def group_norm(channels: int) -> nn.GroupNorm:
    """detectron2's "GN" layer, nn.GroupNorm(32, channels); one group for the head's 1-channel type probe."""
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"group_norm: channels must be a positive int, got {channels!r}")
    return nn.GroupNorm(1 if channels == 1 else GN_GROUPS, channels)


class FCOSHead(_StockFCOSHead):
    """detectron2's FCOSHead (same arguments, same forward); norm="GN" goes through group_norm."""

    def __init__(self, *, norm="", **kwargs):
        super().__init__(norm=group_norm if norm == "GN" else norm, **kwargs)
