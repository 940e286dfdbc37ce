"""The "triton" backend (lgd_ops/triton/): the three ops and their backwards against the reference backend on
float64 copies, the exact cells a box covers, opcheck, tracing, and backend selection.

Triton's interpreter (CPU tensors) is chosen when the @triton.jit functions are defined, from TRITON_INTERPRET.
So that this process never holds interpreted kernels (or JIT kernels that a later TRITON_INTERPRET=1 expects
to interpret), the kernel tests run in child pytest processes of this same file:
  interpret child  TRITON_INTERPRET=1: every kernel test on CPU tensors (on a GPU machine they also run here,
                   in this process, on CUDA tensors);
  jit child        no interpreter, no GPU needed: the kernels compiled for sm_90 by Triton's real compiler,
                   the triton_op bodies traced with fake tensors (the path torch.compile takes), and torch's
                   analysis of which kernel arguments are written.
Shapes are tiny: the interpreter is ~1000x slower than torch.
"""
import importlib
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

import lgd_ops
from lgd_ops import _backend

CHILD = os.environ.get("LGD_OPS_TRITON_CHILD")  # None here, "interpret" or "jit" in a child process
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
GPU = torch.cuda.is_available()
# Where the kernel tests run in this process: CPU tensors under the interpreter, else CUDA tensors on a GPU.
DEVICE = "cpu" if INTERPRET else ("cuda" if GPU and CHILD is None else None)
RUN_KERNELS = HAS_TRITON and DEVICE is not None and CHILD != "jit"
# JIT (not interpreted) kernels without launching them: a jit child, or this process on a GPU machine.
RUN_TRACING = HAS_TRITON and not INTERPRET and (CHILD == "jit" or (CHILD is None and GPU))

needs_kernels = pytest.mark.skipif(
    not RUN_KERNELS, reason="no GPU here: the kernel tests run in the TRITON_INTERPRET=1 child "
    "(test_kernels_in_interpreter_child)")
needs_tracing = pytest.mark.skipif(
    not RUN_TRACING, reason="needs JIT (non-interpreted) kernels: runs in the jit child (test_tracing_in_jit_child)")
parent_only = pytest.mark.skipif(CHILD is not None, reason="runs in the parent process only")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
# (rtol, atol) against float64, atol relative to the largest expected magnitude
TOL = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3),
       torch.bfloat16: (1.6e-2, 1.6e-2)}


def _ops():
    import lgd_ops.triton  # noqa: F401  (registers torch.ops.lgd_ops.*_triton)

    return torch.ops.lgd_ops


def _assert_close(got, expected, dtype, msg=""):
    rtol, atol = TOL[dtype]
    assert got.dtype == dtype, f"{msg}: dtype {got.dtype}, expected {dtype}"
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(got.detach().cpu().double(), expected.detach().cpu().double(), rtol=rtol,
                               atol=atol * scale, msg=lambda m: f"{msg}\n{m}")


# ---------------------------------------------------------------------------------------------
# Inputs: boxes of every hard kind
# ---------------------------------------------------------------------------------------------

def _boxes(n, image_size, level, gen):
    """[n, 4] float64 boxes cycling through: random inside, past the edges, degenerate (x2 <= x1 or y2 <= y1),
    corners exactly on level-grid lines, tiny (often between the cells of a coarse level), the whole image."""
    in_h, in_w = image_size
    lh, lw = level
    out = []
    for k in range(n):
        u = torch.rand(4, generator=gen, dtype=torch.float64).tolist()
        kind = k % 6
        if kind == 0:
            box = [min(u[0], u[2]) * in_w, min(u[1], u[3]) * in_h, max(u[0], u[2]) * in_w, max(u[1], u[3]) * in_h]
        elif kind == 1:
            box = [(u[0] - 0.5) * in_w, (u[1] - 0.5) * in_h, (u[2] + 0.8) * in_w, (u[3] + 0.8) * in_h]
        elif kind == 2:
            x, y = u[0] * in_w, u[1] * in_h
            box = [x, y, x - u[2] * 3, y + 5] if u[3] < 0.5 else [x, y, x + 5, y]
        elif kind == 3:
            sx, sy = in_w / lw, in_h / lh
            i1, i2 = sorted(int(v * (lw + 1)) for v in u[:2])
            j1, j2 = sorted(int(v * (lh + 1)) for v in u[2:])
            box = [i1 * sx, j1 * sy, i2 * sx, j2 * sy]
        elif kind == 4:
            x, y = u[0] * in_w, u[1] * in_h
            box = [x, y, x + u[2] * 1.5 * in_w / lw, y + u[3] * 1.5 * in_h / lh]
        else:
            box = [0.0, 0.0, float(in_w), float(in_h)] if u[0] < 0.5 else [0.0, 0.0, in_w - 1.0, in_h - 1.0]
        out.append(box)
    return torch.tensor(out, dtype=torch.float64).reshape(n, 4)


# name -> (B, C, image (H_in, W_in), level (H, W), N, images left without boxes)
CASES = {
    "mixed": (2, 3, (64, 80), (8, 10), 18, ()),
    "empty_image": (3, 2, (32, 40), (4, 5), 8, (1,)),
    "coarse": (2, 2, (128, 96), (2, 3), 10, ()),
    "no_boxes": (2, 3, (32, 48), (4, 6), 0, ()),
    "map_1x1": (2, 2, (16, 16), (1, 1), 8, ()),
    "upsampled": (1, 2, (8, 10), (16, 20), 8, ()),
    "large": (2, 40, (160, 320), (20, 40), 30, ()),  # several channel blocks, tiles, column blocks
}


def _case(name, device):
    b, c, image_size, level, n, empty = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    boxes = _boxes(n, image_size, level, gen)
    images = [i for i in range(b) if i not in empty]
    batch_idx = torch.tensor(images, dtype=torch.int64)[torch.randint(0, len(images), (n,), generator=gen)]
    return boxes.to(device), batch_idx.to(device), b, c, image_size, level


def _box_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype  # as under autocast


