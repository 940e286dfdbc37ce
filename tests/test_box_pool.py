"""box_pool (docs/method.md §1-2): every backend against the float64 loop oracle, forward and backward.

The tests box_pool shares with box_fill run from tests/box_op_base.py through TestBoxPool's hooks; this file
adds what is box_pool's own: hand-computed cells, the level-over-input ratio, non-finite feature cells, empty
maps."""
import pytest
import torch

import lgd_ops
from box_op_base import BoxOpTests
from conftest import (
    box_case,
    DEVICE_BACKEND,
    KERNELS,
    make_features,
    oracle_box_pool,
    random_batch_idx,
    random_boxes,
)


class TestBoxPool(BoxOpTests):
    op = "box_pool"
    MEMORY_LAYOUTS = ("channels_last", "transposed", "sliced")
    MEMORY_LAYOUT_DTYPES = (torch.float32, torch.float16)
    RAW_OP_CASES = ("mixed", "grid_odd", "empty_image", "no_boxes", "map_1x1")

    def make_input(self, b, c, level, n, dtype, device, layout="contiguous", requires_grad=False):
        return make_features((b, c, *level), dtype, device, layout=layout, requires_grad=requires_grad)

    def call(self, x, boxes, batch_idx, image_size, b, level, layout="contiguous", backend="auto", **kw):
        return lgd_ops.box_pool(x, boxes, batch_idx, image_size, backend=backend, **kw)

    def raw_args(self, x, boxes, batch_idx, image_size, b, level, average, layout="contiguous"):
        return (*image_size, average)

    def oracle(self, x, boxes, batch_idx, image_size, b, level, average=None):
        return oracle_box_pool(x, boxes, batch_idx, image_size, average=True if average is None else average)

    def in_shape(self, b, c, level, n):
        return (b, c, *level)

    def out_shape(self, b, c, level, n):
        return (n, c)

    def poison(self, x, batch_idx, channels):
        x[0, channels[0], 2, 3] = float("nan")
        x[0, channels[1], 4, 4] = float("inf")

    def map_of(self, x, out):
        return x

    def permute(self, x, out, perm):
        return x, out[perm]

    def poison_image(self, x, batch_idx, image):
        poisoned = x.clone()
        poisoned[image] = float("nan")
        return poisoned

    def part_of_image(self, out, batch_idx, image):
        return out[batch_idx == image]



# ---------------------------------------------------------------------------------------------
# Hand-computed cells: the inclusive rule x1*r <= i <= x2*r, clamping, degenerate boxes
# ---------------------------------------------------------------------------------------------

# image 16x16, level 4x4 (r = 0.25): box -> (first col, last col, first row, last row) or None (covers nothing)
EXACT_CELLS = [
    ((4.0, 4.0, 12.0, 12.0), (1, 3, 1, 3)),  # both ends on grid lines: inclusive on both sides
    ((4.0001, 4.0, 12.0, 12.0), (2, 3, 1, 3)),  # just past a grid line: that column is out
    ((4.0, 4.0, 11.9999, 12.0), (1, 2, 1, 3)),
    ((4.0, 3.9999, 12.0, 12.0001), (1, 3, 1, 3)),
    ((0.0, 0.0, 16.0, 16.0), (0, 3, 0, 3)),  # clamped to 15: 15 * 0.25 = 3.75
    ((-50.0, -3.0, 100.0, 7.0), (0, 3, 0, 1)),  # past the edges
    ((4.0, 4.0, 5.0, 12.0), (1, 1, 1, 3)),  # one column
    ((1.0, 1.0, 3.0, 3.0), None),  # 0.25 .. 0.75: no integer inside (small box, coarse level)
    ((4.0, 4.0, 4.0, 12.0), None),  # x2 == x1
    ((8.0, 4.0, 4.0, 12.0), None),  # x2 < x1
    ((4.0, 12.0, 8.0, 12.0), None),  # y2 == y1
    ((15.0, 0.0, 20.0, 16.0), None),  # clamps to x1 == x2 == 15
    ((-10.0, 0.0, -1.0, 16.0), None),  # wholly left of the image: clamps to 0, 0
    ((12.0, 12.0, 15.0, 15.0), (3, 3, 3, 3)),  # the last cell: 3 <= i <= 3.75
]


