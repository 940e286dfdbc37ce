"""box_pool on Triton: torch.ops.lgd_ops.box_pool_triton (docs/method.md §1-2).

A row sweep, as the CUDA kernel (csrc/common/box_sweep_math.h), over the level index (lgd_ops._boxes.level_index:
the boxes' cells and their top/bottom events sorted by (image, row)). The rows are cut into bands
(_common.sweep_bands: about SWEEP_PROGRAMS programs per launch); a program per (block of channels, image, band)
walks its band's rows holding the column sums of the band's rows above as a [channels, row] block (an integral
image built a row at a time, no scratch map). On an event row, tl.cumsum gives the row prefix and the row's
events are handled SWEEP_EVENTS at a time: their ids and cells load as vectors and tl.gather reads each event's
part pre[x1] - pre[x0 - 1] for all channels at once (a top event stores minus it, the bottom event adds it);
after its last row the band adds the parts of the boxes running on below it (found among the events above).
Each box's sum over each band it meets goes to a [bands, N, C] scratch; a second launch adds a box's bands in
order (and divides by the cell count for the mean). Cost: the map read once, per event row a prefix of the row
and C x E gathered values per block of events, and C values per (box, band met); fp64 accumulation for
fp32/fp64 maps (fp32 prefix sums drift), fp32 for half maps; fixed-order adds, no atomics: deterministic.
A band sum that is not finite is summed again over the box's cells in the band, so a NaN or inf stays with the
boxes covering it. The backward is box_fill_triton with average (its adjoint), as for the C++ op.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..box_pool import register_autograd
from ._common import (MAX_GRID_Y, SWEEP_EVENTS, check_box_args, device_guard, first_event, sweep_acc_fp64,
                      sweep_bands, sweep_blocks, sweep_index)

FINISH_BOXES = 16  # boxes x channels per program adding the band sums
FINISH_CHANNELS = 64


@triton.jit
def _box_sum(plane, stride_h, x0, x1, y0, y1, cols, mask, acc_ty: tl.constexpr, BLOCK_C: tl.constexpr):
    """[BLOCK_C]: the sum over one box's cells, read row by row (the non-finite fallback)."""
    total = tl.zeros([BLOCK_C], dtype=acc_ty)
    inside = mask & ((cols >= x0) & (cols <= x1))[None, :]
    for jj in range(y0, y1 + 1):
        total += tl.sum(tl.load(plane + tl.cast(jj, tl.int64) * stride_h, mask=inside, other=0.0).to(acc_ty), axis=1)
    return total