# ---------------------------------------------------------------------------------------------
# Kernel tests (interpret child, or in process on a GPU)
# ---------------------------------------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("level", [(1, 1), (3, 5), (8, 10), (7, 9), (16, 20)], ids=str)
def test_cells_match_reference_exactly(level):
    """box_fill_triton of one-hot values paints each box's own mask: exactly the reference masks (and the C++
    kernels' when built), whatever the box: past the edges, on grid lines, degenerate, NaN or inf corners."""
    ops = _ops()
    image_size = (56, 72)
    gen = torch.Generator().manual_seed(level[0] * 100 + level[1])
    boxes = _boxes(42, image_size, level, gen)
    boxes = torch.cat([boxes, torch.tensor([[float("nan"), 0.0, 30.0, 30.0], [0.0, 0.0, float("inf"), 40.0],
                                            [-float("inf"), 3.0, 20.0, float("inf")]], dtype=torch.float64)])
    n = boxes.shape[0]
    batch_idx = torch.zeros(n, dtype=torch.int64)
    batch_idx[3], batch_idx[10] = -1, 7  # outside [0, 1): covers nothing (the public API rejects it first)
    eye = torch.eye(n, dtype=torch.float64)
    dev = DEVICE
    masks = ops.box_fill_triton(eye.to(dev), boxes.to(dev), batch_idx.to(dev), *image_size, 1, *level, False)
    expected = lgd_ops._boxes.box_masks(boxes, image_size, *level).reshape(n, *level).double()
    expected[3] = expected[10] = 0
    assert torch.equal(masks[0].cpu(), expected)
    compiled = "cuda" if dev == "cuda" else "cpu"
    if compiled in lgd_ops.available_backends():
        cpp = torch.ops.lgd_ops.box_fill(eye.to(dev), boxes.to(dev), batch_idx.to(dev), *image_size, 1, *level,
                                         False)
        assert torch.equal(masks, cpp)
    # box_pool of ones with sums counts the same cells
    counts = ops.box_pool_triton(torch.ones(1, 1, *level, dtype=torch.float64, device=dev), boxes.to(dev),
                                 batch_idx.to(dev), *image_size, False)
    assert torch.equal(counts[:, 0].cpu(), expected.sum(dim=(1, 2)))


def _features(shape, dtype, layout):
    b, c, h, w = shape
    if layout == "channels_last":
        x = torch.randn(b, c, h, w, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = torch.randn(b, c, w, h, dtype=torch.float64).transpose(2, 3)
    elif layout == "sliced":  # every other channel, with a storage offset
        x = torch.randn(b, 2 * c + 1, h, w, dtype=torch.float64)[:, 1::2]
    else:
        x = torch.randn(b, c, h, w, dtype=torch.float64)
    return x.to(device=DEVICE, dtype=dtype)


# every case x dtype, except "large" (the slowest under the interpreter) in fp64 and bf16 only
CASE_DTYPES = pytest.mark.parametrize("case,dtype", [
    pytest.param(case, dtype, id=f"{case}-{DTYPE_IDS[dtype]}") for case in CASES for dtype in DTYPES
    if case != "large" or dtype in (torch.float64, torch.bfloat16)])


@needs_kernels
@CASE_DTYPES
def test_box_pool(case, dtype):
    boxes, batch_idx, b, c, image_size, (h, w) = _case(case, DEVICE)
    boxes = boxes.to(_box_dtype(dtype))
    layout = {"mixed": "channels_last", "upsampled": "transposed", "large": "sliced"}.get(case, "contiguous")
    feats = _features((b, c, h, w), dtype, layout).requires_grad_()
    out = lgd_ops.box_pool(feats, boxes, batch_idx, image_size, backend="triton")
    ref_feats = feats.detach().cpu().double().requires_grad_()
    ref = lgd_ops.box_pool(ref_feats, boxes.cpu(), batch_idx.cpu(), image_size, backend="reference")
    _assert_close(out, ref, dtype, f"box_pool {case}")
    weight = torch.randn(ref.shape, dtype=torch.float64).to(dtype).double()  # exact in dtype
    (out * weight.to(out)).sum().backward()
    (ref * weight).sum().backward()
    _assert_close(feats.grad, ref_feats.grad, dtype, f"box_pool backward {case}")


@needs_kernels
@CASE_DTYPES
def test_box_fill(case, dtype):
    boxes, batch_idx, b, c, image_size, (h, w) = _case(case, DEVICE)
    boxes = boxes.to(_box_dtype(dtype))
    n = boxes.shape[0]
    emb = torch.randn(c, n, dtype=torch.float64).to(DEVICE, dtype)
    emb = (emb.T if case == "mixed" else emb.T.contiguous()).requires_grad_()  # a transposed view too
    out = lgd_ops.box_fill(emb, boxes, batch_idx, image_size, (b, h, w), backend="triton")
    ref_emb = emb.detach().cpu().double().requires_grad_()
    ref = lgd_ops.box_fill(ref_emb, boxes.cpu(), batch_idx.cpu(), image_size, (b, h, w), backend="reference")
    _assert_close(out, ref, dtype, f"box_fill {case}")
    weight = torch.randn(ref.shape, dtype=torch.float64).to(dtype).double()  # exact in dtype
    (out * weight.to(out)).sum().backward()
    (ref * weight).sum().backward()
    _assert_close(emb.grad, ref_emb.grad, dtype, f"box_fill backward {case}")
    if n:
        assert torch.equal(out, lgd_ops.box_fill(emb, boxes, batch_idx, image_size, (b, h, w), backend="triton"))


@needs_kernels
def test_non_contiguous_boxes_batch_idx_and_stride0_grads():
    boxes, batch_idx, b, c, image_size, (h, w) = _case("mixed", DEVICE)
    boxes_t = boxes.T.contiguous().T  # [N, 4] view of a [4, N] tensor
    idx_strided = torch.stack([batch_idx, batch_idx], dim=1)[:, 1]  # stride 2
    feats = torch.randn(b, c, h, w, dtype=torch.float64, device=DEVICE, requires_grad=True)
    emb = torch.randn(boxes.shape[0], c, dtype=torch.float64, device=DEVICE, requires_grad=True)
    pooled = lgd_ops.box_pool(feats, boxes_t, idx_strided, image_size, backend="triton")
    filled = lgd_ops.box_fill(emb, boxes_t, idx_strided, image_size, (b, h, w), backend="triton")
    (pooled.sum() + filled.sum()).backward()  # expanded (stride-0) upstream gradients
    ref_feats = feats.detach().cpu().requires_grad_()
    ref_emb = emb.detach().cpu().requires_grad_()
    ref_pooled = lgd_ops.box_pool(ref_feats, boxes.cpu(), batch_idx.cpu(), image_size, backend="reference")
    ref_filled = lgd_ops.box_fill(ref_emb, boxes.cpu(), batch_idx.cpu(), image_size, (b, h, w), backend="reference")
    (ref_pooled.sum() + ref_filled.sum()).backward()
    for got, want, what in [(pooled, ref_pooled, "box_pool"), (filled, ref_filled, "box_fill"),
                            (feats.grad, ref_feats.grad, "box_pool grad"), (emb.grad, ref_emb.grad, "box_fill grad")]:
        _assert_close(got, want, torch.float64, what)


@needs_kernels
def test_box_ops_average_backward_is_box_fill_average():
    """box_pool's backward (box_fill_triton with average=True) and box_fill's (box_pool_triton with sums)."""
    ops = _ops()
    boxes, batch_idx, b, c, image_size, (h, w) = _case("mixed", DEVICE)
    vals = torch.randn(boxes.shape[0], c, dtype=torch.float64, device=DEVICE)
    got = ops.box_fill_triton(vals, boxes, batch_idx, *image_size, b, h, w, True)
    reference_box_fill = importlib.import_module("lgd_ops.box_fill").reference_box_fill
    ref = reference_box_fill(vals.cpu(), boxes.cpu(), batch_idx.cpu(), image_size, (b, h, w), average=True)
    _assert_close(got, ref, torch.float64, "box_fill average")


@needs_kernels
def test_box_sweeps_refuse_more_images_than_the_grid_has_rows():
    """The image is the sweeps' second grid dimension, at most 65535 on CUDA: both ops refuse more, before any
    launch."""
    ops = _ops()
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0]], dtype=torch.float64, device=DEVICE)
    batch_idx = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(RuntimeError, match="at most 65535 images per call, got 65536"):
        ops.box_pool_triton(torch.zeros(65536, 1, 1, 1, device=DEVICE), boxes, batch_idx, 4, 4, True)
    with pytest.raises(RuntimeError, match="at most 65535 images per call, got 65536"):
        ops.box_fill_triton(torch.ones(1, 1, device=DEVICE), boxes, batch_idx, 4, 4, 65536, 1, 1, False)


