"""box_pool on Triton: torch.ops.lgd_ops.box_pool_triton (docs/method.md §1-2).

A row sweep, as the CUDA kernel (csrc/common/box_sweep_math.h): one program per (block of channels, image)
walks the map top to bottom holding the column sums of the rows above as a [channels, row] block (an
integral image built a row at a time, no scratch map). It reads the level index (lgd_ops._boxes.level_index:
the boxes' cells and their top/bottom events sorted by (image, row)); on an event row, tl.cumsum gives the row
prefix and the row's events are handled SWEEP_EVENTS at a time: their ids and cells load as vectors and
tl.gather reads each event's part pre[x1] - pre[x0 - 1] for all channels at once (a top event stores minus it,
the bottom event adds it: the box sum). Cost: the map read once plus, per event row, a prefix of the row and
C x E gathered values per block of events, whatever the boxes' sizes; fp64 accumulation for fp32/fp64 maps
(fp32 prefix sums drift), fp32 for half maps; fixed-order adds, no atomics: deterministic.
A box whose sum is not finite is summed again over its own cells, so a NaN or inf stays with the boxes
covering it. The backward is box_fill_triton with average (its adjoint), as for the C++ op.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..box_pool import register_autograd
from ._common import (MAX_GRID_Y, SWEEP_EVENTS, check_box_args, device_guard, sweep_acc_fp64, sweep_blocks,
                      sweep_index)


@triton.jit
def _box_sum(plane, stride_h, x0, x1, y0, y1, cols, mask, acc_ty: tl.constexpr, BLOCK_C: tl.constexpr):
    """[BLOCK_C]: the sum over one box's cells, read row by row (the non-finite fallback)."""
    total = tl.zeros([BLOCK_C], dtype=acc_ty)
    inside = mask & ((cols >= x0) & (cols <= x1))[None, :]
    for jj in range(y0, y1 + 1):
        total += tl.sum(tl.load(plane + tl.cast(jj, tl.int64) * stride_h, mask=inside, other=0.0).to(acc_ty), axis=1)
    return total


