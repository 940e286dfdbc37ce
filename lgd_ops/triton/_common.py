"""Helpers shared by the Triton box kernels: the level index they read, their block sizes and bands of rows,
and two @triton.jit functions (a band's first event, the row change of a block of fill events).

The kernels read the level index (lgd_ops._boxes.level_index: cells, sorted row events, image starts, one
int32 tensor built on the host once per batch and level); without one, an op builds it per call on its own
device, from the same float64 arithmetic as csrc/common/box_math.h, so every backend covers the same cells.
"""
import contextlib

import torch
import triton
import triton.language as tl

from .._boxes import index_size, level_index


MAX_SWEEP_WIDTH = 8192  # the sweeps hold a whole row of a plane per program
MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension (the sweeps' image)
SWEEP_ELEMENTS = 4096  # channels x padded row width held per program
SWEEP_EVENTS = 16  # events of one row handled at once (a row with more takes several blocks)
SWEEP_PROGRAMS = 264  # programs a sweep launch aims at: two per SM of an H100 or H200 (132 SMs)
MIN_BAND_ROWS = 8  # a band's rows, at least: each band also scans the events above it once


def sweep_index(op, index, boxes, batch_idx, batch, in_h, in_w, height, width):
    """The level index of the call: `index` after the size, dtype, device and layout checks (no sync), or
    level_index built now on the boxes' device (the op's, checked by check_box_args)."""
    if index is None:
        return level_index(boxes, batch_idx, batch, in_h, in_w, height, width)
    size = index_size(boxes.shape[0], batch)
    if (index.dim() != 1 or index.numel() != size or index.dtype != torch.int32 or index.device != boxes.device
            or not index.is_contiguous()):
        raise RuntimeError(f"{op}: index must be a contiguous int32 level index of {size} entries (8 N + batch + 1, "
                           f"N = {boxes.shape[0]}, batch = {batch}) on {boxes.device}, got {index.dtype} "
                           f"{tuple(index.shape)} on {index.device}"
                           f"{'' if index.is_contiguous() else ', not contiguous'}")
    return index


@triton.jit
def row_change(v, start, stop, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_W: tl.constexpr):
    """[BLOCK_C, BLOCK_W]: the sum over a block's events e of v[:, e] on the columns [start[e], stop[e]) (what
    the cumsum of a difference row with +v at start and -v at stop adds). The 2E points (column, +-v) are
    put in column order (ranks of column * 2E + point, ties in event order, from a [2E, 2E] comparison); column
    w then gathers the running sum of the points at or left of it: O(C (E + W) + E (E + W)) work, no scatter,
    no atomics."""
    key = tl.reshape(tl.join(start, stop), (2 * BLOCK_E,)) * (2 * BLOCK_E) + tl.arange(0, 2 * BLOCK_E)
    weight = tl.reshape(tl.join(v, -v), (BLOCK_C, 2 * BLOCK_E))
    rank = tl.sum((key[None, :] < key[:, None]).to(tl.int32), axis=1)  # keys are distinct: a permutation
    at_rank = rank[None, :] == tl.arange(0, 2 * BLOCK_E)[:, None]  # [rank, point]
    order = tl.sum(tl.where(at_rank, key[None, :], 0), axis=1)  # the keys in ascending order
    point = tl.broadcast_to((order % (2 * BLOCK_E))[None, :], (BLOCK_C, 2 * BLOCK_E))
    running = tl.cumsum(tl.gather(weight, point, 1), axis=1)
    cols = tl.arange(0, BLOCK_W)
    reached = tl.sum(((order // (2 * BLOCK_E))[:, None] <= cols[None, :]).to(tl.int32), axis=0)  # points <= w
    last = tl.broadcast_to(tl.maximum(reached - 1, 0)[None, :], (BLOCK_C, BLOCK_W))
    return tl.where((reached > 0)[None, :], tl.gather(running, last, 1), 0.0)


@triton.jit
def first_event(key_ptr, lo, hi, key):
    """The first position in [lo, hi) of the ascending keys whose key is at least `key` (hi if none)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(key_ptr + mid) < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


def sweep_bands(column_programs, height):
    """(rows per band, bands): the rows split into bands, each swept by its own programs, so that the launch
    has about SWEEP_PROGRAMS programs (column_programs = channel blocks x images), bands of MIN_BAND_ROWS rows
    at least."""
    bands = max(1, min(triton.cdiv(SWEEP_PROGRAMS, column_programs), triton.cdiv(height, MIN_BAND_ROWS)))
    rows = triton.cdiv(height, bands)
    return rows, triton.cdiv(height, rows)


def sweep_blocks(op, channels, width):
    """(BLOCK_C, BLOCK_W) of a sweep program: the padded row and as many channels as fit SWEEP_ELEMENTS."""
    if width > MAX_SWEEP_WIDTH:
        raise RuntimeError(f"{op}: maps at most {MAX_SWEEP_WIDTH} cells wide, got {width}")
    block_w = triton.next_power_of_2(width)
    block_c = max(1, min(triton.next_power_of_2(channels), SWEEP_ELEMENTS // block_w, 32))
    return block_c, block_w


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


def sweep_acc_fp64(dtype):
    """The box sweeps accumulate fp32 and fp64 maps in fp64 (fp32 prefix sums drift), half maps in fp32."""
    return dtype in (torch.float32, torch.float64)


def device_guard(tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()