@needs_kernels
@pytest.mark.parametrize("kernel", ["triton", "cuda"])
def test_box_pool_without_images(kernel):
    """Boxes but no image (B = 0) on a map large enough for the sweeps: zero rows (no box covers anything)
    and no launch of a grid without rows."""
    if kernel == "cuda" and DEVICE != "cuda":
        pytest.skip("the raw CUDA op needs a GPU")
    op = _ops().box_pool_triton if kernel == "triton" else torch.ops.lgd_ops.box_pool
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 3, dtype=torch.float32, device=DEVICE)
    out = op(torch.ones(0, 4, 16, 16, device=DEVICE), boxes, torch.zeros(3, dtype=torch.int64, device=DEVICE), 32, 32,
             True)
    assert torch.equal(out.cpu(), torch.zeros(3, 4))


@needs_kernels
@pytest.mark.parametrize("h,w,stride_h,stride_w", [(3, 2, 2**30 + 3, 1), (2, 3, 1, 2**30 + 3)], ids=["rows", "columns"])
def test_box_pool_row_offsets_past_int32(h, w, stride_h, stride_w):
    """A map whose row (or column) stride times the row (column) index passes 2**31 elements (a view of a 4 GiB
    buffer that is never written outside the view's cells): the sweep's offsets are int64, so the sums are right."""
    buf = torch.empty(stride_h * (h - 1) + stride_w * (w - 1) + 1, dtype=torch.bfloat16, device=DEVICE)  # lazy
    feats = buf.as_strided((1, 1, h, w), (buf.numel(), buf.numel(), stride_h, stride_w))
    values = torch.arange(1.0, h * w + 1, dtype=torch.bfloat16).reshape(h, w)
    for j in range(h):
        feats[0, 0, j] = values[j].to(DEVICE)
    boxes = torch.tensor([[0.0, 0.0, w, h], [w / 2, h / 2, w, h]], dtype=torch.float32, device=DEVICE)
    batch_idx = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    out = _ops().box_pool_triton(feats, boxes, batch_idx, h, w, False)
    expected = _ops().box_pool_triton(values[None, None].to(DEVICE), boxes, batch_idx, h, w, False)
    assert out[0, 0] == h * w * (h * w + 1) / 2 and torch.equal(out, expected), (out, expected)


@needs_kernels
def test_box_fill_row_offsets_past_int32():
    """The fill kernel writing rows whose offset j * stride_oh passes 2**31 elements (a view of a 4 GiB buffer,
    written only at the view's cells) writes what box_fill_triton writes into an ordinary map."""
    from lgd_ops.triton import box_fill

    h, w, stride_h = 3, 2, 2**30 + 3
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [0.0, 1.0, 1.0, 3.0]], dtype=torch.float32, device=DEVICE)
    batch_idx = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    values = torch.tensor([[1.0], [2.0]], dtype=torch.bfloat16, device=DEVICE)
    want = _ops().box_fill_triton(values, boxes, batch_idx, h, w, 1, h, w, False)
    index = lgd_ops._boxes.level_index(boxes, batch_idx, 1, h, w, h, w)
    out = torch.empty(stride_h * (h - 1) + w, dtype=torch.bfloat16, device=DEVICE)  # no memory until written
    box_fill._box_fill_kernel[(1, 1, 1)](values, index, out, 2, 1, h, w, h, 1, 1, out.numel(), out.numel(), stride_h,
                                         1, AVERAGE=False, ACC_FP64=False, BLOCK_C=1, BLOCK_W=2, BLOCK_E=2)
    got = out.as_strided((1, 1, h, w), (out.numel(), out.numel(), stride_h, 1))
    assert torch.equal(got, want), (got, want)