@triton.jit
def _box_pool_kernel(feat_ptr, index_ptr, partial_ptr, out_ptr, N, C, H, W, stride_b, stride_c, stride_h, stride_w,
                     AVERAGE: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
                     BLOCK_E: tl.constexpr):
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    img = tl.program_id(1).to(tl.int64)
    c_mask = c_offs < C
    cols = tl.arange(0, BLOCK_W)
    mask = c_mask[:, None] & (cols < W)[None, :]
    if ACC_FP64:
        acc_ty = tl.float64
    else:
        acc_ty = tl.float32
    cells_ptr = index_ptr  # the level index's four parts
    key_ptr = index_ptr + 4 * N
    id_ptr = index_ptr + 6 * N
    start_ptr = index_ptr + 8 * N
    e_offs = tl.arange(0, BLOCK_E)
    col = tl.zeros([BLOCK_C, BLOCK_W], dtype=acc_ty)
    # offsets in int64: a row's offset j * stride_h (or a column's) can pass 2**31 elements on a large map
    plane = (feat_ptr + img * stride_b + c_offs.to(tl.int64)[:, None] * stride_c
             + cols.to(tl.int64)[None, :] * stride_w)
    p = tl.load(start_ptr + img)
    p_end = tl.load(start_ptr + img + 1)
    base = img * (H + 2)
    for j in range(0, H + 1):
        key = tl.load(key_ptr + p, mask=p < p_end, other=-1)
        if key == base + j:  # an event row
            pre = tl.cumsum(col, axis=1)  # pre[:, i] = sum over i' <= i of col[:, i']
            while key == base + j:  # the next BLOCK_E events of the row (keys ascend: those of row j lead)
                at = p + e_offs
                in_row = tl.load(key_ptr + at, mask=at < p_end, other=-1) == base + j
                event = tl.load(id_ptr + at, mask=in_row, other=0)
                n = event // 2
                top = in_row & (event % 2 == 0)
                bottom = in_row & (event % 2 == 1)
                x0 = tl.load(cells_ptr + n * 4, mask=in_row, other=0)
                x1 = tl.load(cells_ptr + n * 4 + 1, mask=in_row, other=0)
                hi = tl.gather(pre, tl.broadcast_to(x1[None, :], (BLOCK_C, BLOCK_E)), 1)
                lo = tl.gather(pre, tl.broadcast_to(tl.maximum(x0 - 1, 0)[None, :], (BLOCK_C, BLOCK_E)), 1)
                part = hi - tl.where((x0 > 0)[None, :], lo, 0.0)  # [channels, events]
                slot = partial_ptr + n.to(tl.int64)[None, :] * C + c_offs[:, None]
                tl.store(slot, -part, mask=c_mask[:, None] & top[None, :])  # top: minus the part above the box
                # bottom: the part through the box's last row completes the sum
                total = tl.load(slot, mask=c_mask[:, None] & bottom[None, :], other=0.0) + part
                y0 = tl.load(cells_ptr + n * 4 + 2, mask=bottom, other=0)
                y1 = tl.load(cells_ptr + n * 4 + 3, mask=bottom, other=0)
                bad = c_mask[:, None] & bottom[None, :] & ~(total - total == 0.0)  # NaN - NaN, inf - inf
                if tl.sum(tl.sum(bad.to(tl.int32), axis=1), axis=0) > 0:  # sum those boxes over their own cells
                    for k in range(0, BLOCK_E):
                        picked = (e_offs == k)[None, :]
                        if tl.sum(tl.sum((bad & picked).to(tl.int32), axis=1), axis=0) > 0:
                            nk = tl.load(id_ptr + p + k) // 2
                            direct = _box_sum(plane, stride_h, tl.load(cells_ptr + nk * 4),
                                              tl.load(cells_ptr + nk * 4 + 1), tl.load(cells_ptr + nk * 4 + 2),
                                              tl.load(cells_ptr + nk * 4 + 3), cols, mask, acc_ty, BLOCK_C)
                            total = tl.where(bad & picked, direct[:, None], total)
                if AVERAGE:
                    count = (x1 - x0 + 1) * (y1 - y0 + 1)
                    if ACC_FP64:
                        total = total / count.to(tl.float64)[None, :]
                    else:
                        total = tl.div_rn(total, count.to(tl.float32)[None, :])  # IEEE division, as the C++ kernels
                tl.store(out_ptr + n.to(tl.int64)[None, :] * C + c_offs[:, None], total.to(out_ptr.dtype.element_ty),
                         mask=c_mask[:, None] & bottom[None, :])
                p += tl.sum(in_row.to(tl.int32), axis=0)
                key = tl.load(key_ptr + p, mask=p < p_end, other=-1)
            tl.debug_barrier()  # the top events' partial sums, visible to the whole program
        if j < H:
            col += tl.load(plane + tl.cast(j, tl.int64) * stride_h, mask=mask, other=0.0).to(acc_ty)


@triton_op("lgd_ops::box_pool_triton", mutates_args=())
def box_pool_triton(features: torch.Tensor, boxes: torch.Tensor, batch_idx: torch.Tensor, in_h: int, in_w: int,
                    average: bool, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum (average=False) or mean (average=True) of features [B, C, H, W] over each box's cells -> [N, C].
    index: the level index of (boxes, batch_idx) on this map (lgd_ops._boxes.level_index), built here if None."""
    op = "lgd_ops.box_pool_triton"
    if features.dim() != 4:
        raise RuntimeError(f"{op}: features must be [B, C, H, W], got {tuple(features.shape)}")
    check_box_args(op, boxes, batch_idx, in_h, in_w, features, "features")
    n_img, channels, height, width = features.shape
    n = boxes.shape[0]
    index = sweep_index(op, index, boxes, batch_idx, n_img, in_h, in_w, height, width)
    if n == 0 or channels == 0 or height == 0 or width == 0:
        return features.new_zeros(n, channels)
    if n_img > MAX_GRID_Y:
        raise RuntimeError(f"{op}: at most {MAX_GRID_Y} images per call, got {n_img}")
    out = features.new_zeros(n, channels)  # boxes covering nothing stay zero
    fp64 = sweep_acc_fp64(features.dtype)
    partial = features.new_empty(n, channels, dtype=torch.float64 if fp64 else torch.float32)
    block_c, block_w = sweep_blocks(op, channels, width)
    with device_guard(features):
        wrap_triton(_box_pool_kernel)[(triton.cdiv(channels, block_c), n_img)](
            features, index, partial, out, n, channels, height, width, features.stride(0), features.stride(1),
            features.stride(2), features.stride(3), AVERAGE=average, ACC_FP64=fp64, BLOCK_C=block_c,
            BLOCK_W=block_w, BLOCK_E=SWEEP_EVENTS)
    return out


register_autograd("lgd_ops::box_pool_triton", "box_fill_triton")