@DEVICE_BACKEND
@pytest.mark.parametrize("box,cells", EXACT_CELLS, ids=[str(b) for b, _ in EXACT_CELLS])
def test_exact_cells(device, backend, box, cells):
    features = torch.arange(2 * 16, dtype=torch.float64, device=device).reshape(1, 2, 4, 4) ** 1.5
    boxes = torch.tensor([box], dtype=torch.float64, device=device)
    batch_idx = torch.zeros(1, dtype=torch.int64, device=device)
    got = lgd_ops.box_pool(features, boxes, batch_idx, (16, 16), backend=backend)
    if cells is None:
        expected = torch.zeros(1, 2, dtype=torch.float64)
    else:
        x0, x1, y0, y1 = cells
        expected = features[:, :, y0 : y1 + 1, x0 : x1 + 1].mean(dim=(2, 3)).cpu()
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-12, atol=1e-12)
    # the oracle agrees with the table, so the random tests below rest on the same rule
    torch.testing.assert_close(oracle_box_pool(features, boxes, batch_idx, (16, 16)), expected)


@DEVICE_BACKEND
def test_ratio_is_level_over_input_not_stride(device, backend):
    """r = W_l / W_in (here 7 / 100, not 1/stride): x1 = 43 -> 3.01, so column 3 is out; x2 = 71.5 -> 5.005."""
    features = torch.randn(1, 1, 7, 7, dtype=torch.float64, device=device)
    boxes = torch.tensor([[43.0, 0.0, 71.5, 99.0]], dtype=torch.float64, device=device)
    got = lgd_ops.box_pool(features, boxes, torch.zeros(1, dtype=torch.int64, device=device), (100, 100),
                           backend=backend)
    torch.testing.assert_close(got, features[:, :, 0:7, 4:6].mean(dim=(2, 3)))


NON_FINITE_CELLS = {  # (row, column) of image 0, channel 1 -> value, on the 8 x 10 level of case "mixed"
    "nan": {(0, 3): float("nan")},
    "inf": {(0, 3): float("inf")},
    "inf_and_neg_inf": {(3, 4): float("inf"), (4, 4): -float("inf")},
}


@DEVICE_BACKEND
@pytest.mark.parametrize("values", list(NON_FINITE_CELLS))
def test_non_finite_cell_reaches_only_boxes_covering_it(device, backend, values):
    """A NaN or inf feature cell reaches only the boxes covering it, as in the oracle: not the image's other
    boxes (a dense matmul: 0 * NaN = NaN), nor those below it in its columns (running column sums: NaN - NaN);
    a box covering a +inf and a -inf cell gets NaN."""
    boxes, batch_idx, b, c, image_size, level = box_case("mixed")
    features = make_features((b, c, *level), torch.float32, device)
    for (j, i), value in NON_FINITE_CELLS[values].items():
        features[0, 1, j, i] = value
    got = lgd_ops.box_pool(features, boxes.to(device), batch_idx.to(device), image_size, backend=backend)
    expected = oracle_box_pool(features, boxes, batch_idx, image_size)
    finite = expected.isfinite()
    image0 = batch_idx == 0
    assert not finite[image0, 1].all() and finite[image0, 1].any() and finite[:, [0, 2]].all() and finite[~image0].all()
    assert expected.isnan().any() == (values != "inf")
    BoxOpTests.assert_non_finite_close(got, expected)


@DEVICE_BACKEND
@pytest.mark.parametrize("shape", [(2, 3, 0, 5), (2, 3, 4, 0), (2, 0, 4, 5), (0, 3, 4, 5)])
def test_empty_feature_map_gives_zero_rows(device, backend, shape):
    """A box covering no cell gives a zero vector (docs/method.md §2); on an empty map every box covers none."""
    n = 0 if shape[0] == 0 else 4
    boxes = random_boxes(n, (32, 32), (4, 5), kinds=("normal",)).to(device)
    batch_idx = torch.zeros(n, dtype=torch.int64, device=device)
    got = lgd_ops.box_pool(torch.randn(shape, device=device), boxes, batch_idx, (32, 32), backend=backend)
    assert got.shape == (n, shape[1])
    assert not got.any()


@KERNELS
def test_in_place_edit_of_boxes_between_calls_is_seen(device, backend):
    """The compiled kernels keep nothing of the boxes between calls (their plans are built per call, no cache keyed
    on the tensors): after an in-place edit of the boxes or batch_idx, forward and backward follow the edited
    values, as the reference does."""
    boxes, batch_idx, b, c, image_size, level = box_case("mixed")
    boxes, batch_idx = boxes.to(device), batch_idx.to(device)
    features = make_features((b, c, *level), torch.float64, device, requires_grad=True)

    def run(name):
        out = lgd_ops.box_pool(features, boxes, batch_idx, image_size, backend=name)
        (grad,) = torch.autograd.grad((out * out).sum(), features)
        return out, grad

    first = run(backend)
    torch.testing.assert_close(first, run("reference"))
    with torch.no_grad():
        boxes.copy_(random_boxes(len(boxes), image_size, level))
        batch_idx.copy_(random_batch_idx(len(batch_idx), b))
    edited = run(backend)
    torch.testing.assert_close(edited, run("reference"))
    assert not torch.allclose(edited[0], first[0])