def _crowded_boxes(gen):
    """300 boxes on a 6 x 9 level of two 48 x 72 images, in random order: 150 sharing y0 (row 2: one event row
    of 150 top events, more than a block holds), 50 reaching the last row (bottom events on row H), 30 only on the
    last row (top events on row H - 1), 30 covering nothing (inverted, or between two cells), 40 anywhere on
    image 1."""
    def rand(n, lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)

    x1 = rand(300, 0.0, 60.0)
    x2 = x1 + rand(300, 0.5, 40.0)
    y1 = torch.cat([torch.full((150,), 16.0), rand(50, 0.0, 40.0), torch.full((30,), 40.0), rand(30, 0.0, 40.0),
                    rand(40, 0.0, 40.0)])
    y2 = torch.cat([rand(150, 17.0, 47.0), torch.full((50,), 48.0), torch.full((30,), 47.0), rand(30, 0.0, 40.0),
                    rand(40, 0.0, 48.0)])
    y2[230:245] = y1[230:245] - 1.0  # inverted
    x1[245:260], x2[245:260] = 1.0, 7.0  # inside cell 0, on none of its centres
    boxes = torch.stack([x1, y1, x2, y2], dim=1)
    batch_idx = torch.cat([torch.zeros(260, dtype=torch.int64), torch.ones(40, dtype=torch.int64)])
    order = torch.randperm(300, generator=gen)
    return boxes[order], batch_idx[order]


@needs_kernels
@pytest.mark.parametrize("dtype,block_events,band_rows",
                         [(torch.float64, 2, 1), (torch.float32, 16, 3), (torch.bfloat16, 2, 6)],
                         ids=["f64-2-1", "f32-16-3", "bf16-2-6"])
