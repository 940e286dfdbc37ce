"""box_fill (docs/method.md §1, §3): every backend against the float64 loop oracle, forward and backward."""
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
    oracle_box_fill,
    oracle_box_pool,
    oracle_masks,
    random_batch_idx,
    random_boxes,
    raw_op,
    same_bits_across_runs_and_threads,
    value_scale,
)


def _embeddings(n, c, dtype, device, layout="contiguous", requires_grad=False):
    if layout == "contiguous":
        e = torch.randn(n, c, dtype=torch.float64).to(device=device, dtype=dtype)
    elif layout == "transposed":  # [N, C] view of a [C, N] tensor
        e = torch.randn(c, n, dtype=torch.float64).to(device=device, dtype=dtype).T
    elif layout == "sliced":  # every other column, with a storage offset
        e = torch.randn(n, 2 * c + 1, dtype=torch.float64).to(device=device, dtype=dtype)[:, 1::2]
    else:
        raise ValueError(layout)
    return e.requires_grad_(requires_grad)


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
    emb = _embeddings(boxes.shape[0], c, dtype, device)
    got = lgd_ops.box_fill(emb, boxes, batch_idx, image_size, (b, *level), backend=backend)
    expected = oracle_box_fill(emb, boxes, batch_idx, image_size, (b, *level))
    assert got.shape == (b, c, *level) and got.device == emb.device
    assert_close_to_oracle(got, expected, dtype, value_scale(expected), f"{backend} {case}")


@DEVICE_BACKEND
@pytest.mark.parametrize("case", list(BOX_CASES))
@DTYPES
def test_backward_matches_oracle(device, backend, case, dtype):
    boxes, batch_idx, b, c, image_size, level = box_case(case)
    boxes = boxes.to(device=device, dtype=box_dtype_for(dtype))
    batch_idx = batch_idx.to(device)
    emb = _embeddings(boxes.shape[0], c, dtype, device, requires_grad=True)
    upstream = torch.randn(b, c, *level, dtype=torch.float64).to(device=device, dtype=dtype)
    lgd_ops.box_fill(emb, boxes, batch_idx, image_size, (b, *level), backend=backend).backward(upstream)
    ref = emb.detach().to(torch.float64).cpu().requires_grad_(True)
    (oracle_box_fill(ref, boxes, batch_idx, image_size, (b, *level)) * upstream.cpu().double()).sum().backward()
    assert emb.grad.shape == emb.shape
    assert_close_to_oracle(emb.grad, ref.grad, dtype, value_scale(ref.grad), f"{backend} {case} grad")


@DEVICE_BACKEND
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_memory_layouts(device, backend, layout, dtype):
    boxes, batch_idx, b, c, image_size, level = box_case("mixed")
    boxes, batch_idx = boxes.to(device), batch_idx.to(device)
    emb = _embeddings(boxes.shape[0], c, dtype, device, layout=layout, requires_grad=True)
    assert not emb.is_contiguous()
    got = lgd_ops.box_fill(emb, boxes, batch_idx, image_size, (b, *level), backend=backend)
    expected = oracle_box_fill(emb, boxes, batch_idx, image_size, (b, *level))
    assert_close_to_oracle(got, expected, dtype, value_scale(expected), layout)
    # non-contiguous upstream gradients: a permuted one (channels-last consumer) and an expanded one
    weight = torch.randn(b, *level, c, dtype=torch.float64).to(device=device, dtype=dtype)
    (got.permute(0, 2, 3, 1) * weight).sum().backward()
    ref = emb.detach().to(torch.float64).cpu().requires_grad_(True)
    out_ref = oracle_box_fill(ref, boxes, batch_idx, image_size, (b, *level))
    (out_ref.permute(0, 2, 3, 1) * weight.cpu().double()).sum().backward()
    assert_close_to_oracle(emb.grad, ref.grad, dtype, value_scale(ref.grad), f"{layout} grad")
    emb.grad = None
    lgd_ops.box_fill(emb, boxes, batch_idx, image_size, (b, *level), backend=backend).sum().backward()
    ref.grad = None
    oracle_box_fill(ref, boxes, batch_idx, image_size, (b, *level)).sum().backward()
    assert_close_to_oracle(emb.grad, ref.grad, dtype, value_scale(ref.grad), f"{layout} expanded grad")


