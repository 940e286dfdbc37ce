"""An FCOSHead that builds on any torch: detectron2 v0.6's, with norm="GN" passed on as lgd.modeling.norm's
group_norm (the stock head's GroupNorm type probe fails on recent torch). Same modules, parameters and
state_dict keys as the stock head, so checkpoints move freely between the two. The LGD FCOS configs use it.
"""
from detectron2.modeling.meta_arch.fcos import FCOSHead as _StockFCOSHead

from .norm import group_norm

class FCOSHead(_StockFCOSHead):
    """detectron2's FCOSHead (same arguments, same forward); norm="GN" goes through group_norm."""

    def __init__(self, *, norm="", **kwargs):
        super().__init__(norm=group_norm if norm == "GN" else norm, **kwargs)
