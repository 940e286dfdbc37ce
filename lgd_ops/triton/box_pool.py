"""box_pool on Triton: torch.ops.lgd_ops.box_pool_triton (docs/method.md §1-2).

A row sweep, as the CUDA kernel (csrc/common/box_sweep_math.h): one program per (block of channels, image)
walks the map top to bottom holding the column sums of the rows above as a [channels, row] block (an
integral image built a row at a time, no scratch map). The boxes are top/bottom events sorted by (image,
row) (_common.sweep_events; the cells and events come from _common.sweep_plan's cache, built once per boxes
and level); on an event row, tl.cumsum gives the row prefix and each event reads its part pre[x1] - pre[x0 - 1]
(a top event stores minus it, the bottom event adds it: the box sum). Cost: the map read once plus one pass
over the row per event, whatever the boxes' sizes; fp64 accumulation for fp32/fp64 maps (fp32 prefix sums
drift), fp32 for half maps; fixed-order adds, no atomics: deterministic.
A box whose sum is not finite is summed again over its own cells, so a NaN or inf stays with the boxes
covering it. The backward is box_fill_triton with average (its adjoint), as for the C++ op.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..box_pool import register_autograd
from ._common import MAX_GRID_Y, check_box_args, device_guard, sweep_blocks, sweep_acc_fp64, sweep_plan


@triton.jit
def _box_pool_kernel(feat_ptr, cells_ptr, key_ptr, id_ptr, start_ptr, partial_ptr, out_ptr, C, H, W, stride_b,
                     stride_c, stride_h, stride_w, AVERAGE: tl.constexpr, ACC_FP64: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    img = tl.program_id(1).to(tl.int64)
    c_mask = c_offs < C
    cols = tl.arange(0, BLOCK_W)
    mask = c_mask[:, None] & (cols < W)[None, :]
    if ACC_FP64:
        acc_ty = tl.float64
    else:
        acc_ty = tl.float32
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
            while key == base + j:
                event = tl.load(id_ptr + p)
                n = event // 2
                x0 = tl.load(cells_ptr + n * 4)
                x1 = tl.load(cells_ptr + n * 4 + 1)
                part = (tl.sum(tl.where((cols == x1)[None, :], pre, 0.0), axis=1)
                        - tl.sum(tl.where((cols == x0 - 1)[None, :], pre, 0.0), axis=1))
                slot = partial_ptr + n * C + c_offs
                if event % 2 == 0:  # top: minus the part above the box
                    tl.store(slot, -part, mask=c_mask)
                else:  # bottom: the part through the box's last row completes the sum
                    total = tl.load(slot, mask=c_mask, other=0.0) + part
                    y0 = tl.load(cells_ptr + n * 4 + 2)
                    y1 = tl.load(cells_ptr + n * 4 + 3)
                    finite = total - total == 0.0
                    if tl.sum((~finite & c_mask).to(tl.int32), axis=0) > 0:  # NaN - NaN, inf - inf: sum the box
                        direct = tl.zeros([BLOCK_C], dtype=acc_ty)
                        inside = mask & ((cols >= x0) & (cols <= x1))[None, :]
                        for jj in range(y0, y1 + 1):
                            vals = tl.load(plane + tl.cast(jj, tl.int64) * stride_h, mask=inside, other=0.0)
                            direct += tl.sum(vals.to(acc_ty), axis=1)
                        total = tl.where(finite, total, direct)
                    if AVERAGE:
                        count = (x1 - x0 + 1) * (y1 - y0 + 1)
                        if ACC_FP64:
                            total = total / count.to(tl.float64)
                        else:
                            total = tl.div_rn(total, count.to(tl.float32))  # IEEE division, as the C++ kernels
                    tl.store(out_ptr + n * C + c_offs, total.to(out_ptr.dtype.element_ty), mask=c_mask)
                p += 1
                key = tl.load(key_ptr + p, mask=p < p_end, other=-1)
            tl.debug_barrier()  # the top events' partial sums, visible to the whole program
        if j < H:
            col += tl.load(plane + tl.cast(j, tl.int64) * stride_h, mask=mask, other=0.0).to(acc_ty)


@triton_op("lgd_ops::box_pool_triton", mutates_args=())
def box_pool_triton(features: torch.Tensor, boxes: torch.Tensor, batch_idx: torch.Tensor, in_h: int, in_w: int,
                    average: bool) -> torch.Tensor:
    """Sum (average=False) or mean (average=True) of features [B, C, H, W] over each box's cells -> [N, C]."""
    op = "lgd_ops.box_pool_triton"
    if features.dim() != 4:
        raise RuntimeError(f"{op}: features must be [B, C, H, W], got {tuple(features.shape)}")
    check_box_args(op, boxes, batch_idx, in_h, in_w, features, "features")
    n_img, channels, height, width = features.shape
    n = boxes.shape[0]
    if n == 0 or channels == 0 or height == 0 or width == 0:
        return features.new_zeros(n, channels)
    if n_img > MAX_GRID_Y:
        raise RuntimeError(f"{op}: at most {MAX_GRID_Y} images per call, got {n_img}")
    out = features.new_zeros(n, channels)  # boxes covering nothing stay zero
    fp64 = sweep_acc_fp64(features.dtype)
    partial = features.new_empty(n, channels, dtype=torch.float64 if fp64 else torch.float32)
    cells, _, keys, ids, start = sweep_plan(boxes, batch_idx, n_img, in_h, in_w, height, width)
    block_c, block_w = sweep_blocks(op, channels, width)
    with device_guard(features):
        wrap_triton(_box_pool_kernel)[(triton.cdiv(channels, block_c), n_img)](
            features, cells, keys, ids, start, partial, out, channels, height, width, features.stride(0),
            features.stride(1), features.stride(2), features.stride(3), AVERAGE=average, ACC_FP64=fp64,
            BLOCK_C=block_c, BLOCK_W=block_w)
    return out


register_autograd("lgd_ops::box_pool_triton", "box_fill_triton")
