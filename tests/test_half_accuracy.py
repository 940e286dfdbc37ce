"""Half and bfloat16 accuracy of the fused box ops on a full-size level, against float64.

The other tests' maps are at most 40 cells wide; here the level is a Faster R-CNN P2 level of an 800 x 1216 input
(200 x 304 cells), the maps are positive (|N(0, 1)| + 1, so no sign cancellation keeps the sweeps' running sums
small: they reach ~1e5 at the bottom-right corner) and the boxes include a one-cell box at the bottom-right, whose
pooled value a row sweep forms as a difference of its largest prefix sums. Every output must lie within

    its own rounding (half an ulp of the exact value in the output dtype) + K * u * P

with u the unit roundoff of the accumulator (float for half maps: 2^-24) and P the magnitude the accumulator holds
while the output is formed: box_pool, the sum of |x| over the box's prefix region (rows <= y1, columns <= x1)
over the box's cell count (the op averages); box_fill, the sum of |v| over the image's boxes (the op adds the
boxes' values up). A prefix difference carries a few roundings at magnitude P, hence K = 4 (the Triton sweep's
one-cell box comes closest, at about one u * P); a half or bfloat16 accumulator, or partial sums stored in the
map's dtype, miss the bound by orders of magnitude.
The CPU kernels run here; the Triton kernels run under the interpreter from tests/test_triton.py
(test_half_accuracy_full_size), with full_size_errors below.
"""
import pytest
import torch

import lgd_ops

LEVEL = (200, 304)
IMAGE = (800, 1216)
K = 4
# (x1, y1, x2, y2) in input pixels: one cell at the bottom-right, 2 x 2 cells there, the whole image, a large box,
# the last column of cells
BOXES = [[1212.0, 796.0, 1216.0, 800.0], [1208.0, 792.0, 1216.0, 800.0], [0.0, 0.0, 1216.0, 800.0],
         [100.0, 200.0, 900.0, 700.0], [1212.0, 0.0, 1216.0, 800.0]]
CHANNELS = 2


def _cells(boxes):
    """(x0, x1, y0, y1) cell ranges of the boxes on LEVEL, inclusive (the ops' own arithmetic)."""
    from lgd_ops._boxes import box_cells

    cells, covers = box_cells(boxes, torch.zeros(len(boxes), dtype=torch.int64), 1, *IMAGE, *LEVEL)
    assert bool(covers.all())
    return cells.tolist()


def full_size_errors(op, dtype, channels_last, device, backend, rounding=0.5):
    """(|output - float64 reference|, bound) of `op` ("box_pool" or "box_fill") in `dtype` on the full-size level,
    both [N, C] (box_pool) or [1, C, H, W] (box_fill), float64 on the CPU. rounding: the output's rounding error
    in ulps (half an ulp when the cast rounds to nearest)."""
    g = torch.Generator().manual_seed(0)
    h, w = LEVEL
    boxes = torch.tensor(BOXES, dtype=torch.float64)
    batch_idx = torch.zeros(len(BOXES), dtype=torch.int64)
    cells = _cells(boxes)
    counts = torch.tensor([(x1 - x0 + 1) * (y1 - y0 + 1) for x0, x1, y0, y1 in cells], dtype=torch.float64)
    eps = torch.finfo(dtype).eps  # an ulp at 1: an ulp of a normal r is at most eps * |r|
    u = 2.0 ** -24
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if op == "box_pool":
        x = (torch.randn(1, CHANNELS, h, w, generator=g, dtype=torch.float64).abs() + 1).to(dtype)
        exact = lgd_ops.box_pool(x.double(), boxes, batch_idx, IMAGE, backend="reference")
        got = lgd_ops.box_pool(x.to(device).contiguous(memory_format=fmt), boxes.to(device, torch.float32),
                               batch_idx.to(device), IMAGE, backend=backend)
        mag = x.double().abs()[0]
        prefix = torch.stack([mag[:, : y1 + 1, : x1 + 1].sum(dim=(1, 2)) for _, x1, _, y1 in cells])  # [N, C]
        magnitude = prefix / counts[:, None]
    else:
        v = torch.randn(len(BOXES), CHANNELS, generator=g, dtype=torch.float64).to(dtype)
        exact = lgd_ops.box_fill(v.double(), boxes, batch_idx, IMAGE, (1, h, w), backend="reference")
        got = lgd_ops.box_fill(v.to(device), boxes.to(device, torch.float32), batch_idx.to(device), IMAGE, (1, h, w),
                               memory_format=fmt, backend=backend)
        magnitude = v.double().abs().sum(dim=0)[None, :, None, None]
    assert got.dtype == dtype
    bound = rounding * eps * exact.abs() + K * u * magnitude
    return (got.cpu().double() - exact).abs(), bound


def check_full_size(op, dtype, channels_last, device, backend, rounding=0.5):
    err, bound = full_size_errors(op, dtype, channels_last, device, backend, rounding)
    worst = float((err / bound).max())
    assert worst <= 1, (f"{backend} {op} {dtype} channels_last={channels_last}: error up to {worst:.2f}x the bound "
                        f"(max error {float(err.max()):.3g})")
    return worst


@pytest.mark.skipif("cpu" not in lgd_ops.available_backends(), reason="the C++ CPU kernels are not built")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("op", ["box_pool", "box_fill"])
def test_cpu_full_size(op, dtype, channels_last):
    check_full_size(op, dtype, channels_last, "cpu", "cpu")
