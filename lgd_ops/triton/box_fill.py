"""box_fill on Triton: torch.ops.lgd_ops.box_fill_triton (docs/method.md §3).

A row sweep, as the CUDA kernel (csrc/common/box_sweep_math.h), over the level index (lgd_ops._boxes.level_index:
the boxes' cells and their top/bottom events sorted by (image, row)). The rows are cut into bands
(_common.sweep_bands); a program per (block of channels, image, band) starts from the values of the boxes
running into its band from above (found among the events above it) and walks the band's rows holding the
current row as a [channels, row] block. On an event row the row's events are handled SWEEP_EVENTS at a time:
their ids, cells and values load as vectors and _common.row_change adds each box's +-v over its columns (the
cumsum of a difference row with +-v at x0 and -+v at x1 + 1, built from the events' sorted end points by
tl.gather, no scatter); every row is written once. Cost: the output written once plus, per block of events,
O(C (E + W)) work, whatever the boxes' sizes; fp64 accumulation for fp32/fp64 values, fp32 for half; no
atomics, fixed order: deterministic. Non-finite values are left out of the sweep and added to their own box's
cells afterwards. The backward is box_pool_triton with sums (its adjoint), as for the C++ op.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..box_fill import register_autograd
from ._common import (MAX_GRID_Y, SWEEP_EVENTS, check_box_args, device_guard, first_event, row_change,
                      sweep_acc_fp64, sweep_bands, sweep_blocks, sweep_index)


@triton.jit
def _box_values(values_ptr, cells_ptr, n, events, c_offs, c_mask, stride_vn, stride_vc, acc_ty: tl.constexpr,
                AVERAGE: tl.constexpr, ACC_FP64: tl.constexpr):
    """(v, x0, x1, bad): the values [channels, events] of boxes n where `events` holds (else 0), divided by the
    box's cell count if AVERAGE, the non-finite ones replaced by 0 and counted in `bad` (they are added after
    the sweep: NaN - NaN, inf - inf would stay in the columns past the box); the boxes' column ranges."""
    x0 = tl.load(cells_ptr + n * 4, mask=events, other=0)
    x1 = tl.load(cells_ptr + n * 4 + 1, mask=events, other=0)
    v = tl.load(values_ptr + n.to(tl.int64)[None, :] * stride_vn + c_offs[:, None] * stride_vc,
                mask=c_mask[:, None] & events[None, :], other=0.0).to(acc_ty)
    finite = v - v == 0.0
    bad = tl.sum(tl.sum((~finite).to(tl.int32), axis=1), axis=0)
    v = tl.where(finite, v, 0.0)
    if AVERAGE:
        y0 = tl.load(cells_ptr + n * 4 + 2, mask=events, other=0)
        y1 = tl.load(cells_ptr + n * 4 + 3, mask=events, other=0)
        count = (x1 - x0 + 1) * (y1 - y0 + 1)
        if ACC_FP64:
            v = v / count.to(tl.float64)[None, :]
        else:
            v = tl.div_rn(v, count.to(tl.float32)[None, :])
    return v, x0, x1, bad