@pytest.mark.parametrize("op", ["box_pool", "box_fill"])
def test_crowded_event_rows(op, dtype, block_events, band_rows, monkeypatch):
    """Rows with hundreds of events (blocks of 2 and 16 events), events on the last rows, boxes covering
    nothing, swept in bands of 1, 3 and 6 rows (one band): forward and backward against the float64 reference,
    then a NaN and an inf that stay with the boxes covering them (pool) or in their own box (fill), as in the
    reference."""
    from lgd_ops.triton import _common, box_fill, box_pool

    for module in (box_pool, box_fill):
        monkeypatch.setattr(module, "SWEEP_EVENTS", block_events)
    monkeypatch.setattr(_common, "SWEEP_PROGRAMS", 10**6)  # as many bands as MIN_BAND_ROWS allows
    monkeypatch.setattr(_common, "MIN_BAND_ROWS", band_rows)
    assert _common.sweep_bands(1, 6) == (band_rows, 6 // band_rows)
    boxes, batch_idx = _crowded_boxes(torch.Generator().manual_seed(22))
    image_size, (b, c, h, w) = (48, 72), (2, 3, 6, 9)
    cells, covers = lgd_ops._boxes.box_cells(boxes, batch_idx, b, *image_size, h, w)
    assert (covers & (cells[:, 2] == 2)).sum() >= 150 and (covers & (cells[:, 3] == h - 1)).sum() >= 50
    assert (covers & (cells[:, 2] == h - 1)).sum() >= 30 and (~covers).sum() >= 30
    boxes, batch_idx = boxes.to(DEVICE, _box_dtype(dtype)), batch_idx.to(DEVICE)
    if op == "box_pool":
        x = _features((b, c, h, w), dtype, "contiguous")
        run = lambda x: lgd_ops.box_pool(x, boxes, batch_idx, image_size, backend="triton")  # noqa: E731
        ref = lambda x: lgd_ops.box_pool(x, boxes.cpu(), batch_idx.cpu(), image_size, backend="reference")  # noqa
    else:
        x = torch.randn(300, c, dtype=torch.float64).to(DEVICE, dtype)
        run = lambda x: lgd_ops.box_fill(x, boxes, batch_idx, image_size, (b, h, w), backend="triton")  # noqa
        ref = lambda x: lgd_ops.box_fill(x, boxes.cpu(), batch_idx.cpu(), image_size, (b, h, w),  # noqa: E731
                                         backend="reference")
    x.requires_grad_()
    ref_x = x.detach().cpu().double().requires_grad_()
    out, want = run(x), ref(ref_x)
    _assert_close(out, want, dtype, f"{op}, crowded rows")
    weight = torch.randn(want.shape, dtype=torch.float64).to(dtype).double()  # exact in dtype
    (out * weight.to(out)).sum().backward()
    (want * weight).sum().backward()
    _assert_close(x.grad, ref_x.grad, dtype, f"{op} backward, crowded rows")
    with torch.no_grad():
        if op == "box_pool":
            x[0, 1, 3, 4], x[0, 0, h - 1, w - 1] = float("nan"), float("inf")
        else:
            x[int((covers & (cells[:, 2] == 2)).nonzero()[0]), 1] = float("nan")
            x[int((covers & (cells[:, 2] == h - 1)).nonzero()[0]), 0] = float("inf")
    out, want = run(x.detach()), ref(x.detach().cpu().double())
    assert out.isnan().any() and out.isinf().any()
    assert torch.equal(out.isfinite().cpu(), want.isfinite()) and torch.equal(out.isnan().cpu(), want.isnan())
    finite = want.isfinite()
    _assert_close(out.cpu()[finite], want[finite], dtype, f"{op}, crowded rows, non-finite inputs")
    assert torch.equal(out.cpu()[~finite & ~want.isnan()], want[~finite & ~want.isnan()].to(dtype))


@needs_kernels
def test_sweep_launch_geometry():
    """The box sweeps' grids at B = 2, C = 256 on RetinaNet's P3-P7 and Faster R-CNN's P2-P6 of 800 x 1216 inputs
    (the programs per level in benchmarks/README.md's launch-geometry table): bands bring the large levels to
    about two programs per SM of an H100."""
    import triton

    from lgd_ops.triton import _common

    def programs(levels):
        counts = []
        for h, w in levels:
            block_c, _ = _common.sweep_blocks("sweep", 256, w)
            columns = triton.cdiv(256, block_c) * 2
            counts.append(columns * _common.sweep_bands(columns, h)[1])
        return counts

    assert programs([(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]) == [288, 112, 64, 32, 16]
    assert programs([(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]) == [320, 288, 112, 64, 32]


@needs_kernels
def test_level_index_argument(monkeypatch):
    """A given level index is read, not rebuilt (forward and backward: the adjoint gets it too) and gives the
    results of the index each op builds per call; a wrong one (size, dtype, device, layout) is refused before
    any launch, naming the op and what it expects."""
    from lgd_ops.triton import _common

    ops = _ops()
    boxes, batch_idx, b, c, image_size, (h, w) = _case("mixed", DEVICE)
    feats = torch.randn(b, c, h, w, dtype=torch.float64, device=DEVICE, requires_grad=True)
    emb = torch.randn(boxes.shape[0], c, dtype=torch.float64, device=DEVICE, requires_grad=True)
    index = lgd_ops._boxes.level_index(boxes, batch_idx, b, *image_size, h, w)
    built = []
    build = _common.level_index
    monkeypatch.setattr(_common, "level_index", lambda *args: built.append(args) or build(*args))

    def both(*index):
        pooled = ops.box_pool_triton(feats, boxes, batch_idx, *image_size, True, *index)
        filled = ops.box_fill_triton(emb, boxes, batch_idx, *image_size, b, h, w, False, False, *index)
        grads = torch.autograd.grad((pooled.sum() + filled.square().sum()), (feats, emb))
        return pooled, filled, *grads

    without = both()
    assert len(built) == 4  # each op and each adjoint builds its own
    given = both(index)
    assert len(built) == 4
    for got, want in zip(given, without):
        assert torch.equal(got, want)
    wrong = {
        "size": index[:-1],
        "dtype": index.long(),
        "layout": torch.stack([index, index], dim=1)[:, 0],
        "device": index.to("meta"),
    }
    for what, bad in wrong.items():
        for name, call in [("box_pool_triton", lambda: ops.box_pool_triton(feats, boxes, batch_idx, *image_size, True,
                                                                            bad)),
                           ("box_fill_triton", lambda: ops.box_fill_triton(emb, boxes, batch_idx, *image_size, b, h,
                                                                            w, False, False, bad))]:
            with pytest.raises(RuntimeError, match=f"lgd_ops.{name}: index must be a contiguous int32 level index "
                                                   f"of {index.numel()} entries"):
                call()
    assert len(built) == 4


@needs_kernels
def test_normalized_mse_offsets_past_int32():
    """The kernels (NCHW and channels_last sweeps) on a plane whose element stride times the element index passes
    2**31 (as a channels_last map with C * H * W > 2**31 would, here views of 4 GiB buffers written only at the
    plane's 3 elements) give the stats and gradient of the same plane stored contiguously."""
    from lgd_ops.triton import normalized_mse as nmse

    n, se = 3, 2**30 + 3
    s_small = torch.tensor([1.0, 2.0, 4.0], dtype=torch.bfloat16, device=DEVICE).reshape(1, 1, 1, n)
    t_small = torch.tensor([3.0, 1.0, 2.0], dtype=torch.bfloat16, device=DEVICE).reshape(1, 1, 1, n)
    _, want_stats = _ops().normalized_mse_triton([s_small], [t_small], 1e-5)
    want_grad = _ops().normalized_mse_backward_triton(torch.ones((), device=DEVICE), [s_small], [t_small],
                                                      want_stats)[0].flatten()
    s, t, g = (torch.empty(se * (n - 1) + 1, dtype=torch.bfloat16, device=DEVICE) for _ in range(3))
    s.as_strided((n,), (se,)).copy_(s_small.flatten())
    t.as_strided((n,), (se,)).copy_(t_small.flatten())
    strides = (0, 0, se)  # (sb, sc, se) of one plane
    stats = torch.empty(5, 1, device=DEVICE)
    loss = torch.empty(1, dtype=torch.float64, device=DEVICE)
    eps = torch.full((1,), 1e-5, dtype=torch.float64, device=DEVICE)
    nmse._nmse_forward_kernel[(1,)](s, t, eps, stats, loss, n, 0, 1, 1, *strides, *strides, ACC_FP64=False, BLOCK=4)
    assert torch.equal(stats, want_stats), (stats, want_stats)
    scale = torch.full((1,), 2.0 / n, dtype=torch.float64, device=DEVICE)
    nmse._nmse_backward_kernel[(1, 1)](s, t, g, stats, scale, n, 0, 1, 1, *strides, *strides, *strides,
                                       ACC_FP64=False, BLOCK=4)
    assert torch.equal(g.as_strided((n,), (se,)), want_grad), (g.as_strided((n,), (se,)), want_grad)
    # the channels_last sweeps (one channel, one tile), whose element offset p * se is int64 too
    part = torch.empty(5, 1, dtype=torch.float64, device=DEVICE)
    tiles = {"TILE": 4, "BLOCK_C": 1}
    nmse._nmse_cl_moments_kernel[(1,)](s, t, part, n, 1, 1, 1, 1, 1, *strides, *strides, ACC_FP64=False, BLOCK_P=4,
                                       **tiles)
    cl_stats = torch.empty(5, 1, device=DEVICE)
    nmse._nmse_cl_merge_kernel[(1,)](s, t, part, eps, cl_stats, loss, n, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, ROWS=8,
                                     **tiles)
    torch.testing.assert_close(cl_stats, want_stats, rtol=1e-6, atol=0)
    g.as_strided((n,), (se,)).zero_()
    nmse._nmse_cl_backward_kernel[(1,)](s, t, g, cl_stats, scale, n, 1, 1, 1, 0, 1, *strides, *strides, *strides,
                                        ACC_FP64=False, BLOCK_P=4, **tiles)
    torch.testing.assert_close(g.as_strided((n,), (se,)), want_grad, rtol=1e-2, atol=0)


@needs_kernels
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("op", ["box_pool", "box_fill"])
def test_half_accuracy_full_size(op, dtype, channels_last):
    """tests/test_half_accuracy.py's error bound on a full-size level (200 x 304, a one-cell box at the
    bottom-right). The interpreter casts float to bfloat16 by truncation (a GPU rounds to nearest), so there its
    bfloat16 outputs are allowed a whole ulp of rounding."""
    from test_half_accuracy import check_full_size

    rounding = 1.0 if INTERPRET and dtype == torch.bfloat16 else 0.5
    check_full_size(op, dtype, channels_last, DEVICE, "triton", rounding)


LEVELS = [(2, 3, 6, 5), (2, 3, 3, 2), (2, 3, 1, 1)]  # including 1x1 maps (every plane constant)


def _oracle_nmse(students, teachers, eps=1e-5):
    """docs/method.md §4 in float64 (F.instance_norm, hence the reference backend, refuses 1x1 maps in training)."""
    def norm(x):
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        mean = flat.mean(-1, keepdim=True)
        return (flat - mean) / torch.sqrt(((flat - mean) ** 2).mean(-1, keepdim=True) + eps)

    total = sum(s.numel() for s in students)
    return sum(((norm(s) - norm(t)) ** 2).sum() for s, t in zip(students, teachers)) / total


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_normalized_mse(dtype):
    students = [torch.randn(s, dtype=torch.float64) * 3 + 2 for s in LEVELS]
    teachers = [torch.randn(s, dtype=torch.float64) for s in LEVELS]
    students[0][0, 1] = 4.0  # a constant plane
    teachers[1] = teachers[1].transpose(2, 3).contiguous().transpose(2, 3)  # a non-contiguous level
    students[0] = students[0].contiguous(memory_format=torch.channels_last)  # read in place next to an NCHW teacher
    s = [x.to(DEVICE, dtype).requires_grad_() for x in students]
    t = [x.to(DEVICE, dtype) for x in teachers]
    loss = lgd_ops.normalized_mse(s, t, backend="triton")
    ref_s = [x.detach().cpu().double().requires_grad_() for x in s]
    ref = _oracle_nmse(ref_s, [x.cpu().double() for x in t])
    _assert_close(loss, ref, dtype, "normalized_mse")
    (loss * 3).backward()
    (ref * 3).backward()
    for level, (got, want) in enumerate(zip(s, ref_s)):
        rtol, atol = TOL[dtype]
        scale = float(torch.cat([g.grad.flatten() for g in ref_s]).abs().max())
        torch.testing.assert_close(got.grad.cpu().double(), want.grad, rtol=rtol, atol=atol * scale,
                                   msg=lambda m, level=level: f"normalized_mse backward, level {level}\n{m}")
    assert s[0].grad.is_contiguous(memory_format=torch.channels_last)  # the gradient keeps the student's layout
    single = lgd_ops.normalized_mse(s[0], t[0], backend="triton")
    _assert_close(single, lgd_ops.normalized_mse(ref_s[0], t[0].cpu().double(), backend="reference"), dtype,
                  "normalized_mse, one level, against the reference backend")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_normalized_mse_channels_last_tiles(dtype, monkeypatch):
    """channels_last levels through the tiled sweeps, with tiles of 8 positions (the first level's planes have 13
    tiles, more than MERGE_ROWS, the last one partial; the second 2, the third 1) and 40 channels (a full and a
    partial run of 32), far from zero (moments about the plane's first element), one teacher NCHW: the loss, the
    gradient (channels_last) and the stats against the float64 oracle."""
    from lgd_ops.triton import normalized_mse as nmse

    monkeypatch.setattr(nmse, "CL_TILE", 8)
    monkeypatch.setattr(nmse, "CL_BLOCK_P", 4)
    shapes = [(2, 40, 9, 11), (2, 40, 3, 3), (1, 40, 1, 5)]
    gen = torch.Generator().manual_seed(3)
    students = [torch.randn(x, dtype=torch.float64, generator=gen) * 2 + 50 for x in shapes]
    teachers = [torch.randn(x, dtype=torch.float64, generator=gen) - 20 for x in shapes]
    s = [x.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last).requires_grad_() for x in students]
    t = [x.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last) for x in teachers[:2]]
    t.append(teachers[2].to(DEVICE, dtype))  # NCHW, read in place next to a channels_last student
    ref_s = [x.detach().cpu().double().requires_grad_() for x in s]
    ref_t = [x.cpu().double() for x in t]
    loss, stats = _ops().normalized_mse_triton(s, t, 1e-5)
    ref = _oracle_nmse(ref_s, ref_t)
    _assert_close(loss, ref, dtype, "normalized_mse, channels_last tiles")
    def per_plane(fn, maps):
        return torch.cat([fn(x.detach().reshape(x.shape[0] * x.shape[1], -1)) for x in maps])

    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(stats[0].cpu().double(), per_plane(lambda f: f.mean(1), ref_s), rtol=rtol, atol=0)
    torch.testing.assert_close(stats[1].cpu().double(),
                               per_plane(lambda f: 1 / torch.sqrt(f.var(1, unbiased=False) + 1e-5), ref_s),
                               rtol=rtol if dtype == torch.float64 else 1e-4, atol=0)
    torch.testing.assert_close(stats[2].cpu().double(), per_plane(lambda f: f.mean(1), ref_t), rtol=rtol, atol=0)
    lgd_ops.normalized_mse(s, t, backend="triton").backward()
    ref.backward()
    rtol, atol = TOL[dtype]
    scale = float(torch.cat([g.grad.flatten() for g in ref_s]).abs().max())
    for level, (got, want) in enumerate(zip(s, ref_s)):
        assert got.grad.is_contiguous(memory_format=torch.channels_last), level
        torch.testing.assert_close(got.grad.cpu().double(), want.grad, rtol=rtol, atol=atol * scale,
                                   msg=lambda m, level=level: f"channels_last backward, level {level}\n{m}")


@needs_kernels
def test_normalized_mse_stats_and_teacher_gets_no_grad():
    ops = _ops()
    s = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=DEVICE)
    t = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    _, stats = ops.normalized_mse_triton([s], [t.detach()], 1e-5)
    flat_s, flat_t = s.reshape(6, -1).cpu(), t.detach().reshape(6, -1).cpu()
    assert stats.shape == (5, 6) and stats.dtype == torch.float64
    torch.testing.assert_close(stats[0].cpu(), flat_s.mean(1))
    torch.testing.assert_close(stats[1].cpu(), 1 / torch.sqrt(flat_s.var(1, unbiased=False) + 1e-5))
    torch.testing.assert_close(stats[2].cpu(), flat_t.mean(1))
    loss = lgd_ops.normalized_mse(s.requires_grad_(), t, backend="triton")
    loss.backward()
    assert t.grad is None and s.grad is not None
    _, stats16 = ops.normalized_mse_triton([s.detach().half()], [t.detach().half()], 1e-5)
    assert stats16.dtype == torch.float32


