"""Host-side helpers shared by the Triton box kernels.

The per-box cell ranges are computed here with a few float64 torch ops (N boxes, tiny next to the
kernels), with exactly the arithmetic of csrc/common/box_math.h box_cells, so the Triton backend
covers bit-for-bit the cells of the C++ kernels; the kernels take the resulting int32 ranges.
"""
import contextlib

import torch


def box_cells(boxes, batch_idx, batch, in_h, in_w, height, width):
    """(cells, covers): int32 [N, 4] = (x0, x1, y0, y1) inclusive cell ranges on a height x width grid,
    (0, -1, 0, -1) for a box covering nothing, and bool [N], the box covers at least one cell.

    docs/method.md §1: clamp to [0, in_w-1] x [0, in_h-1]; x2 <= x1, y2 <= y1 or NaN covers nothing;
    rx = width / in_w, x0 = ceil(x1 * rx), x1 = min(floor(x2 * rx), width - 1); rows alike.
    A batch index outside [0, batch) covers nothing (the Python API rejects it first).
    """
    b = boxes.detach().to(torch.float64)
    x1 = b[:, 0].clamp(0.0, float(in_w - 1))
    y1 = b[:, 1].clamp(0.0, float(in_h - 1))
    x2 = b[:, 2].clamp(0.0, float(in_w - 1))
    y2 = b[:, 3].clamp(0.0, float(in_h - 1))
    valid = (x2 > x1) & (y2 > y1) & (batch_idx >= 0) & (batch_idx < batch)  # False for NaN too
    rx = float(width) / float(in_w)  # double(w) / double(in_w), as in box_math.h
    ry = float(height) / float(in_h)
    ranges = torch.stack(
        [
            torch.ceil(x1 * rx),
            torch.floor(x2 * rx).clamp(max=float(width - 1)),
            torch.ceil(y1 * ry),
            torch.floor(y2 * ry).clamp(max=float(height - 1)),
        ],
        dim=1,
    )
    none = torch.tensor([0.0, -1.0, 0.0, -1.0], dtype=torch.float64, device=b.device)
    cells = torch.where(valid[:, None], ranges, none).to(torch.int32).contiguous()
    covers = valid & (cells[:, 0] <= cells[:, 1]) & (cells[:, 2] <= cells[:, 3])
    return cells, covers


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