@DEVICE_BACKEND
def test_non_contiguous_boxes_and_batch_idx(device, backend):
    boxes, batch_idx, b, c, image_size, level = box_case("mixed")
    emb = _embeddings(boxes.shape[0], c, torch.float64, device)
    boxes_t = boxes.T.contiguous().to(device).T
    idx_strided = torch.stack([batch_idx, batch_idx], dim=1).to(device)[:, 1]
    assert not boxes_t.is_contiguous() and not idx_strided.is_contiguous()
    got = lgd_ops.box_fill(emb, boxes_t, idx_strided, image_size, (b, *level), backend=backend)
    torch.testing.assert_close(got.cpu(), oracle_box_fill(emb, boxes, batch_idx, image_size, (b, *level)))


@DEVICE_BACKEND
def test_box_order_does_not_matter(device, backend):
    boxes, batch_idx, b, c, image_size, level = box_case("many")
    boxes, batch_idx = boxes.to(device), batch_idx.to(device)
    emb = _embeddings(boxes.shape[0], c, torch.float64, device)
    perm = torch.randperm(boxes.shape[0], device=device)
    out = lgd_ops.box_fill(emb, boxes, batch_idx, image_size, (b, *level), backend=backend)
    out_perm = lgd_ops.box_fill(emb[perm], boxes[perm], batch_idx[perm], image_size, (b, *level), backend=backend)
    torch.testing.assert_close(out_perm, out, rtol=1e-12, atol=1e-12)


@DEVICE_BACKEND
@pytest.mark.parametrize("case", ["mixed", "grid_odd", "empty_image", "many"])
def test_adjoint_of_sum_pool(device, backend, case):
    """docs/method.md §3: <fill(e), F> == <e, pool_sum(F)>."""
    boxes, batch_idx, b, c, image_size, level = box_case(case)
    boxes, batch_idx = boxes.to(device), batch_idx.to(device)
    emb = _embeddings(boxes.shape[0], c, torch.float64, device)
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
    emb = _embeddings(len(boxes), c, torch.float32, device)
    for n, value in bad.items():
        emb[n, 1] = value
    got = lgd_ops.box_fill(emb, boxes.to(device), batch_idx.to(device), image_size, (b, *level), backend=backend)
    expected = oracle_box_fill(emb, boxes, batch_idx, image_size, (b, *level))
    finite = expected.isfinite()
    assert finite[0, 1].any() and not finite[0, 1].all() and finite[:, [0, 2]].all() and finite[1].all()
    assert expected.isnan().any() == (values != "inf")
    torch.testing.assert_close(got.cpu().double(), expected, equal_nan=True, rtol=1e-5,
                               atol=1e-5 * value_scale(expected[finite]))


# ---------------------------------------------------------------------------------------------
# The raw op: average=True (the backward of a mean box_pool)
# ---------------------------------------------------------------------------------------------