@triton.jit
def _box_fill_kernel(values_ptr, index_ptr, out_ptr, N, C, H, W, band_rows, stride_vn, stride_vc, stride_ob,
                     stride_oc, stride_oh, stride_ow, AVERAGE: tl.constexpr, ACC_FP64: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_E: tl.constexpr):
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    img = tl.program_id(1).to(tl.int64)
    r0 = tl.program_id(2) * band_rows  # the band's rows [r0, r1)
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
    e_offs = tl.arange(0, BLOCK_E)
    col = tl.zeros([BLOCK_C, BLOCK_W], dtype=acc_ty)
    # offsets in int64: a row's offset j * stride_oh (or a column's) can pass 2**31 elements on a large map
    plane = (out_ptr + img * stride_ob + c_offs.to(tl.int64)[:, None] * stride_oc
             + cols.to(tl.int64)[None, :] * stride_ow)
    p_begin = tl.load(start_ptr + img)
    p_end = tl.load(start_ptr + img + 1)
    base = img * (H + 2)
    p = first_event(key_ptr, p_begin, p_end, base + r0)
    non_finite = 0
    for q in range(p_begin, p, BLOCK_E):  # the boxes running into the band from above: its first row's start
        at = q + e_offs
        event = tl.load(id_ptr + at, mask=at < p, other=1)
        n = event // 2
        running = (at < p) & (event % 2 == 0) & (tl.load(cells_ptr + n * 4 + 3, mask=at < p, other=0) >= r0)
        if tl.sum(running.to(tl.int32), axis=0) > 0:
            v, x0, x1, bad = _box_values(values_ptr, cells_ptr, n, running, c_offs, c_mask, stride_vn, stride_vc,
                                         acc_ty, AVERAGE, ACC_FP64)
            non_finite += bad
            col += row_change(v, x0, x1 + 1, BLOCK_C, BLOCK_E, BLOCK_W)
    for j in range(r0, r1):
        key = tl.load(key_ptr + p, mask=p < p_end, other=-1)
        while key == base + j:  # the next BLOCK_E events of the row (keys ascend: those of row j lead)
            at = p + e_offs
            in_row = tl.load(key_ptr + at, mask=at < p_end, other=-1) == base + j
            event = tl.load(id_ptr + at, mask=in_row, other=0)
            top = event % 2 == 0
            mine = in_row & (top | (j > r0))  # row r0's bottoms end boxes above the band
            v, x0, x1, bad = _box_values(values_ptr, cells_ptr, event // 2, mine, c_offs, c_mask, stride_vn,
                                         stride_vc, acc_ty, AVERAGE, ACC_FP64)
            non_finite += bad
            v = tl.where(top[None, :], v, -v)  # bottom: the box ends above this row
            col += row_change(v, x0, x1 + 1, BLOCK_C, BLOCK_E, BLOCK_W)
            p += tl.sum(in_row.to(tl.int32), axis=0)
            key = tl.load(key_ptr + p, mask=p < p_end, other=-1)
        tl.store(plane + tl.cast(j, tl.int64) * stride_oh, col.to(out_ptr.dtype.element_ty), mask=mask)
    if non_finite > 0:  # NaN - NaN, inf - inf never cancel: such values go straight into their own box's cells
        for k in range(p_begin, p_end):
            event = tl.load(id_ptr + k)
            n = event // 2
            v = tl.load(values_ptr + n * stride_vn + c_offs * stride_vc, mask=c_mask, other=0.0).to(acc_ty)
            bad = c_mask & ~(v - v == 0.0)
            if (event % 2 == 0) & (tl.sum(bad.to(tl.int32), axis=0) > 0):
                x0 = tl.load(cells_ptr + n * 4)
                x1 = tl.load(cells_ptr + n * 4 + 1)
                y0 = tl.load(cells_ptr + n * 4 + 2)
                y1 = tl.load(cells_ptr + n * 4 + 3)
                if AVERAGE:
                    v = v / ((x1 - x0 + 1) * (y1 - y0 + 1)).to(acc_ty)
                inside = bad[:, None] & ((cols >= x0) & (cols <= x1))[None, :]
                tl.debug_barrier()  # the rows written above (and by the previous box), visible to every thread
                for jj in range(tl.maximum(y0, r0), tl.minimum(y1 + 1, r1)):  # the box's rows in the band
                    row = plane + tl.cast(jj, tl.int64) * stride_oh
                    cells = tl.load(row, mask=inside, other=0.0).to(acc_ty)
                    tl.store(row, (cells + v[:, None]).to(out_ptr.dtype.element_ty), mask=inside)


@triton_op("lgd_ops::box_fill_triton", mutates_args=())
def box_fill_triton(values: torch.Tensor, boxes: torch.Tensor, batch_idx: torch.Tensor, in_h: int, in_w: int,
                    batch: int, out_h: int, out_w: int, average: bool, channels_last: bool = False,
                    index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum over the boxes covering each cell of the box's values [N, C] -> [batch, C, out_h, out_w]
    (average=True divides each box's values by its cell count first), written NCHW or channels_last.
    index: the level index of (boxes, batch_idx) on the output (lgd_ops._boxes.level_index), built here if None."""
    if values.dim() != 2 or values.shape[0] != boxes.shape[0]:
        raise RuntimeError(f"lgd_ops.box_fill_triton: values must be [N, C] with N = boxes.size(0), "
                           f"got {tuple(values.shape)}")
    if batch < 0 or out_h < 0 or out_w < 0:
        raise RuntimeError(f"lgd_ops.box_fill_triton: output size must be non-negative, got "
                           f"({batch}, {out_h}, {out_w})")
    if batch > MAX_GRID_Y:
        raise RuntimeError(f"lgd_ops.box_fill_triton: at most {MAX_GRID_Y} images per call, got {batch}")
    check_box_args("lgd_ops.box_fill_triton", boxes, batch_idx, in_h, in_w, values, "values")
    channels = values.shape[1]
    out = torch.empty(batch, channels, out_h, out_w, dtype=values.dtype, device=values.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)  # all written
    index = sweep_index("lgd_ops.box_fill_triton", index, boxes, batch_idx, batch, in_h, in_w, out_h, out_w)
    if batch == 0 or channels == 0 or out_h == 0 or out_w == 0:
        return out
    block_c, block_w = sweep_blocks("lgd_ops.box_fill_triton", channels, out_w)
    rows, bands = sweep_bands(triton.cdiv(channels, block_c) * batch, out_h)
    with device_guard(values):
        wrap_triton(_box_fill_kernel)[(triton.cdiv(channels, block_c), batch, bands)](
            values, index, out, boxes.shape[0], channels, out_h, out_w, rows, values.stride(0), values.stride(1),
            out.stride(0), out.stride(1), out.stride(2), out.stride(3), AVERAGE=average,
            ACC_FP64=sweep_acc_fp64(values.dtype), BLOCK_C=block_c, BLOCK_W=block_w, BLOCK_E=SWEEP_EVENTS)
    return out


register_autograd("lgd_ops::box_fill_triton", "box_pool_triton")
