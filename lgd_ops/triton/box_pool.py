"""box_pool on Triton: torch.ops.lgd_ops.box_pool_triton (docs/method.md §1-2).

One program per (box, block of channels) sums the box's rectangle directly: a loop over the box's
rows, each row read as [channels, columns] segments, no dense mask. Every output element is written
by one program in a fixed order, so the result is deterministic. The backward is box_fill_triton
with average (its adjoint), as for the C++ op.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..box_pool import register_autograd
from ._common import acc_fp64, box_cells, check_box_args, device_guard


@triton.jit
def _box_pool_kernel(feat_ptr, cells_ptr, batch_ptr, out_ptr, C, stride_b, stride_c, stride_h, stride_w,
                     AVERAGE: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_W: tl.constexpr):
    box = tl.program_id(0).to(tl.int64)
    c_offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    x0 = tl.load(cells_ptr + box * 4)
    x1 = tl.load(cells_ptr + box * 4 + 1)
    y0 = tl.load(cells_ptr + box * 4 + 2)
    y1 = tl.load(cells_ptr + box * 4 + 3)
    img = tl.load(batch_ptr + box)  # only dereferenced for boxes that cover a cell (then it is valid)
    if ACC_FP64:
        acc = tl.zeros([BLOCK_C, BLOCK_W], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_C, BLOCK_W], dtype=tl.float32)
    w_offs = tl.arange(0, BLOCK_W)
    plane = feat_ptr + img * stride_b + c_offs.to(tl.int64)[:, None] * stride_c
    for j in range(y0, y1 + 1):  # empty ranges (x0 > x1 or y0 > y1) run no iteration
        row = plane + tl.cast(j, tl.int64) * stride_h
        for i0 in range(x0, x1 + 1, BLOCK_W):
            cols = i0 + w_offs
            mask = c_mask[:, None] & (cols <= x1)[None, :]
            vals = tl.load(row + cols[None, :] * stride_w, mask=mask, other=0.0)
            acc += vals.to(acc.dtype)
    total = tl.sum(acc, axis=1)
    if AVERAGE:
        empty = (x1 < x0) | (y1 < y0)
        count = tl.where(empty, 1, (x1 - x0 + 1) * (y1 - y0 + 1))
        if ACC_FP64:
            total = total / count.to(tl.float64)
        else:
            total = tl.div_rn(total, count.to(tl.float32))  # IEEE division, as the C++ kernels
    tl.store(out_ptr + box * C + c_offs, total.to(out_ptr.dtype.element_ty), mask=c_mask)


@triton_op("lgd_ops::box_pool_triton", mutates_args=())
def box_pool_triton(features: torch.Tensor, boxes: torch.Tensor, batch_idx: torch.Tensor, in_h: int, in_w: int,
                    average: bool) -> torch.Tensor:
    """Sum (average=False) or mean (average=True) of features [B, C, H, W] over each box's cells -> [N, C]."""
    if features.dim() != 4:
        raise RuntimeError(f"lgd_ops.box_pool_triton: features must be [B, C, H, W], got {tuple(features.shape)}")
    check_box_args("lgd_ops.box_pool_triton", boxes, batch_idx, in_h, in_w, features, "features")
    n_img, channels, height, width = features.shape
    n = boxes.shape[0]
    if n == 0 or channels == 0 or height == 0 or width == 0:
        return features.new_zeros(n, channels)
    out = features.new_empty(n, channels)  # every element is written
    cells, _ = box_cells(boxes, batch_idx, n_img, in_h, in_w, height, width)
    block_w = 8 if width <= 8 else (16 if width <= 16 else 32)
    block_c = 64 if block_w < 32 else 32
    grid = (n, triton.cdiv(channels, block_c))
    with device_guard(features):
        wrap_triton(_box_pool_kernel)[grid](
            features, cells, batch_idx.contiguous(), out, channels, features.stride(0), features.stride(1),
            features.stride(2), features.stride(3), AVERAGE=average, ACC_FP64=acc_fp64(features.dtype),
            BLOCK_C=block_c, BLOCK_W=block_w)
    return out


register_autograd("lgd_ops::box_pool_triton", "box_fill_triton")