@needs_kernels
def test_opcheck():
    """opcheck's schema and autograd-registration tests. Its fake-tensor and aot_dispatch tests trace the
    triton_op bodies; under TRITON_INTERPRET=1 torch.library.wrap_triton hands back the raw interpreted
    kernel (torch/_library/triton.py), so tracing would run the interpreter on fake tensors: those two run only
    with JIT kernels (here on a GPU; without one, test_tracing_in_jit_child covers the tracing)."""
    ops = _ops()
    boxes, batch_idx, b, c, image_size, (h, w) = _case("mixed", DEVICE)
    feats = torch.randn(b, c, h, w, dtype=torch.float64, device=DEVICE, requires_grad=True)
    emb = torch.randn(boxes.shape[0], c, dtype=torch.float64, device=DEVICE, requires_grad=True)
    s = [torch.randn(2, 3, 4, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)]
    t = [torch.randn(2, 3, 4, 5, dtype=torch.float64, device=DEVICE)]
    utils = ("test_schema", "test_autograd_registration") if INTERPRET else torch.library._OPCHECK_DEFAULT_UTILS
    for op, args in [
        (ops.box_pool_triton, (feats, boxes, batch_idx, *image_size, True)),
        (ops.box_fill_triton, (emb, boxes, batch_idx, *image_size, b, h, w, False)),
        (ops.normalized_mse_triton, (s, t, 1e-5)),
    ]:
        torch.library.opcheck(op, args, test_utils=utils)


