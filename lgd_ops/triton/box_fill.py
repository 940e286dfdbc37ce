"""box_fill on Triton: torch.ops.lgd_ops.box_fill_triton (docs/method.md §3).

A gather: one program per (image, block of channels, tile of cells) loops over that image's boxes
(grouped by a stable sort of batch_idx, in input order) and adds the value of every box covering
each cell; boxes missing the tile are skipped on their cell ranges. Every output element is
written once by one program (no float atomics), so the result is deterministic. The backward is
box_pool_triton with sums (its adjoint), as for the C++ op.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..box_fill import register_autograd
from ._common import acc_fp64, box_cells, check_box_args, device_guard, group_by_image

MAX_GRID_Z = 65535  # CUDA's limit on the third grid dimension (the image)


@triton.jit
def _box_fill_kernel(values_ptr, cells_ptr, order_ptr, start_ptr, out_ptr, C, H, W, tiles_w, stride_vn,
                     stride_vc, stride_ob, stride_oc, stride_oh, stride_ow, AVERAGE: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_C: tl.constexpr,
                     TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    tile = tl.program_id(0)
    row0 = (tile // tiles_w) * TILE_H
    col0 = (tile % tiles_w) * TILE_W
    c_offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    img = tl.program_id(2).to(tl.int64)
    c_mask = c_offs < C
    rows = row0 + tl.arange(0, TILE_H)
    cols = col0 + tl.arange(0, TILE_W)
    row_last = row0 + TILE_H - 1
    col_last = col0 + TILE_W - 1
    if ACC_FP64:
        acc = tl.zeros([BLOCK_C, TILE_H, TILE_W], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_C, TILE_H, TILE_W], dtype=tl.float32)
    k_begin = tl.load(start_ptr + img)
    k_end = tl.load(start_ptr + img + 1)
    for k in range(k_begin, k_end):  # the image's boxes, each covering at least one cell
        n = tl.load(order_ptr + k)
        x0 = tl.load(cells_ptr + n * 4)
        x1 = tl.load(cells_ptr + n * 4 + 1)
        y0 = tl.load(cells_ptr + n * 4 + 2)
        y1 = tl.load(cells_ptr + n * 4 + 3)
        if (x0 <= col_last) & (x1 >= col0) & (y0 <= row_last) & (y1 >= row0):  # the box meets the tile
            v = tl.load(values_ptr + n * stride_vn + c_offs * stride_vc, mask=c_mask, other=0.0).to(acc.dtype)
            if AVERAGE:
                count = (x1 - x0 + 1) * (y1 - y0 + 1)
                if ACC_FP64:
                    v = v / count.to(tl.float64)
                else:
                    v = tl.div_rn(v, count.to(tl.float32))
            inside = ((rows >= y0) & (rows <= y1))[:, None] & ((cols >= x0) & (cols <= x1))[None, :]
            acc += tl.where(inside[None, :, :], v[:, None, None], 0.0)
    plane = img * stride_ob + c_offs.to(tl.int64) * stride_oc
    offs = plane[:, None, None] + (rows * stride_oh)[None, :, None] + (cols * stride_ow)[None, None, :]
    mask = c_mask[:, None, None] & (rows < H)[None, :, None] & (cols < W)[None, None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton_op("lgd_ops::box_fill_triton", mutates_args=())
def box_fill_triton(values: torch.Tensor, boxes: torch.Tensor, batch_idx: torch.Tensor, in_h: int, in_w: int,
                    batch: int, out_h: int, out_w: int, average: bool, channels_last: bool = False) -> torch.Tensor:
    """Sum over the boxes covering each cell of the box's values [N, C] -> [batch, C, out_h, out_w]
    (average=True divides each box's values by its cell count first), written NCHW or channels_last."""
    if values.dim() != 2 or values.shape[0] != boxes.shape[0]:
        raise RuntimeError(f"lgd_ops.box_fill_triton: values must be [N, C] with N = boxes.size(0), "
                           f"got {tuple(values.shape)}")
    if batch < 0 or out_h < 0 or out_w < 0:
        raise RuntimeError(f"lgd_ops.box_fill_triton: output size must be non-negative, got "
                           f"({batch}, {out_h}, {out_w})")
    if batch > MAX_GRID_Z:
        raise RuntimeError(f"lgd_ops.box_fill_triton: at most {MAX_GRID_Z} images per call, got {batch}")
    check_box_args("lgd_ops.box_fill_triton", boxes, batch_idx, in_h, in_w, values, "values")
    channels = values.shape[1]
    out = torch.empty(batch, channels, out_h, out_w, dtype=values.dtype, device=values.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)  # all written
    if batch == 0 or channels == 0 or out_h == 0 or out_w == 0:
        return out
    cells, covers = box_cells(boxes, batch_idx, batch, in_h, in_w, out_h, out_w)
    order, start = group_by_image(covers, batch_idx, batch)
    tile_w = 8 if out_w <= 8 else (16 if out_w <= 16 else 32)
    tile_h = 8 if out_h <= 8 else 16
    tiles_w = triton.cdiv(out_w, tile_w)
    grid = (triton.cdiv(out_h, tile_h) * tiles_w, triton.cdiv(channels, 8), batch)
    with device_guard(values):
        wrap_triton(_box_fill_kernel)[grid](
            values, cells, order, start, out, channels, out_h, out_w, tiles_w, values.stride(0), values.stride(1),
            out.stride(0), out.stride(1), out.stride(2), out.stride(3), AVERAGE=average, ACC_FP64=acc_fp64(values.dtype), BLOCK_C=8, TILE_H=tile_h, TILE_W=tile_w)
    return out


register_autograd("lgd_ops::box_fill_triton", "box_pool_triton")
