"""group_norm: the one GroupNorm callable lgd passes where detectron2 v0.6 would build `norm="GN"`.

detectron2's dense heads (RetinaNetHead, and FCOSHead through it) build get_norm(norm, 1) as a type probe;
with "GN" that is nn.GroupNorm(32, 1), which recent torch rejects, so v0.6's GN heads do not build (upstream
detectron2 later changed the probe). group_norm(C) is nn.GroupNorm(gcd(32, C), C): exactly detectron2's
GroupNorm(32, C) for every C divisible by 32 (same modules, parameters and state_dict keys), one group for the
1-channel probe. Used by lgd.modeling.fcos_head.FCOSHead (norm="GN") and the demo's RetinaNet head, whose
std-0.01 conv init with 64 channels barely learns in a short run unless the convs are normalized.
"""
import math

import torch.nn as nn

__all__ = ["GN_GROUPS", "group_norm"]

GN_GROUPS = 32  # detectron2's get_norm("GN", C) = nn.GroupNorm(32, C)


def group_norm(channels: int) -> nn.GroupNorm:
    """nn.GroupNorm(gcd(32, channels), channels) (module docstring)."""
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise ValueError(f"group_norm: channels must be a positive int, got {channels!r}")
    return nn.GroupNorm(math.gcd(GN_GROUPS, channels), channels)
