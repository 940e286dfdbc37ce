"""Host-side helpers shared by the Triton box kernels.

The per-box cell ranges come from lgd_ops._boxes.box_cells (a few float64 torch ops on N boxes, with
exactly the arithmetic of csrc/common/box_math.h), so the Triton backend covers bit-for-bit the cells of
the C++ kernels and the reference; the kernels take the resulting int32 ranges.

The plan of a call (the cells and the sorted row events, sweep_plan) depends only on the boxes, batch_idx
and a few sizes, and the box ops run on the same boxes at every level, forward and backward; so the plans
are kept here, in one process-wide cache shared by box_pool_triton and box_fill_triton, keyed as the C++
kernels' csrc/common/plan_cache.h: an in-place edit, a dead tensor or a recycled id() misses. Nothing is
cached while compiling, for inference tensors, or during CUDA graph capture (_cacheable).
"""
import contextlib
import threading
import weakref

import torch
import triton

from .._boxes import box_cells


MAX_SWEEP_WIDTH = 8192  # the sweeps hold a whole row of a plane per program
MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension (the sweeps' image)
SWEEP_ELEMENTS = 4096  # channels x padded row width held per program


def sweep_events(cells, covers, batch_idx, batch, height):
    """The row sweeps' events (docs/method.md §1-3; csrc/common/box_sweep_math.h is the CUDA twin): box n's
    top event 2n at row y0 and bottom event 2n + 1 at row y1 + 1, keyed image * (height + 2) + row (boxes
    covering nothing after every image). Returns (keys, ids, start): int64 keys ascending, the event ids in
    key order (box order within a row: a stable sort), and int64 [batch + 1] with image b's events at
    [start[b], start[b + 1])."""
    rows = torch.stack([cells[:, 2], cells[:, 3] + 1], dim=1).reshape(-1).to(torch.int64)
    img = batch_idx.repeat_interleave(2)
    keys = torch.where(covers.repeat_interleave(2), img * (height + 2) + rows,
                       torch.full_like(rows, batch * (height + 2)))
    keys, ids = torch.sort(keys, stable=True)
    start = torch.searchsorted(keys, torch.arange(batch + 1, dtype=keys.dtype, device=keys.device) * (height + 2))
    return keys.contiguous(), ids.contiguous(), start.contiguous()


PLAN_CACHE_ENTRIES = 32
_plans = []  # (weak boxes, weak batch_idx, key, plan), oldest first
_plans_lock = threading.Lock()


def _build_plan(boxes, batch_idx, batch, in_h, in_w, height, width):
    cells, covers = box_cells(boxes, batch_idx, batch, in_h, in_w, height, width)
    return (cells, covers, *sweep_events(cells, covers, batch_idx, batch, height))


def _cacheable(boxes, batch_idx):
    """Plain eager tensors outside torch.compile and CUDA graph capture: traced code must not see Python-side
    state (fake and functional tensors have no data either), inference tensors have no version counter, and
    a captured graph must not read tensors the cache may free."""
    if torch.compiler.is_compiling():
        return False
    if any(type(t) is not torch.Tensor or t.is_inference() for t in (boxes, batch_idx)):
        return False
    return boxes.device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


def _tensor_key(t):
    return t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.stride()


def sweep_plan(boxes, batch_idx, batch, in_h, in_w, height, width):
    """(cells, covers, keys, ids, start) of box_cells and sweep_events for a height x width map of `batch`
    images, from the plan cache: reused while boxes and batch_idx are the same live tensors, unedited (data
    pointer and version counter), with the same sizes, device and (on CUDA) current stream, since the plan's
    tensors are ordered on the stream that built them. PLAN_CACHE_ENTRIES entries, the oldest evicted first;
    entries of dead tensors are dropped at the next lookup."""
    if not _cacheable(boxes, batch_idx):
        return _build_plan(boxes, batch_idx, batch, in_h, in_w, height, width)
    device = boxes.device
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (_tensor_key(boxes), _tensor_key(batch_idx), batch, in_h, in_w, height, width, device, stream)
    with _plans_lock:
        _plans[:] = [e for e in _plans if e[0]() is not None and e[1]() is not None]
        for weak_boxes, weak_idx, entry_key, plan in _plans:
            if weak_boxes() is boxes and weak_idx() is batch_idx and entry_key == key:
                return plan
    # Built outside the lock; the key (versions included) was read first, so an edit made meanwhile misses.
    plan = _build_plan(boxes, batch_idx, batch, in_h, in_w, height, width)
    with _plans_lock:
        if len(_plans) >= PLAN_CACHE_ENTRIES:
            del _plans[0]
        _plans.append((weakref.ref(boxes), weakref.ref(batch_idx), key, plan))
    return plan


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
