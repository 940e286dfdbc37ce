"""box_fill (docs/method.md §1, §3): every backend against the float64 loop oracle, forward and backward.

The tests box_fill shares with box_pool run from tests/box_op_base.py through TestBoxFill's hooks; this file
adds what is box_fill's own: a hand-computed map with overlaps, the adjoint identity with sum pooling, non-finite
embeddings."""
import pytest
import torch

import lgd_ops
from box_op_base import BoxOpTests, MEMORY_FORMAT
from conftest import (
    box_case,
    DEVICE_BACKEND,
    oracle_box_fill,
    oracle_box_pool,
    oracle_masks,
)


class TestBoxFill(BoxOpTests):
    op = "box_fill"
    MEMORY_LAYOUTS = ("transposed", "sliced")
    MEMORY_LAYOUT_DTYPES = (torch.float32, torch.bfloat16)
    RAW_OP_CASES = ("mixed", "grid_pow2", "empty_image", "no_boxes", "map_1x1")

    @staticmethod
    def embeddings(n, c, dtype, device, layout="contiguous", requires_grad=False):
        """[N, C] embeddings: contiguous, transposed (a view of a [C, N] tensor) or sliced (every other column,
        with a storage offset); channels_last (a layout of fill's output) gives contiguous ones."""
        if layout in ("contiguous", "channels_last"):
            e = torch.randn(n, c, dtype=torch.float64).to(device=device, dtype=dtype)
        elif layout == "transposed":
            e = torch.randn(c, n, dtype=torch.float64).to(device=device, dtype=dtype).T
        elif layout == "sliced":
            e = torch.randn(n, 2 * c + 1, dtype=torch.float64).to(device=device, dtype=dtype)[:, 1::2]
        else:
            raise ValueError(layout)
        return e.requires_grad_(requires_grad)

    def make_input(self, b, c, level, n, dtype, device, layout="contiguous", requires_grad=False):
        return self.embeddings(n, c, dtype, device, layout, requires_grad)

    def call(self, x, boxes, batch_idx, image_size, b, level, layout="contiguous", backend="auto", **kw):
        return lgd_ops.box_fill(x, boxes, batch_idx, image_size, (b, *level), memory_format=MEMORY_FORMAT[layout],
                                backend=backend, **kw)

    def raw_args(self, x, boxes, batch_idx, image_size, b, level, average, layout="contiguous"):
        return (*image_size, b, *level, average, layout == "channels_last")

    def oracle(self, x, boxes, batch_idx, image_size, b, level, average=None):
        return oracle_box_fill(x, boxes, batch_idx, image_size, (b, *level), average=bool(average))

    def in_shape(self, b, c, level, n):
        return (n, c)

    def out_shape(self, b, c, level, n):
        return (b, c, *level)

    def poison(self, x, batch_idx, channels):
        first, second = (batch_idx == 0).nonzero()[:2, 0].tolist()
        x[first, channels[0]] = float("nan")
        x[second, channels[1]] = float("inf")

    def map_of(self, x, out):
        return out

    def permute(self, x, out, perm):
        return x[perm], out

    def poison_image(self, x, batch_idx, image):
        return torch.where((batch_idx == image)[:, None], float("nan"), x)

    def part_of_image(self, out, batch_idx, image):
        return out[image]


# ---------------------------------------------------------------------------------------------
# Hand-computed maps
# ---------------------------------------------------------------------------------------------

@DEVICE_BACKEND
def test_exact_map_overlaps_add_up(device, backend):
    """Image 16x16, level 4x4 (r = 0.25). Box A (4, 4, 12, 12) covers cells 1..3 x 1..3 (both ends on grid
    lines, inclusive); box B (0, 0, 5, 16) covers columns 0..1, rows 0..3; box C (1, 1, 3, 3) covers
    nothing; box D is image 1's whole image. Overlaps add up, no division by the overlap count."""
    boxes = torch.tensor([[4.0, 4.0, 12.0, 12.0], [0.0, 0.0, 5.0, 16.0], [1.0, 1.0, 3.0, 3.0],
                          [0.0, 0.0, 16.0, 16.0]], dtype=torch.float64, device=device)
    batch_idx = torch.tensor([0, 0, 0, 1], device=device)
    emb = torch.tensor([[1.0, 10.0], [100.0, 1000.0], [7.0, 7.0], [3.0, -3.0]], dtype=torch.float64, device=device)
    got = lgd_ops.box_fill(emb, boxes, batch_idx, (16, 16), (3, 4, 4), backend=backend)
    expected = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    expected[0, :, 1:4, 1:4] += torch.tensor([1.0, 10.0])[:, None, None]
    expected[0, :, 0:4, 0:2] += torch.tensor([100.0, 1000.0])[:, None, None]
    expected[1] = torch.tensor([3.0, -3.0])[:, None, None]
    # image 2 has no boxes: a zero map
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)
    torch.testing.assert_close(oracle_box_fill(emb, boxes, batch_idx, (16, 16), (3, 4, 4)), expected)


@DEVICE_BACKEND
@pytest.mark.parametrize("case", ["mixed", "grid_odd", "empty_image", "many"])
def test_adjoint_of_sum_pool(device, backend, case):
    """docs/method.md §3: <fill(e), F> == <e, pool_sum(F)>."""
    boxes, batch_idx, b, c, image_size, level = box_case(case)
    boxes, batch_idx = boxes.to(device), batch_idx.to(device)
    emb = TestBoxFill.embeddings(boxes.shape[0], c, torch.float64, device)
    features = torch.randn(b, c, *level, dtype=torch.float64, device=device)
    filled = lgd_ops.box_fill(emb, boxes, batch_idx, image_size, (b, *level), backend=backend)
    pooled_sum = oracle_box_pool(features, boxes, batch_idx, image_size, average=False).to(device)
    torch.testing.assert_close((filled * features).sum(), (emb * pooled_sum).sum(), rtol=1e-10, atol=1e-10)


@DEVICE_BACKEND
@pytest.mark.parametrize("values", ["nan", "inf", "inf_and_neg_inf"])
def test_non_finite_embedding_stays_in_its_box(device, backend, values):
    """A NaN or inf embedding reaches only its own box's cells, as in the oracle (a dense matmul would spread
    a NaN to every cell: 0 * NaN = NaN); where a +inf box overlaps a -inf box the cells are NaN."""
    boxes, batch_idx, b, c, image_size, level = box_case("mixed")
    masks = oracle_masks(boxes, image_size, *level).bool()
    covering = [n for n in range(len(boxes)) if batch_idx[n] == 0 and masks[n].any()]
    first = next(n for n in covering if not masks[n, -1].any())  # cells below it: a sweep must not carry it on
    if values == "inf_and_neg_inf":
        second = next(n for n in covering if n != first and (masks[n] & masks[first]).any() and not masks[n].all())
        bad = {first: float("inf"), second: -float("inf")}
    else:
        bad = {first: float(values)}
    emb = TestBoxFill.embeddings(len(boxes), c, torch.float32, device)
    for n, value in bad.items():
        emb[n, 1] = value
    got = lgd_ops.box_fill(emb, boxes.to(device), batch_idx.to(device), image_size, (b, *level), backend=backend)
    expected = oracle_box_fill(emb, boxes, batch_idx, image_size, (b, *level))
    finite = expected.isfinite()
    assert finite[0, 1].any() and not finite[0, 1].all() and finite[:, [0, 2]].all() and finite[1].all()
    assert expected.isnan().any() == (values != "inf")
    BoxOpTests.assert_non_finite_close(got, expected)
