"""normalized_mse on Triton: torch.ops.lgd_ops.normalized_mse_triton and its backward (docs/method.md §4).

Moments are sums of deviations from the plane's first element, accumulated in fp32 for fp16/bf16/fp32 maps and
fp64 for fp64, and turned, in fp64, into the per-plane terms of csrc/common/nmse_math.h: stats [5, planes] =
(mean_s, rstd_s, mean_t, rstd_t, k) and the plane's loss; the loss is their sum over the element count. The
backward is grad = scale * rstd_s * ((xs - xt) - xs * k) with scale = grad_out * 2 / total, read on the device
(no host sync). No normalized map is stored, and nothing is added atomically, so both passes are deterministic.
A launch per pyramid level and pass, in one of two schedules picked by the student's layout:
- NCHW (other views are copied to NCHW first): a plane is contiguous. Forward: a program per (image, channel)
  plane. Backward: a program per (plane, block of the plane).
- channels_last: a plane is read at stride C, so a program owns a tile of CL_TILE positions x CL_BLOCK_C
  consecutive channels of one image and loads [CL_BLOCK_P positions, CL_BLOCK_C channels] blocks, the channels
  contiguous (coalesced). Forward: each tile's per-channel moments go to a workspace [5, tiles x planes]; a
  second launch, a program per (image, run of channels), merges a plane's tiles with Chan's update, row r of
  MERGE_ROWS taking tiles r, r + MERGE_ROWS, ... in order, then the rows by tl.reduce (a fixed tree on a GPU).
  Backward: the same tiles, each program holding its channels' statistics.
Programs are numbered in memory order (image, tile, run of channels), in a 1-D grid.

eps and scale reach the kernels as fp64 tensors: Triton types a Python float argument as fp32.
Maps are read by strides (element f = j * W + i of plane (b, c) at b * sb + c * sc + f * se: se = 1 for NCHW, C
for channels_last; the teacher by its own strides, coalesced when it has the student's layout), and the
gradient has the student's layout.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..normalized_mse import register_autograd
from ._common import acc_fp64, device_guard

FORWARD_BLOCK = 1024
BACKWARD_BLOCK = 1024
MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension (blocks of a plane)
CL_TILE = 512  # channels_last: positions per program (a multiple of CL_BLOCK_P)
CL_BLOCK_P = 32  # positions per load
CL_BLOCK_C = 32  # consecutive channels per program
MERGE_ROWS = 8  # tiles merged side by side before the rows are merged


@triton.jit
def _store_plane(stats_ptr, loss_ptr, q, planes, s_mean, t_mean, s_m2, t_m2, st_c, dn, eps, mask):
    """nmse_plane_terms (csrc/common/nmse_math.h) in fp64, from a plane's means and sums of squared / cross
    deviations about them: its stats (column q of [5, planes]) and its loss."""
    vs = tl.where(s_m2 < 0.0, 0.0, s_m2 / dn)  # rounding can leave a one-pass sum slightly negative;
    vt = tl.where(t_m2 < 0.0, 0.0, t_m2 / dn)  # `< 0` lets a NaN (non-finite input) through
    s_rstd = 1.0 / tl.sqrt(vs + eps)
    t_rstd = 1.0 / tl.sqrt(vt + eps)
    ss = vs * s_rstd * s_rstd
    tt = vt * t_rstd * t_rstd
    st = (st_c / dn) * s_rstd * t_rstd
    per_elem = ss + tt - 2.0 * st
    stat_ty = stats_ptr.dtype.element_ty
    tl.store(stats_ptr + q, s_mean.to(stat_ty), mask=mask)
    tl.store(stats_ptr + planes + q, s_rstd.to(stat_ty), mask=mask)
    tl.store(stats_ptr + 2 * planes + q, t_mean.to(stat_ty), mask=mask)
    tl.store(stats_ptr + 3 * planes + q, t_rstd.to(stat_ty), mask=mask)
    tl.store(stats_ptr + 4 * planes + q, (ss - st).to(stat_ty), mask=mask)
    tl.store(loss_ptr + q, tl.where(per_elem < 0.0, 0.0, dn * per_elem), mask=mask)


@triton.jit
def _nmse_forward_kernel(s_ptr, t_ptr, eps_ptr, stats_ptr, loss_ptr, n, first, planes, C, s_sb, s_sc, s_se, t_sb,
                         t_sc, t_se, ACC_FP64: tl.constexpr, BLOCK: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    s_ptr += (plane // C) * s_sb + (plane % C) * s_sc
    t_ptr += (plane // C) * t_sb + (plane % C) * t_sc
    if ACC_FP64:
        acc_ty = tl.float64
    else:
        acc_ty = tl.float32
    s0 = tl.load(s_ptr).to(acc_ty)
    t0 = tl.load(t_ptr).to(acc_ty)
    a = tl.zeros([BLOCK], dtype=acc_ty)  # sums of x, y, x^2, y^2, x*y with x = s - s0, y = t - t0
    b = tl.zeros([BLOCK], dtype=acc_ty)
    aa = tl.zeros([BLOCK], dtype=acc_ty)
    bb = tl.zeros([BLOCK], dtype=acc_ty)
    ab = tl.zeros([BLOCK], dtype=acc_ty)
    for i0 in range(0, n, BLOCK):
        offs = tl.cast(i0, tl.int64) + tl.arange(0, BLOCK)  # int64: f * se (se = C in channels_last) can pass 2**31
        mask = offs < n
        x = tl.where(mask, tl.load(s_ptr + offs * s_se, mask=mask, other=0.0).to(acc_ty) - s0, 0.0)
        y = tl.where(mask, tl.load(t_ptr + offs * t_se, mask=mask, other=0.0).to(acc_ty) - t0, 0.0)
        a += x
        b += y
        aa += x * x
        bb += y * y
        ab += x * y
    dn = tl.cast(n, tl.float64)
    sa = tl.sum(a, axis=0).to(tl.float64)
    sb = tl.sum(b, axis=0).to(tl.float64)
    _store_plane(stats_ptr, loss_ptr, first + plane, planes, s0.to(tl.float64) + sa / dn, t0.to(tl.float64) + sb / dn,
                 tl.sum(aa, axis=0).to(tl.float64) - sa * sa / dn, tl.sum(bb, axis=0).to(tl.float64) - sb * sb / dn,
                 tl.sum(ab, axis=0).to(tl.float64) - sa * sb / dn, dn, tl.load(eps_ptr), None)


@triton.jit
def _nmse_backward_kernel(s_ptr, t_ptr, g_ptr, stats_ptr, scale_ptr, n, first, planes, C, s_sb, s_sc, s_se, t_sb,
                          t_sc, t_se, g_sb, g_sc, g_se, ACC_FP64: tl.constexpr, BLOCK: tl.constexpr):
    if ACC_FP64:
        acc_ty = tl.float64
    else:
        acc_ty = tl.float32
    plane = tl.program_id(0).to(tl.int64)  # a program per (plane, block of the plane)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: f * se can pass 2**31
    mask = offs < n
    q = first + plane
    s_mean = tl.load(stats_ptr + q).to(acc_ty)
    s_rstd = tl.load(stats_ptr + planes + q).to(acc_ty)
    t_mean = tl.load(stats_ptr + 2 * planes + q).to(acc_ty)
    t_rstd = tl.load(stats_ptr + 3 * planes + q).to(acc_ty)
    k = tl.load(stats_ptr + 4 * planes + q).to(acc_ty)
    scale = tl.load(scale_ptr).to(acc_ty)
    b, c = plane // C, plane % C
    s = tl.load(s_ptr + b * s_sb + c * s_sc + offs * s_se, mask=mask, other=0.0).to(acc_ty)
    t = tl.load(t_ptr + b * t_sb + c * t_sc + offs * t_se, mask=mask, other=0.0).to(acc_ty)
    xs = (s - s_mean) * s_rstd
    xt = (t - t_mean) * t_rstd
    g = scale * s_rstd * ((xs - xt) - xs * k)  # nmse_grad (csrc/common/nmse_math.h)
    tl.store(g_ptr + b * g_sb + c * g_sc + offs * g_se, g.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cl_tile(n, C, tiles, runs, TILE: tl.constexpr, BLOCK_C: tl.constexpr):
    """The channels_last tile of this program, programs numbered image, tile, run of channels (memory order):
    (image, tile, its BLOCK_C channels and their mask, its first position and the end of its positions)."""
    pid = tl.program_id(0).to(tl.int64)
    r = pid // runs
    b = r // tiles
    tile = r - b * tiles
    c = (pid - r * runs) * BLOCK_C + tl.arange(0, BLOCK_C)
    begin = tile * TILE
    return b, tile, c, c < C, begin, tl.minimum(begin + TILE, n)


@triton.jit
def _chan_merge(na, mxa, mya, m2xa, m2ya, cxya, nb, mxb, myb, m2xb, m2yb, cxyb):
    """Chan's update (nmse_merge in csrc/common/nmse_math.h): the moments of the union of two runs. An empty run
    has all-zero moments, so it leaves the other unchanged (f = 0 or 1, w = 0)."""
    n = na + nb
    f = nb / tl.where(n > 0, n, 1.0)
    w = na * f
    dx = mxb - mxa
    dy = myb - mya
    return (n, mxa + dx * f, mya + dy * f, m2xa + m2xb + dx * dx * w, m2ya + m2yb + dy * dy * w,
            cxya + cxyb + dx * dy * w)


@triton.jit
def _nmse_cl_moments_kernel(s_ptr, t_ptr, part_ptr, n, C, tiles, runs, planes, parts, s_sb, s_sc, s_se, t_sb,
                            t_sc, t_se, ACC_FP64: tl.constexpr, TILE: tl.constexpr, BLOCK_P: tl.constexpr,
                            BLOCK_C: tl.constexpr):
    if ACC_FP64:
        acc_ty = tl.float64
    else:
        acc_ty = tl.float32
    b, tile, c, cmask, begin, end = _cl_tile(n, C, tiles, runs, TILE, BLOCK_C)
    s_ptr += b * s_sb + c * s_sc
    t_ptr += b * t_sb + c * t_sc
    s0 = tl.load(s_ptr, mask=cmask, other=0.0).to(acc_ty)  # the planes' first elements
    t0 = tl.load(t_ptr, mask=cmask, other=0.0).to(acc_ty)
    a = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)  # sums of x, y, x^2, y^2, x*y with x = s - s0, y = t - t0
    bs = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)
    aa = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)
    bb = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)
    ab = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)
    for p0 in range(0, TILE, BLOCK_P):
        p = begin + p0 + tl.arange(0, BLOCK_P)  # int64: p * se (se = C) can pass 2**31
        mask = (p < end)[:, None] & cmask[None, :]
        x = tl.where(mask, tl.load(s_ptr[None, :] + p[:, None] * s_se, mask=mask, other=0.0).to(acc_ty) - s0[None, :],
                     0.0)
        y = tl.where(mask, tl.load(t_ptr[None, :] + p[:, None] * t_se, mask=mask, other=0.0).to(acc_ty) - t0[None, :],
                     0.0)
        a += x
        bs += y
        aa += x * x
        bb += y * y
        ab += x * y
    cnt = (end - begin).to(tl.float64)
    sx = tl.sum(a, axis=0).to(tl.float64)
    sy = tl.sum(bs, axis=0).to(tl.float64)
    o = part_ptr + tile * planes + b * C + c  # the tile's planes side by side (nmse_part_index)
    tl.store(o, sx / cnt, mask=cmask)
    tl.store(o + parts, sy / cnt, mask=cmask)
    tl.store(o + 2 * parts, tl.sum(aa, axis=0).to(tl.float64) - sx * sx / cnt, mask=cmask)
    tl.store(o + 3 * parts, tl.sum(bb, axis=0).to(tl.float64) - sy * sy / cnt, mask=cmask)
    tl.store(o + 4 * parts, tl.sum(ab, axis=0).to(tl.float64) - sx * sy / cnt, mask=cmask)


@triton.jit
def _nmse_cl_merge_kernel(s_ptr, t_ptr, part_ptr, eps_ptr, stats_ptr, loss_ptr, n, C, tiles, runs, planes, parts,
                          first, planes_total, s_sb, s_sc, t_sb, t_sc, TILE: tl.constexpr, ROWS: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # a program per (image, run of channels)
    b = pid // runs
    c = (pid - b * runs) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    zero = tl.zeros([ROWS, BLOCK_C], dtype=tl.float64)
    cnt, mx, my, m2x, m2y, cxy = zero, zero, zero, zero, zero, zero
    for k in range(0, tiles, ROWS):
        tile = k + tl.arange(0, ROWS).to(tl.int64)  # row r takes tiles r, r + ROWS, ... in order
        mask = (tile < tiles)[:, None] & cmask[None, :]
        o = part_ptr + tile[:, None] * planes + (b * C + c)[None, :]
        nb = tl.where(mask, (tl.minimum((tile + 1) * TILE, n) - tile * TILE).to(tl.float64)[:, None], 0.0)
        cnt, mx, my, m2x, m2y, cxy = _chan_merge(
            cnt, mx, my, m2x, m2y, cxy, nb, tl.load(o, mask=mask, other=0.0), tl.load(o + parts, mask=mask, other=0.0),
            tl.load(o + 2 * parts, mask=mask, other=0.0), tl.load(o + 3 * parts, mask=mask, other=0.0),
            tl.load(o + 4 * parts, mask=mask, other=0.0))
    cnt, mx, my, m2x, m2y, cxy = tl.reduce((cnt, mx, my, m2x, m2y, cxy), 0, _chan_merge)
    s0 = tl.load(s_ptr + b * s_sb + c * s_sc, mask=cmask, other=0.0).to(tl.float64)
    t0 = tl.load(t_ptr + b * t_sb + c * t_sc, mask=cmask, other=0.0).to(tl.float64)
    _store_plane(stats_ptr, loss_ptr, first + b * C + c, planes_total, s0 + mx, t0 + my, m2x, m2y, cxy,
                 tl.cast(n, tl.float64), tl.load(eps_ptr), cmask)


@triton.jit
def _nmse_cl_backward_kernel(s_ptr, t_ptr, g_ptr, stats_ptr, scale_ptr, n, C, tiles, runs, first, planes_total, s_sb,
                             s_sc, s_se, t_sb, t_sc, t_se, g_sb, g_sc, g_se, ACC_FP64: tl.constexpr,
                             TILE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    if ACC_FP64:
        acc_ty = tl.float64
    else:
        acc_ty = tl.float32
    b, _, c, cmask, begin, end = _cl_tile(n, C, tiles, runs, TILE, BLOCK_C)
    q = first + b * C + c
    s_mean = tl.load(stats_ptr + q, mask=cmask, other=0.0).to(acc_ty)[None, :]
    s_rstd = tl.load(stats_ptr + planes_total + q, mask=cmask, other=0.0).to(acc_ty)[None, :]
    t_mean = tl.load(stats_ptr + 2 * planes_total + q, mask=cmask, other=0.0).to(acc_ty)[None, :]
    t_rstd = tl.load(stats_ptr + 3 * planes_total + q, mask=cmask, other=0.0).to(acc_ty)[None, :]
    k = tl.load(stats_ptr + 4 * planes_total + q, mask=cmask, other=0.0).to(acc_ty)[None, :]
    scale = tl.load(scale_ptr).to(acc_ty)
    s_ptr += (b * s_sb + c * s_sc)[None, :]
    t_ptr += (b * t_sb + c * t_sc)[None, :]
    g_ptr += (b * g_sb + c * g_sc)[None, :]
    for p0 in range(0, TILE, BLOCK_P):
        p = (begin + p0 + tl.arange(0, BLOCK_P))[:, None]  # int64: p * se (se = C) can pass 2**31
        mask = (p < end) & cmask[None, :]
        s = tl.load(s_ptr + p * s_se, mask=mask, other=0.0).to(acc_ty)
        t = tl.load(t_ptr + p * t_se, mask=mask, other=0.0).to(acc_ty)
        xs = (s - s_mean) * s_rstd
        xt = (t - t_mean) * t_rstd
        g = scale * s_rstd * ((xs - xt) - xs * k)  # nmse_grad (csrc/common/nmse_math.h)
        tl.store(g_ptr + p * g_se, g.to(g_ptr.dtype.element_ty), mask=mask)


def _planar(x):
    """x as the kernels read it: NCHW and channels_last maps as they are, other views copied to NCHW."""
    return x if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) else x.contiguous()


def _plane_strides(x):
    """(sb, sc, se) of an NCHW or channels_last map: element f = j * W + i of plane (b, c) at b*sb + c*sc + f*se."""
    se = 1 if x.is_contiguous() else (x.stride(3) if x.shape[3] > 1 else x.stride(2))
    return x.stride(0), x.stride(1), se


def _is_channels_last(x):
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _cl_grid(s):
    """(tiles per plane, runs of channels, programs) of the channels_last sweeps over map s."""
    tiles = triton.cdiv(s.shape[2] * s.shape[3], CL_TILE)
    runs = triton.cdiv(s.shape[1], CL_BLOCK_C)
    return tiles, runs, s.shape[0] * tiles * runs


def _check_levels(op, student, teacher):
    """The checks of csrc/common/nmse_checks.h, for direct torch.ops calls."""
    if not student or len(student) != len(teacher):
        raise RuntimeError(f"{op}: student and teacher must be equal-length non-empty lists, got "
                           f"{len(student)} and {len(teacher)}")
    for level, (s, t) in enumerate(zip(student, teacher)):
        if s.dim() != 4 or s.shape != t.shape:
            raise RuntimeError(f"{op}: level {level} student {tuple(s.shape)} and teacher {tuple(t.shape)} "
                               "must be equal [B, C, H, W] shapes")
        if s.numel() == 0:
            raise RuntimeError(f"{op}: level {level} is empty")
        if s.dtype != student[0].dtype or t.dtype != student[0].dtype:
            raise RuntimeError(f"{op}: all maps must share one dtype")
        if s.device != student[0].device or t.device != student[0].device:
            raise RuntimeError(f"{op}: all maps must be on one device")


@triton_op("lgd_ops::normalized_mse_triton", mutates_args=())
def normalized_mse_triton(student: list[torch.Tensor], teacher: list[torch.Tensor],
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, stats): sum over levels of ||IN(s) - IN(t)||^2 / total elements, in the student's dtype, and
    the per-plane stats [5, planes] (fp64 for fp64 maps, else fp32) that the backward reads."""
    _check_levels("lgd_ops.normalized_mse_triton", student, teacher)
    like = student[0]
    fp64 = acc_fp64(like.dtype)
    planes = sum(s.shape[0] * s.shape[1] for s in student)
    total = sum(s.numel() for s in student)
    stats = like.new_empty(5, planes, dtype=torch.float64 if fp64 else torch.float32)
    plane_loss = like.new_empty(planes, dtype=torch.float64)
    eps_t = torch.full((1,), eps, dtype=torch.float64, device=like.device)
    first = 0
    with device_guard(like):
        for s, t in zip(student, teacher):
            s, t = _planar(s), _planar(t)
            count = s.shape[0] * s.shape[1]
            n, C = s.shape[2] * s.shape[3], s.shape[1]
            if _is_channels_last(s):
                tiles, runs, programs = _cl_grid(s)
                (s_sb, s_sc, s_se), (t_sb, t_sc, t_se) = _plane_strides(s), _plane_strides(t)
                part = like.new_empty(5, tiles * count, dtype=torch.float64)
                wrap_triton(_nmse_cl_moments_kernel)[(programs,)](
                    s, t, part, n, C, tiles, runs, count, tiles * count, s_sb, s_sc, s_se, t_sb, t_sc, t_se,
                    ACC_FP64=fp64, TILE=CL_TILE, BLOCK_P=CL_BLOCK_P, BLOCK_C=CL_BLOCK_C)
                wrap_triton(_nmse_cl_merge_kernel)[(s.shape[0] * runs,)](
                    s, t, part, eps_t, stats, plane_loss, n, C, tiles, runs, count, tiles * count, first, planes,
                    s_sb, s_sc, t_sb, t_sc, TILE=CL_TILE, ROWS=MERGE_ROWS, BLOCK_C=CL_BLOCK_C)
            else:
                wrap_triton(_nmse_forward_kernel)[(count,)](
                    s, t, eps_t, stats, plane_loss, n, first, planes, C, *_plane_strides(s), *_plane_strides(t),
                    ACC_FP64=fp64, BLOCK=FORWARD_BLOCK)
            first += count
    loss = plane_loss.sum() / total  # fixed-order sum of the per-plane losses
    return loss.to(like.dtype), stats


