"""Host-side helpers shared by the Triton box kernels.

The per-box cell ranges come from lgd_ops._boxes.box_cells (a few float64 torch ops on N boxes, with
exactly the arithmetic of csrc/common/box_math.h), so the Triton backend covers bit-for-bit the cells of
the C++ kernels and the reference; the kernels take the resulting int32 ranges.
"""
import contextlib

import torch

from .._boxes import box_cells  # noqa: F401  (re-exported for the kernels' modules)


def group_by_image(covers, batch_idx, batch):
    """(order, start): int64 box ids of the boxes that cover a cell, grouped by image (input order
    inside an image, stable sort), and int64 [batch + 1] with image b's boxes at order[start[b]:start[b+1]]."""
    keys = torch.where(covers, batch_idx, torch.full_like(batch_idx, batch))  # the rest sorts last
    sorted_keys, order = torch.sort(keys, stable=True)
    start = torch.searchsorted(sorted_keys, torch.arange(batch + 1, dtype=keys.dtype, device=keys.device))
    return order.contiguous(), start.contiguous()


def check_box_args(op, boxes, batch_idx, in_h, in_w, like, like_name):
    """The shape checks of csrc/common/box_checks.h, for direct torch.ops calls."""
    if boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.dtype.is_floating_point:
        raise RuntimeError(f"{op}: boxes must be floating point [N, 4], got {boxes.dtype} {tuple(boxes.shape)}")
    if batch_idx.dim() != 1 or batch_idx.shape[0] != boxes.shape[0] or batch_idx.dtype != torch.int64:
        raise RuntimeError(f"{op}: batch_idx must be int64 [N] with N = {boxes.shape[0]}, got "
                           f"{batch_idx.dtype} {tuple(batch_idx.shape)}")
    if in_h <= 0 or in_w <= 0:
        raise RuntimeError(f"{op}: image_size must be positive, got ({in_h}, {in_w})")
    if boxes.device != like.device or batch_idx.device != like.device:
        raise RuntimeError(f"{op}: boxes, batch_idx and {like_name} must be on one device")


def acc_fp64(dtype):
    """fp16/bf16/fp32 accumulate in fp32, fp64 in fp64."""
    return dtype == torch.float64


def device_guard(tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()
