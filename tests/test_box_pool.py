"""box_pool (docs/method.md §1-2): every backend against the float64 loop oracle, forward and backward."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lgd_ops
from conftest import (
    all_backends_on,
    assert_close_to_oracle,
    assert_compiled_matches_eager,
    box_case,
    BOX_CASES,
    box_dtype_for,
    DEVICE_BACKEND,
    draw_box_problem,
    DTYPES,
    KERNELS,
    make_features,
    oracle_box_pool,
    random_batch_idx,
    random_boxes,
    raw_op,
    same_bits_across_runs_and_threads,
    value_scale,
)


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


# ---------------------------------------------------------------------------------------------
# Random inputs against the float64 oracle
# ---------------------------------------------------------------------------------------------

@DEVICE_BACKEND
@pytest.mark.parametrize("case", list(BOX_CASES))
@DTYPES
def test_forward_matches_oracle(device, backend, case, dtype):
    boxes, batch_idx, b, c, image_size, level = box_case(case)
    boxes = boxes.to(device=device, dtype=box_dtype_for(dtype))
    batch_idx = batch_idx.to(device)
    features = make_features((b, c, *level), dtype, device)
    got = lgd_ops.box_pool(features, boxes, batch_idx, image_size, backend=backend)
    expected = oracle_box_pool(features, boxes, batch_idx, image_size)
    assert got.shape == (boxes.shape[0], c) and got.device == features.device
    assert_close_to_oracle(got, expected, dtype, value_scale(expected), f"{backend} {case}")


@DEVICE_BACKEND
@pytest.mark.parametrize("case", list(BOX_CASES))
@DTYPES
def test_backward_matches_oracle(device, backend, case, dtype):
    boxes, batch_idx, b, c, image_size, level = box_case(case)
    boxes = boxes.to(device=device, dtype=box_dtype_for(dtype))
    batch_idx = batch_idx.to(device)
    features = make_features((b, c, *level), dtype, device, requires_grad=True)
    upstream = torch.randn(boxes.shape[0], c, dtype=torch.float64).to(device=device, dtype=dtype)
    lgd_ops.box_pool(features, boxes, batch_idx, image_size, backend=backend).backward(upstream)
    ref = features.detach().to(torch.float64).cpu().requires_grad_(True)
    (oracle_box_pool(ref, boxes, batch_idx, image_size) * upstream.cpu().to(torch.float64)).sum().backward()
    assert features.grad.shape == features.shape
    assert_close_to_oracle(features.grad, ref.grad, dtype, value_scale(ref.grad), f"{backend} {case} grad")


@DEVICE_BACKEND
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_memory_layouts(device, backend, layout, dtype):
    boxes, batch_idx, b, c, image_size, level = box_case("mixed")
    boxes, batch_idx = boxes.to(device), batch_idx.to(device)
    features = make_features((b, c, *level), dtype, device, layout=layout, requires_grad=True)
    got = lgd_ops.box_pool(features, boxes, batch_idx, image_size, backend=backend)
    expected = oracle_box_pool(features, boxes, batch_idx, image_size)
    assert_close_to_oracle(got, expected, dtype, value_scale(expected), layout)
    # an expanded (stride-0) upstream gradient, as out.sum() produces
    got.sum().backward()
    ref = features.detach().to(torch.float64).cpu().requires_grad_(True)
    oracle_box_pool(ref, boxes, batch_idx, image_size).sum().backward()
    assert_close_to_oracle(features.grad, ref.grad, dtype, value_scale(ref.grad), f"{layout} grad")


@DEVICE_BACKEND
def test_non_contiguous_boxes_and_batch_idx(device, backend):
    boxes, batch_idx, b, c, image_size, level = box_case("mixed")
    features = make_features((b, c, *level), torch.float64, device)
    boxes_t = boxes.T.contiguous().to(device).T  # [N, 4] view of a [4, N] tensor
    idx_strided = torch.stack([batch_idx, batch_idx], dim=1).to(device)[:, 1]  # stride 2
    assert not boxes_t.is_contiguous() and not idx_strided.is_contiguous()
    got = lgd_ops.box_pool(features, boxes_t, idx_strided, image_size, backend=backend)
    torch.testing.assert_close(got.cpu(), oracle_box_pool(features, boxes, batch_idx, image_size))


@DEVICE_BACKEND
@pytest.mark.parametrize("box_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
def test_box_dtype_is_independent_of_features(device, backend, box_dtype):
    """Integer-corner boxes are exact in every float dtype: the cells (hence results) must not change."""
    boxes, batch_idx, b, c, image_size, level = box_case("grid_pow2")
    features = make_features((b, c, *level), torch.float64, device)
    batch_idx = batch_idx.to(device)
    expected = lgd_ops.box_pool(features, boxes.to(device), batch_idx, image_size, backend=backend)
    got = lgd_ops.box_pool(features, boxes.to(device=device, dtype=box_dtype), batch_idx, image_size, backend=backend)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@DEVICE_BACKEND
def test_rows_follow_input_order_and_image(device, backend):
    """Each output row belongs to its own box: permuting boxes permutes rows; other images are not read."""
    boxes, batch_idx, b, c, image_size, level = box_case("mixed")
    features = make_features((b, c, *level), torch.float64, device)
    boxes, batch_idx = boxes.to(device), batch_idx.to(device)
    perm = torch.randperm(boxes.shape[0], device=device)
    out = lgd_ops.box_pool(features, boxes, batch_idx, image_size, backend=backend)
    out_perm = lgd_ops.box_pool(features, boxes[perm], batch_idx[perm], image_size, backend=backend)
    torch.testing.assert_close(out_perm, out[perm], rtol=1e-12, atol=1e-12)
    poisoned = features.clone()
    poisoned[1] = float("nan")
    only0 = batch_idx == 0
    out0 = lgd_ops.box_pool(poisoned, boxes[only0], batch_idx[only0], image_size, backend=backend)
    torch.testing.assert_close(out0, out[only0], rtol=1e-12, atol=1e-12)


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
    torch.testing.assert_close(got.cpu().double(), expected, equal_nan=True, rtol=1e-5,
                               atol=1e-5 * value_scale(expected[finite]))


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


# ---------------------------------------------------------------------------------------------
# The raw op: sum mode (average=False) and its adjoint relation with box_fill
# ---------------------------------------------------------------------------------------------

@KERNELS
@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("case", ["mixed", "grid_odd", "empty_image", "no_boxes", "map_1x1"])
def test_raw_op_sum_and_mean(device, backend, average, case):
    boxes, batch_idx, b, c, image_size, level = box_case(case)
    boxes, batch_idx = boxes.to(device), batch_idx.to(device)
    features = make_features((b, c, *level), torch.float64, device, requires_grad=True)
    got = raw_op("box_pool", backend)(features, boxes, batch_idx, image_size[0], image_size[1], average)
    expected = oracle_box_pool(features, boxes, batch_idx, image_size, average=average)
    torch.testing.assert_close(got.detach().cpu(), expected.detach(), rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(got)
    got.backward(upstream)
    ref = features.detach().cpu().requires_grad_(True)
    (oracle_box_pool(ref, boxes, batch_idx, image_size, average=average) * upstream.cpu()).sum().backward()
    torch.testing.assert_close(features.grad.cpu(), ref.grad, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, determinism, fuzzing
# ---------------------------------------------------------------------------------------------

@DEVICE_BACKEND
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck(device, backend, seed):
    g = torch.Generator().manual_seed(seed)
    image_size = (20, 28)
    boxes = random_boxes(6, image_size, (5, 7), generator=g).to(device)
    batch_idx = random_batch_idx(6, 2, generator=g).to(device)
    features = torch.randn(2, 3, 5, 7, dtype=torch.float64, generator=g).to(device).requires_grad_(True)
    fn = lambda f: lgd_ops.box_pool(f, boxes, batch_idx, image_size, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (features,))
    assert torch.autograd.gradgradcheck(fn, (features,))  # the backward (box_fill) is differentiable too


def _opcheck_samples(device):
    g = torch.Generator().manual_seed(3)
    samples = []
    for (b, c, h, w), n, layout in [((2, 3, 5, 7), 6, "contiguous"), ((1, 2, 4, 4), 0, "contiguous"),
                                    ((2, 4, 3, 6), 5, "channels_last"), ((1, 1, 1, 1), 2, "contiguous")]:
        features = make_features((b, c, h, w), torch.float32, device, layout=layout, requires_grad=True)
        boxes = random_boxes(n, (4 * h, 4 * w), (h, w), generator=g).to(device=device, dtype=torch.float32)
        batch_idx = random_batch_idx(n, b, generator=g).to(device)
        samples.append((features, boxes, batch_idx, 4 * h, 4 * w))
    return samples


@KERNELS
@pytest.mark.parametrize("average", [True, False])
def test_opcheck(device, backend, average):
    for features, boxes, batch_idx, in_h, in_w in _opcheck_samples(device):
        torch.library.opcheck(raw_op("box_pool", backend).default, (features, boxes, batch_idx, in_h, in_w, average))


@pytest.mark.parametrize("backend", [b for b in all_backends_on("cpu") if b != "reference"])
def test_deterministic_across_runs_and_threads(backend):
    boxes, batch_idx, b, c, image_size, level = box_case("many")
    features = make_features((b, 16, *level), torch.float32, "cpu", requires_grad=True)
    upstream = torch.randn(boxes.shape[0], 16)

    def run():
        features.grad = None
        out = lgd_ops.box_pool(features, boxes, batch_idx, image_size, backend=backend)
        out.backward(upstream)
        return out.detach().clone(), features.grad.clone()

    first = same_bits_across_runs_and_threads(run)
    expected = oracle_box_pool(features, boxes, batch_idx, image_size)
    assert_close_to_oracle(first[0], expected, torch.float32, value_scale(expected), "2 threads")


@given(data=st.data())
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_backends_agree(data):
    boxes, batch_idx, b, c, in_size, level = draw_box_problem(data)
    features = torch.randn(b, c, *level, dtype=torch.float64)
    expected = oracle_box_pool(features, boxes, batch_idx, in_size)
    for backend in all_backends_on("cpu"):
        got = lgd_ops.box_pool(features, boxes, batch_idx, in_size, backend=backend)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"{backend}: {m}")


# ---------------------------------------------------------------------------------------------
# torch.compile (deselect with -m "not compile")
# ---------------------------------------------------------------------------------------------

@pytest.mark.compile
@KERNELS
def test_compile_raw_op(device, backend):
    boxes, batch_idx, b, c, image_size, level = box_case("mixed")
    boxes, batch_idx = boxes.to(device), batch_idx.to(device)
    features = make_features((b, c, *level), torch.float32, device)

    op = raw_op("box_pool", backend)

    def fn(f):
        mean = op(f * 2.0, boxes, batch_idx, image_size[0], image_size[1], True)
        total = op(f, boxes, batch_idx, image_size[0], image_size[1], False)
        return (mean.square() + total.sin()).sum()

    assert_compiled_matches_eager(fn, [features])


@pytest.mark.compile
@KERNELS
def test_compile_public_api(device, backend):
    boxes, batch_idx, b, c, image_size, level = box_case("mixed")
    boxes, batch_idx = boxes.to(device), batch_idx.to(device)
    features = make_features((b, c, *level), torch.float32, device)

    def fn(f):
        return lgd_ops.box_pool(f * 2.0, boxes, batch_idx, image_size, backend=backend).square().sum()

    assert_compiled_matches_eager(fn, [features])


# ---------------------------------------------------------------------------------------------
# The tests shared with box_fill (tests/box_op_base.py)
# ---------------------------------------------------------------------------------------------

from box_op_base import BoxOpTests  # noqa: E402


class TestBoxPoolShared(BoxOpTests):
    op = "box_pool"