@triton_op("lgd_ops::normalized_mse_backward_triton", mutates_args=())
def normalized_mse_backward_triton(grad: torch.Tensor, student: list[torch.Tensor], teacher: list[torch.Tensor],
                                   stats: torch.Tensor) -> list[torch.Tensor]:
    """d loss / d student for every level (the student's layout and dtype), from the forward's stats."""
    op = "lgd_ops.normalized_mse_backward_triton"
    _check_levels(op, student, teacher)
    planes = sum(s.shape[0] * s.shape[1] for s in student)
    total = sum(s.numel() for s in student)
    if stats.dim() != 2 or stats.shape[0] != 5 or stats.shape[1] != planes:
        raise RuntimeError(f"{op}: stats must be [5, {planes}], got {tuple(stats.shape)}")
    if grad.numel() != 1:
        raise RuntimeError(f"{op}: grad must be a scalar")
    fp64 = acc_fp64(student[0].dtype)
    stats = stats.to(torch.float64 if fp64 else torch.float32).contiguous()
    scale = (grad.detach().reshape(1).to(torch.float64) * (2.0 / total)).contiguous()
    grads = []
    first = 0
    with device_guard(student[0]):
        for s, t in zip(student, teacher):
            s, t = _planar(s), _planar(t)
            fmt = torch.channels_last if _is_channels_last(s) else torch.contiguous_format
            g = torch.empty_like(s, memory_format=fmt)
            n = s.shape[2] * s.shape[3]
            if _is_channels_last(s):
                tiles, runs, programs = _cl_grid(s)
                wrap_triton(_nmse_cl_backward_kernel)[(programs,)](
                    s, t, g, stats, scale, n, s.shape[1], tiles, runs, first, planes, *_plane_strides(s),
                    *_plane_strides(t), *_plane_strides(g), ACC_FP64=fp64, TILE=CL_TILE, BLOCK_P=CL_BLOCK_P,
                    BLOCK_C=CL_BLOCK_C)
            else:
                block = 256 if n <= 256 else BACKWARD_BLOCK
                if triton.cdiv(n, block) > MAX_GRID_Y:
                    raise RuntimeError(f"{op}: planes of at most {MAX_GRID_Y * block} elements, got {n}")
                wrap_triton(_nmse_backward_kernel)[(s.shape[0] * s.shape[1], triton.cdiv(n, block))](
                    s, t, g, stats, scale, n, first, planes, s.shape[1], *_plane_strides(s), *_plane_strides(t),
                    *_plane_strides(g), ACC_FP64=fp64, BLOCK=block)
            grads.append(g)
            first += s.shape[0] * s.shape[1]
    return grads


register_autograd("lgd_ops::normalized_mse_triton", "normalized_mse_backward_triton")
