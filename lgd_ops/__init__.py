"""Fused ops of LGD: box-mask pooling, box-region fill and normalized-MSE distillation.

Each op has a pure-PyTorch reference (the oracle) and compiled kernels registered as torch.ops.lgd_ops.* custom
ops with autograd and fake-tensor support; see available_backends() and resolve_backend(). box_pool and box_fill
take an optional BoxIndex (box_index: the boxes' cells and row events on one level, built once per batch on the
host, so that no op call waits for the device). lgd_ops.benchmark times them (and their peak memory) for lgd-bench
and the trainer's report.
"""
from ._backend import (auto_choices, available_backends, current_choice, resolve_backend, set_auto_choices,
                       use_backend)
from .box_fill import box_fill
from .box_index import box_index, BoxIndex
from .box_pool import box_pool
from .mask_ops import mask_fill, mask_pool
from .normalized_mse import normalized_mse

__all__ = ["auto_choices", "available_backends", "box_fill", "box_index", "BoxIndex", "box_pool", "current_choice",
           "mask_fill", "mask_pool", "normalized_mse", "resolve_backend", "set_auto_choices", "use_backend"]