@KERNELS
@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("case", ["mixed", "grid_pow2", "empty_image", "no_boxes", "map_1x1"])
def test_raw_op_average(device, backend, average, case):
    boxes, batch_idx, b, c, image_size, level = box_case(case)
    boxes, batch_idx = boxes.to(device), batch_idx.to(device)
    emb = _embeddings(boxes.shape[0], c, torch.float64, device, requires_grad=True)
    got = raw_op("box_fill", backend)(emb, boxes, batch_idx, image_size[0], image_size[1], b, *level, average)
    expected = oracle_box_fill(emb, boxes, batch_idx, image_size, (b, *level), average=average)
    torch.testing.assert_close(got.detach().cpu(), expected.detach(), rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(got)
    got.backward(upstream)
    ref = emb.detach().cpu().requires_grad_(True)
    (oracle_box_fill(ref, boxes, batch_idx, image_size, (b, *level), average=average) * upstream.cpu()).sum().backward()
    torch.testing.assert_close(emb.grad.cpu(), ref.grad, rtol=1e-10, atol=1e-10)


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
    emb = torch.randn(6, 3, dtype=torch.float64, generator=g).to(device).requires_grad_(True)
    fn = lambda e: lgd_ops.box_fill(e, boxes, batch_idx, image_size, (2, 5, 7), backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (emb,))
    assert torch.autograd.gradgradcheck(fn, (emb,))  # the backward (box_pool) is differentiable too


@KERNELS
@pytest.mark.parametrize("average", [False, True])
def test_opcheck(device, backend, average):
    g = torch.Generator().manual_seed(4)
    for (b, c, h, w), n in [((2, 3, 5, 7), 6), ((2, 2, 4, 4), 0), ((1, 1, 1, 1), 2), ((3, 4, 6, 3), 9)]:
        emb = torch.randn(n, c, generator=g).to(device).requires_grad_(True)
        boxes = random_boxes(n, (4 * h, 4 * w), (h, w), generator=g).to(device=device, dtype=torch.float32)
        batch_idx = random_batch_idx(n, b, generator=g).to(device)
        torch.library.opcheck(raw_op("box_fill", backend).default,
                              (emb, boxes, batch_idx, 4 * h, 4 * w, b, h, w, average))


@pytest.mark.parametrize("backend", [b for b in all_backends_on("cpu") if b != "reference"])
def test_deterministic_across_runs_and_threads(backend):
    boxes, batch_idx, b, c, image_size, level = box_case("many")
    emb = torch.randn(boxes.shape[0], 16, requires_grad=True)
    upstream = torch.randn(b, 16, *level)

    def run():
        emb.grad = None
        out = lgd_ops.box_fill(emb, boxes, batch_idx, image_size, (b, *level), backend=backend)
        out.backward(upstream)
        return out.detach().clone(), emb.grad.clone()

    first = same_bits_across_runs_and_threads(run)
    expected = oracle_box_fill(emb, boxes, batch_idx, image_size, (b, *level))
    assert_close_to_oracle(first[0], expected, torch.float32, value_scale(expected), "2 threads")


@given(data=st.data())
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_backends_agree(data):
    boxes, batch_idx, b, c, in_size, level = draw_box_problem(data)
    emb = torch.randn(boxes.shape[0], c, dtype=torch.float64)
    expected = oracle_box_fill(emb, boxes, batch_idx, in_size, (b, *level))
    for backend in all_backends_on("cpu"):
        got = lgd_ops.box_fill(emb, boxes, batch_idx, in_size, (b, *level), backend=backend)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"{backend}: {m}")


# ---------------------------------------------------------------------------------------------
# torch.compile (deselect with -m "not compile")
# ---------------------------------------------------------------------------------------------

@pytest.mark.compile
@KERNELS
def test_compile_raw_op(device, backend):
    boxes, batch_idx, b, c, image_size, level = box_case("mixed")
    boxes, batch_idx = boxes.to(device), batch_idx.to(device)
    emb = _embeddings(boxes.shape[0], c, torch.float32, device)

    op = raw_op("box_fill", backend)

    def fn(e):
        out = op(e * 2.0, boxes, batch_idx, *image_size, b, *level, False)
        avg = op(e, boxes, batch_idx, *image_size, b, *level, True)
        return (out.square() + avg.cos()).sum()

    assert_compiled_matches_eager(fn, [emb])


@pytest.mark.compile
@KERNELS
def test_compile_public_api(device, backend):
    boxes, batch_idx, b, c, image_size, level = box_case("mixed")
    boxes, batch_idx = boxes.to(device), batch_idx.to(device)
    emb = _embeddings(boxes.shape[0], c, torch.float32, device)

    def fn(e):
        return lgd_ops.box_fill(e * 2.0, boxes, batch_idx, image_size, (b, *level), backend=backend).square().sum()

    assert_compiled_matches_eager(fn, [emb])


# ---------------------------------------------------------------------------------------------
# The tests shared with box_pool (tests/box_op_base.py)
# ---------------------------------------------------------------------------------------------

from box_op_base import BoxOpTests  # noqa: E402


class TestBoxFillShared(BoxOpTests):
    op = "box_fill"