# ---------------------------------------------------------------------------------------------
# Tracing with JIT kernels, no launch (jit child, or in process on a GPU)
# ---------------------------------------------------------------------------------------------

class _H100Target:
    """A stand-in Triton driver: TTIR generation needs only the target, not a GPU."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


@pytest.fixture
def triton_target():
    if GPU:
        yield
        return
    from triton.runtime import driver

    previous = driver._active  # reset_active() would build the default driver, which fails without a GPU
    driver.set_active(_H100Target())
    try:
        yield
    finally:
        driver._active = previous


def _traced_inputs():
    boxes, batch_idx, *_ = _case("mixed", "cpu")
    s = torch.randn(2, 3, 8, 10, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 8, 10, dtype=torch.float64)
    emb = torch.randn(boxes.shape[0], 3, dtype=torch.float64, requires_grad=True)
    return s, emb, t, boxes, batch_idx


def _all_ops(s, emb, t, boxes, batch_idx):
    ops = _ops()
    loss, _ = ops.normalized_mse_triton([s], [t], 1e-5)
    pooled = ops.box_pool_triton(s, boxes, batch_idx, 64, 80, True)
    filled = ops.box_fill_triton(emb, boxes, batch_idx, 64, 80, 2, 8, 10, False)
    return (loss + pooled.sum() + filled.sum(),)


@needs_tracing
def test_fake_tensors_and_symbolic_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    ops = _ops()
    s, emb, t, boxes, batch_idx = _traced_inputs()
    with FakeTensorMode() as mode:
        fs, femb, ft, fb, fi = (mode.from_tensor(x) for x in (s, emb, t, boxes, batch_idx))
        loss, stats = ops.normalized_mse_triton([fs], [ft], 1e-5)
        assert loss.shape == () and stats.shape == (5, 6) and stats.dtype == torch.float64
        (grad,) = ops.normalized_mse_backward_triton(loss, [fs], [ft], stats)
        assert grad.shape == fs.shape
        assert ops.box_pool_triton(fs, fb, fi, 64, 80, True).shape == (boxes.shape[0], 3)
        assert ops.box_fill_triton(femb.half(), fb, fi, 64, 80, 2, 8, 10, True).dtype == torch.float16
    graph = make_fx(_all_ops, tracing_mode="symbolic")(s, emb, t, boxes, batch_idx)
    names = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert {"lgd_ops.normalized_mse_triton.default", "lgd_ops.box_pool_triton.default",
            "lgd_ops.box_fill_triton.default"} <= set(names)


@needs_tracing
def test_aot_decomposes_into_triton_kernels(triton_target):
    """What torch.compile sees: under AOT autograd each op (and each backward) is a triton kernel call, and
    torch's TTIR analysis finds that the kernels write only their outputs (no defensive clones)."""
    from torch._functorch.aot_autograd import aot_export_joint_simple
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    graph = aot_export_joint_simple(_all_ops, _traced_inputs(), trace_joint=True)
    kernels = [n for n in graph.graph.nodes if n.op == "call_function"
               and n.target is tkw.triton_kernel_wrapper_functional]
    assert len(kernels) == 8  # 4 forward (box_pool: the band sweep and the bands' sum), 4 backward
    assert not any("lgd_ops" in str(n.target) for n in graph.graph.nodes)
    for node in kernels:
        # written: the outputs, and box_pool's [bands, N, C] scratch of the boxes' sums over each band
        assert set(node.kwargs["tensors_to_clone"]) <= {"out_ptr", "stats_ptr", "loss_ptr", "g_ptr",
                                                        "part_ptr"}, node.kwargs


# normalized_mse's channel count and (sb, sc, se) strides of the student and the teacher
NMSE_STRIDES = {name: "i32" for name in ("C", "s_sb", "s_sc", "s_se", "t_sb", "t_sc", "t_se")}