@triton.jit
def _band_parts(pre, part_ptr, cells_ptr, event, events, r0, r1, plane, stride_h, cols, mask, c_offs, c_mask, C,
                acc_ty: tl.constexpr, TOPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    """The `events` of a block, read against the row prefix `pre` of the band's column sums: with TOPS a top
    event stores minus its part; any other (a bottom event, or a box running past the band) adds its part to
    the stored one when the box starts in the band and stores the box's sum over the band's rows [r0, r1).
    A sum that is not finite is summed again over the box's cells in the band."""
    n = event // 2
    x0 = tl.load(cells_ptr + n * 4, mask=events, other=0)
    x1 = tl.load(cells_ptr + n * 4 + 1, mask=events, other=0)
    y0 = tl.load(cells_ptr + n * 4 + 2, mask=events, other=0)
    hi = tl.gather(pre, tl.broadcast_to(x1[None, :], (BLOCK_C, BLOCK_E)), 1)
    lo = tl.gather(pre, tl.broadcast_to(tl.maximum(x0 - 1, 0)[None, :], (BLOCK_C, BLOCK_E)), 1)
    part = hi - tl.where((x0 > 0)[None, :], lo, 0.0)  # [channels, events]
    if TOPS:
        top = events & (event % 2 == 0)
    else:
        top = events & False
    ends = events & ~top  # the box's part of the band is complete
    slot = part_ptr + n.to(tl.int64)[None, :] * C + c_offs[:, None]
    tl.store(slot, -part, mask=c_mask[:, None] & top[None, :])
    total = tl.load(slot, mask=c_mask[:, None] & (ends & (y0 >= r0))[None, :], other=0.0) + part
    bad = c_mask[:, None] & ends[None, :] & ~(total - total == 0.0)  # NaN - NaN, inf - inf
    if tl.sum(tl.sum(bad.to(tl.int32), axis=1), axis=0) > 0:  # sum those boxes over their own cells
        for k in range(0, BLOCK_E):
            picked = bad & (tl.arange(0, BLOCK_E) == k)[None, :]
            if tl.sum(tl.sum(picked.to(tl.int32), axis=1), axis=0) > 0:
                nk = tl.sum(tl.where(tl.arange(0, BLOCK_E) == k, n, 0), axis=0)
                y0k = tl.maximum(tl.load(cells_ptr + nk * 4 + 2), r0)
                y1k = tl.minimum(tl.load(cells_ptr + nk * 4 + 3), r1 - 1)
                direct = _box_sum(plane, stride_h, tl.load(cells_ptr + nk * 4), tl.load(cells_ptr + nk * 4 + 1), y0k,
                                  y1k, cols, mask, acc_ty, BLOCK_C)
                total = tl.where(picked, direct[:, None], total)
    tl.store(slot, total, mask=c_mask[:, None] & ends[None, :])


@triton.jit
def _box_pool_kernel(feat_ptr, index_ptr, part_ptr, N, C, H, W, band_rows, stride_b, stride_c, stride_h, stride_w,
                     ACC_FP64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_E: tl.constexpr):
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    img = tl.program_id(1).to(tl.int64)
    band = tl.program_id(2)
    r0 = band * band_rows  # the band's rows [r0, r1)
    r1 = tl.minimum(r0 + band_rows, H)
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
    part_ptr += band.to(tl.int64) * N * C  # the band's [N, C] sums
    e_offs = tl.arange(0, BLOCK_E)
    col = tl.zeros([BLOCK_C, BLOCK_W], dtype=acc_ty)
    # offsets in int64: a row's offset j * stride_h (or a column's) can pass 2**31 elements on a large map
    plane = (feat_ptr + img * stride_b + c_offs.to(tl.int64)[:, None] * stride_c
             + cols.to(tl.int64)[None, :] * stride_w)
    p_begin = tl.load(start_ptr + img)
    p_end = tl.load(start_ptr + img + 1)
    base = img * (H + 2)
    p = first_event(key_ptr, p_begin, p_end, base + r0)
    for j in range(r0, r1 + 1):
        key = tl.load(key_ptr + p, mask=p < p_end, other=-1)
        if key == base + j:  # an event row
            pre = tl.cumsum(col, axis=1)  # pre[:, i] = sum over i' <= i of col[:, i'] over rows [r0, j)
            while key == base + j:  # the next BLOCK_E events of the row (keys ascend: those of row j lead)
                at = p + e_offs
                in_row = tl.load(key_ptr + at, mask=at < p_end, other=-1) == base + j
                # tops of row r1 belong to the next band, bottoms of row r0 (boxes ending above) to the one before
                event = tl.load(id_ptr + at, mask=in_row, other=0)
                mine = in_row & tl.where(event % 2 == 0, j < r1, j > r0)
                _band_parts(pre, part_ptr, cells_ptr, event, mine, r0, r1, plane, stride_h, cols, mask, c_offs,
                            c_mask, C, acc_ty, True, BLOCK_C, BLOCK_E)
                p += tl.sum(in_row.to(tl.int32), axis=0)
                key = tl.load(key_ptr + p, mask=p < p_end, other=-1)
            tl.debug_barrier()  # the top events' partial sums, visible to the whole program
        if j < r1:
            col += tl.load(plane + tl.cast(j, tl.int64) * stride_h, mask=mask, other=0.0).to(acc_ty)
    if r1 < H:  # the boxes running past the band: their part through row r1 - 1
        pre = tl.cumsum(col, axis=1)
        for q in range(p_begin, p, BLOCK_E):  # every top event above row r1
            at = q + e_offs
            event = tl.load(id_ptr + at, mask=at < p, other=1)
            n = event // 2
            y0 = tl.load(cells_ptr + n * 4 + 2, mask=at < p, other=0)
            y1 = tl.load(cells_ptr + n * 4 + 3, mask=at < p, other=0)
            running = (at < p) & (event % 2 == 0) & (y0 < r1) & (y1 >= r1)
            if tl.sum(running.to(tl.int32), axis=0) > 0:
                _band_parts(pre, part_ptr, cells_ptr, event, running, r0, r1, plane, stride_h, cols, mask, c_offs,
                            c_mask, C, acc_ty, False, BLOCK_C, BLOCK_E)


@triton.jit
def _box_pool_finish_kernel(index_ptr, part_ptr, out_ptr, N, C, band_rows, AVERAGE: tl.constexpr,
                            ACC_FP64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[n] = the sum of box n's band sums, bands in order (the mean if AVERAGE); zero if it covers nothing."""
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n_mask = n < N
    c_mask = c < C
    x0 = tl.load(index_ptr + n * 4, mask=n_mask, other=0)
    x1 = tl.load(index_ptr + n * 4 + 1, mask=n_mask, other=-1)
    y0 = tl.load(index_ptr + n * 4 + 2, mask=n_mask, other=0)
    y1 = tl.load(index_ptr + n * 4 + 3, mask=n_mask, other=-1)
    covers = (x0 <= x1) & (y0 <= y1)
    first = y0 // band_rows
    bands = tl.where(covers, y1 // band_rows - first + 1, 0)  # the bands the box meets
    if ACC_FP64:
        total = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float64)
    else:
        total = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for k in range(0, tl.max(bands, axis=0)):
        slot = part_ptr + ((first + k).to(tl.int64) * N + n)[:, None] * C + c[None, :]
        total += tl.load(slot, mask=(k < bands)[:, None] & c_mask[None, :], other=0.0)
    if AVERAGE:
        count = tl.where(covers, (x1 - x0 + 1) * (y1 - y0 + 1), 1)[:, None]
        if ACC_FP64:
            total = total / count.to(tl.float64)
        else:
            total = tl.div_rn(total, count.to(tl.float32))  # IEEE division, as the C++ kernels
    tl.store(out_ptr + n[:, None] * C + c[None, :], total.to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None] & c_mask[None, :])


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
    if n == 0 or n_img == 0 or channels == 0 or height == 0 or width == 0:  # no box covers a cell
        return features.new_zeros(n, channels)
    if n_img > MAX_GRID_Y:
        raise RuntimeError(f"{op}: at most {MAX_GRID_Y} images per call, got {n_img}")
    fp64 = sweep_acc_fp64(features.dtype)
    block_c, block_w = sweep_blocks(op, channels, width)
    rows, bands = sweep_bands(triton.cdiv(channels, block_c) * n_img, height)
    parts = features.new_empty(bands, n, channels, dtype=torch.float64 if fp64 else torch.float32)  # band sums
    out = features.new_empty(n, channels)
    with device_guard(features):
        wrap_triton(_box_pool_kernel)[(triton.cdiv(channels, block_c), n_img, bands)](
            features, index, parts, n, channels, height, width, rows, features.stride(0), features.stride(1),
            features.stride(2), features.stride(3), ACC_FP64=fp64, BLOCK_C=block_c, BLOCK_W=block_w,
            BLOCK_E=SWEEP_EVENTS)
        wrap_triton(_box_pool_finish_kernel)[(triton.cdiv(n, FINISH_BOXES), triton.cdiv(channels, FINISH_CHANNELS))](
            index, parts, out, n, channels, rows, AVERAGE=average, ACC_FP64=fp64, BLOCK_N=FINISH_BOXES,
            BLOCK_C=FINISH_CHANNELS)
    return out


register_autograd("lgd_ops::box_pool_triton", "box_fill_triton")