def _signatures():
    """(kernel, signature, constexprs) covering each kernel in fp64, fp32 and bf16, with and without averaging."""
    from lgd_ops.triton import box_fill, box_pool, normalized_mse

    for ptr, avg in (("*fp64", True), ("*fp32", False), ("*bf16", False)):
        fp64 = ptr == "*fp64"
        sweep64 = ptr != "*bf16"  # the box sweeps accumulate fp32 maps in fp64 too
        blocks = {"ACC_FP64": sweep64, "BLOCK_C": 8, "BLOCK_W": 64, "BLOCK_E": 16}
        part = "*fp64" if sweep64 else "*fp32"
        yield box_pool._box_pool_kernel, {
            "feat_ptr": ptr, "index_ptr": "*i32", "part_ptr": part, "N": "i32", "C": "i32", "H": "i32", "W": "i32",
            "band_rows": "i32", "stride_b": "i32", "stride_c": "i32", "stride_h": "i32", "stride_w": "i32"}, blocks
        yield box_pool._box_pool_finish_kernel, {
            "index_ptr": "*i32", "part_ptr": part, "out_ptr": ptr, "N": "i32", "C": "i32", "band_rows": "i32"}, {
            "AVERAGE": avg, "ACC_FP64": sweep64, "BLOCK_N": 16, "BLOCK_C": 64}
        blocks["AVERAGE"] = avg
        yield box_fill._box_fill_kernel, {
            "values_ptr": ptr, "index_ptr": "*i32", "out_ptr": ptr, "N": "i32", "C": "i32", "H": "i32", "W": "i32",
            "band_rows": "i32", "stride_vn": "i32",
            "stride_vc": "constexpr", "stride_ob": "i32", "stride_oc": "i32", "stride_oh": "i32",
            "stride_ow": "i32"}, dict(blocks, stride_vc=1)
        stats = "*fp64" if fp64 else "*fp32"
        yield normalized_mse._nmse_forward_kernel, {
            "s_ptr": ptr, "t_ptr": ptr, "eps_ptr": "*fp64", "stats_ptr": stats, "loss_ptr": "*fp64", "n": "i32",
            "first": "i32", "planes": "i32", **NMSE_STRIDES}, {"ACC_FP64": fp64, "BLOCK": 1024}
        yield normalized_mse._nmse_backward_kernel, {
            "s_ptr": ptr, "t_ptr": ptr, "g_ptr": ptr, "stats_ptr": stats, "scale_ptr": "*fp64", "n": "i32",
            "first": "i32", "planes": "i32", **NMSE_STRIDES, "g_sb": "i32", "g_sc": "i32", "g_se": "i32"}, {
            "ACC_FP64": fp64, "BLOCK": 1024}
        tiles = {"TILE": normalized_mse.CL_TILE, "BLOCK_P": normalized_mse.CL_BLOCK_P,
                 "BLOCK_C": normalized_mse.CL_BLOCK_C}
        sizes = {name: "i32" for name in ("n", "C", "tiles", "runs")}
        yield normalized_mse._nmse_cl_moments_kernel, {
            "s_ptr": ptr, "t_ptr": ptr, "part_ptr": "*fp64", **sizes, "planes": "i32", "parts": "i32",
            **{k: v for k, v in NMSE_STRIDES.items() if k != "C"}}, {"ACC_FP64": fp64, **tiles}
        yield normalized_mse._nmse_cl_merge_kernel, {
            "s_ptr": ptr, "t_ptr": ptr, "part_ptr": "*fp64", "eps_ptr": "*fp64", "stats_ptr": stats,
            "loss_ptr": "*fp64", **sizes, "planes": "i32", "parts": "i32", "first": "i32", "planes_total": "i32",
            "s_sb": "i32", "s_sc": "i32", "t_sb": "i32", "t_sc": "i32"}, {
            "TILE": normalized_mse.CL_TILE, "ROWS": normalized_mse.MERGE_ROWS, "BLOCK_C": normalized_mse.CL_BLOCK_C}
        yield normalized_mse._nmse_cl_backward_kernel, {
            "s_ptr": ptr, "t_ptr": ptr, "g_ptr": ptr, "stats_ptr": stats, "scale_ptr": "*fp64", **sizes,
            "first": "i32", "planes_total": "i32", **{k: v for k, v in NMSE_STRIDES.items() if k != "C"},
            "g_sb": "i32", "g_sc": "i32", "g_se": "i32"}, {"ACC_FP64": fp64, **tiles}
    # 1x1 maps and a single plane: Triton turns int arguments equal to 1 into constants
    yield normalized_mse._nmse_forward_kernel, {
        "s_ptr": "*fp16", "t_ptr": "*fp16", "eps_ptr": "*fp64", "stats_ptr": "*fp32", "loss_ptr": "*fp64",
        "n": "constexpr", "first": "constexpr", "planes": "constexpr", **NMSE_STRIDES}, {
        "n": 1, "first": 0, "planes": 1, "ACC_FP64": False, "BLOCK": 1024}


@needs_tracing
def test_kernels_compile_for_sm90():
    """The kernels through Triton's real compiler (TTIR to cubin, ptxas included) for an H100, no GPU needed:
    the interpreter accepts some constructs the compiler rejects."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for kernel, signature, constexprs in _signatures():
        signature = dict(signature, **{name: "constexpr" for name in constexprs})
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], kernel


# ---------------------------------------------------------------------------------------------
# Parent process: backend selection, and the children
# ---------------------------------------------------------------------------------------------

@parent_only
def test_auto_never_picks_triton_on_cpu(monkeypatch):
    monkeypatch.delenv("LGD_OPS_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_load_triton_ops", lambda: None)  # keep lgd_ops.triton out of this process
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    has_cpu = "cpu" in lgd_ops.available_backends()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if HAS_TRITON:
        assert "triton" in lgd_ops.available_backends()
        assert _backend.resolve("triton", cpu) == "triton"  # explicit, under the interpreter
    assert _backend.resolve("auto", cpu) == ("cpu" if has_cpu else "reference")
    for names in (["reference", "triton"], ["reference", "cpu", "triton"], ["reference", "cpu", "cuda", "triton"]):
        monkeypatch.setattr(_backend, "available_backends", lambda names=names: names)
        assert _backend.resolve("auto", cpu) == ("cpu" if "cpu" in names else "reference")
        assert _backend.resolve("auto", cuda) == ("cuda" if "cuda" in names else "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="backend 'triton' cannot run tensors on device cpu"):
        _backend.resolve("triton", cpu)


@parent_only
def test_triton_unavailable_without_gpu_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if GPU:
        pytest.skip("a GPU is present")
    assert "triton" not in lgd_ops.available_backends()
    with pytest.raises(ValueError, match="backend 'triton' is not available .*needs a GPU, or TRITON_INTERPRET=1"):
        lgd_ops.box_pool(torch.zeros(1, 1, 2, 2), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), (4, 4),
                         backend="triton")


def _run_child(mode, minimum_passed):
    env = dict(os.environ, LGD_OPS_TRITON_CHILD=mode)
    if mode == "interpret":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    passed = re.search(r"(\d+) passed", out)
    assert proc.returncode == 0 and passed and int(passed.group(1)) >= minimum_passed, out[-6000:]


@parent_only
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(INTERPRET, reason="TRITON_INTERPRET=1 here: the kernel tests ran in this process")
def test_kernels_in_interpreter_child():
    _run_child("interpret", minimum_passed=50)


@parent_only
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(GPU and not INTERPRET, reason="a GPU is present: the tracing tests ran in this process")
def test_tracing_in_jit_child():
    _run_child("jit", minimum_passed=3)
