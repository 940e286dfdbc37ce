"""The op-test base shared by box_pool and box_fill (as torchvision's RoIOpTester): test_box_pool.py and
test_box_fill.py each subclass BoxOpTests with their op's hooks (the public call and the raw op, the float64
oracle, how to make the op's input and how to poison it with non-finite values), and pytest collects the
tests below once per op. Each test file keeps only what is its op's own (hand-computed cells and maps, the
adjoint identity, empty maps).

What both ops share: forward and backward against the float64 oracles over every hard case and dtype, memory
layouts and non-contiguous upstream gradients, non-contiguous boxes, box order, the raw op in both average
modes, gradcheck/gradgradcheck, opcheck (channels_last included), determinism across runs and threads,
hypothesis fuzzing of every backend, torch.compile, maps wide enough for the kernels' channel blocks (40
channels: NCHW blocks of 8 planes, channels_last blocks of 32 channels plus single channels) in both layouts,
non-finite values, the CPU kernels' AVX2 and baseline copies, and the level index (lgd_ops.box_index): the
same bits with and without it, refused when built for another call, trusted, gradcheck and opcheck through it.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from box_index_tests import BoxIndexTests, WIDE
from conftest import (
    all_backends_on,
    assert_close_to_oracle,
    assert_compiled_matches_eager,
    box_case,
    BOX_CASES,
    box_dtype_for,
    DEVICE_BACKEND,
    draw_box_problem,
    DTYPE_IDS,
    DTYPES,
    KERNELS,
    random_batch_idx,
    random_boxes,
    raw_op,
    same_bits_across_runs_and_threads,
    same_bits_in_both_cpu_isas,
    value_scale,
)

LAYOUTS = ("contiguous", "channels_last")
MEMORY_FORMAT = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def reversed_strides(shape, dtype, device):
    """A random float64-drawn tensor of `shape` whose strides run backwards (a permuted view), as a
    channels-last or transposed consumer's gradient arrives."""
    dims = tuple(reversed(range(len(shape))))
    return torch.randn(tuple(reversed(shape)), dtype=torch.float64).to(device=device, dtype=dtype).permute(dims)


class BoxOpTests(BoxIndexTests):
    """Subclasses set `op` and the per-op parameter lists, and implement the hooks below."""

    op = None  # "box_pool" / "box_fill"
    MEMORY_LAYOUTS = ()  # the input layouts test_memory_layouts runs (make_input's `layout`)
    MEMORY_LAYOUT_DTYPES = ()  # and the dtypes
    RAW_OP_CASES = ()  # the BOX_CASES test_raw_op runs in both average modes

    def pytest_generate_tests(self, metafunc):
        """The per-op parameter lists above (pytest calls this on the class for each of its tests)."""
        if metafunc.definition.originalname == "test_memory_layouts":
            metafunc.parametrize("layout", self.MEMORY_LAYOUTS)
            metafunc.parametrize("dtype", self.MEMORY_LAYOUT_DTYPES, ids=lambda d: DTYPE_IDS[d])
        elif metafunc.definition.originalname == "test_raw_op":
            metafunc.parametrize("case", self.RAW_OP_CASES)

    # -- hooks -------------------------------------------------------------------------------------------------

    def make_input(self, b, c, level, n, dtype, device, layout="contiguous", requires_grad=False):
        """The op's differentiable input (features [B, C, H, W] / embeddings [N, C]) in `layout`."""
        raise NotImplementedError

    def call(self, x, boxes, batch_idx, image_size, b, level, layout="contiguous", backend="auto", **kw):
        """The public op; `layout` is the memory format box_fill is asked to write."""
        raise NotImplementedError

    def raw_args(self, x, boxes, batch_idx, image_size, b, level, average, layout="contiguous"):
        """The arguments of torch.ops.lgd_ops.<op> after x, boxes and batch_idx."""
        raise NotImplementedError

    def oracle(self, x, boxes, batch_idx, image_size, b, level, average=None):
        """The float64 oracle (conftest.py); average=None is the public op's mode."""
        raise NotImplementedError

    def in_shape(self, b, c, level, n):
        raise NotImplementedError

    def out_shape(self, b, c, level, n):
        raise NotImplementedError

    def poison(self, x, batch_idx, channels):
        """Writes a NaN into channel channels[0] and an inf into channels[1] of x where image 0 reads them."""
        raise NotImplementedError

    def map_of(self, x, out):
        """The [B, C, H, W] tensor of the call: the features (pool) or the painted output (fill)."""
        raise NotImplementedError

    def permute(self, x, out, perm):
        """(input, expected output) for boxes[perm]: pool's rows follow the boxes, fill's embeddings do and its
        map does not move."""
        raise NotImplementedError

    def poison_image(self, x, batch_idx, image):
        """A copy of x with NaN in everything image `image` contributes (its feature map / its boxes' rows)."""
        raise NotImplementedError

    def part_of_image(self, out, batch_idx, image):
        """The part of the output that belongs to image `image` (its boxes' rows / its map)."""
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------------------------------------

    def run_raw(self, backend, x, boxes, batch_idx, image_size, b, level, average, index=None):
        return raw_op(self.op, backend)(x, boxes, batch_idx, *self.raw_args(x, boxes, batch_idx, image_size, b,
                                                                             level, average), index)

    def assert_grad_matches_oracle(self, x, ref_x, upstream, boxes, batch_idx, image_size, b, level, dtype, msg,
                                   average=None):
        """x.grad (after a backward with `upstream`) against the oracle's gradient of <oracle(ref_x), upstream>."""
        expected = self.oracle(ref_x, boxes, batch_idx, image_size, b, level, average)
        (expected * upstream.detach().cpu().to(torch.float64)).sum().backward()
        assert x.grad.shape == x.shape
        assert_close_to_oracle(x.grad, ref_x.grad, dtype, value_scale(ref_x.grad), msg)

    @staticmethod
    def assert_non_finite_close(got, expected):
        """NaN where the oracle has NaN, the same infinities, and the finite values to fp32 tolerance."""
        finite = expected.isfinite()
        torch.testing.assert_close(got.cpu().double(), expected, equal_nan=True, rtol=1e-5,
                                   atol=1e-5 * value_scale(expected[finite]))

    def case_on(self, case, dtype, device, channels=None, layout="contiguous", requires_grad=False):
        """A BOX_CASES entry on `device`: (boxes in box_dtype_for(dtype), batch_idx, B, image_size, level, the op's
        input in `dtype` and `layout` with `channels` channels, the case's own by default)."""
        boxes, batch_idx, b, c, image_size, level = box_case(case)
        boxes = boxes.to(device=device, dtype=box_dtype_for(dtype))
        x = self.make_input(b, channels or c, level, boxes.shape[0], dtype, device, layout, requires_grad)
        return boxes, batch_idx.to(device), b, image_size, level, x

    @staticmethod
    def as_reference(x):
        return x.detach().to(torch.float64).cpu().requires_grad_(True)

    # -- forward and backward against the float64 oracle -------------------------------------------------------

    @DEVICE_BACKEND
    @pytest.mark.parametrize("case", list(BOX_CASES))
    @DTYPES
    def test_forward_matches_oracle(self, device, backend, case, dtype):
        boxes, batch_idx, b, image_size, level, x = self.case_on(case, dtype, device)
        got = self.call(x, boxes, batch_idx, image_size, b, level, backend=backend)
        expected = self.oracle(x, boxes, batch_idx, image_size, b, level)
        assert got.shape == self.out_shape(b, x.shape[1], level, boxes.shape[0]) and got.device == x.device
        assert_close_to_oracle(got, expected, dtype, value_scale(expected), f"{backend} {case}")

    @DEVICE_BACKEND
    @pytest.mark.parametrize("case", list(BOX_CASES))
    @DTYPES
    def test_backward_matches_oracle(self, device, backend, case, dtype):
        boxes, batch_idx, b, image_size, level, x = self.case_on(case, dtype, device, requires_grad=True)
        shape = self.out_shape(b, x.shape[1], level, boxes.shape[0])
        upstream = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
        self.call(x, boxes, batch_idx, image_size, b, level, backend=backend).backward(upstream)
        self.assert_grad_matches_oracle(x, self.as_reference(x), upstream, boxes, batch_idx, image_size, b, level,
                                        dtype, f"{backend} {case} grad")

    @DEVICE_BACKEND
    def test_memory_layouts(self, device, backend, layout, dtype):
        """A non-contiguous input, then upstream gradients with reversed strides (a channels-last or transposed
        consumer) and expanded (stride 0, as out.sum() gives)."""
        boxes, batch_idx, b, c, image_size, level = box_case("mixed")
        boxes, batch_idx = boxes.to(device), batch_idx.to(device)
        x = self.make_input(b, c, level, boxes.shape[0], dtype, device, layout=layout, requires_grad=True)
        assert not x.is_contiguous()
        got = self.call(x, boxes, batch_idx, image_size, b, level, backend=backend)
        expected = self.oracle(x, boxes, batch_idx, image_size, b, level)
        assert_close_to_oracle(got, expected, dtype, value_scale(expected), layout)
        weight = reversed_strides(got.shape, dtype, device)
        (got * weight).sum().backward()
        ref = self.as_reference(x)
        self.assert_grad_matches_oracle(x, ref, weight, boxes, batch_idx, image_size, b, level, dtype,
                                        f"{layout} grad")
        x.grad = ref.grad = None
        self.call(x, boxes, batch_idx, image_size, b, level, backend=backend).sum().backward()
        self.assert_grad_matches_oracle(x, ref, torch.ones(got.shape), boxes, batch_idx, image_size, b, level,
                                        dtype, f"{layout} expanded grad")

    @DEVICE_BACKEND
    def test_non_contiguous_boxes_and_batch_idx(self, device, backend):
        boxes, batch_idx, b, c, image_size, level = box_case("mixed")
        x = self.make_input(b, c, level, boxes.shape[0], torch.float64, device)
        boxes_t = boxes.T.contiguous().to(device).T  # [N, 4] view of a [4, N] tensor
        idx_strided = torch.stack([batch_idx, batch_idx], dim=1).to(device)[:, 1]  # stride 2
        assert not boxes_t.is_contiguous() and not idx_strided.is_contiguous()
        got = self.call(x, boxes_t, idx_strided, image_size, b, level, backend=backend)
        torch.testing.assert_close(got.cpu(), self.oracle(x, boxes, batch_idx, image_size, b, level))

    @DEVICE_BACKEND
    @pytest.mark.parametrize("box_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
    def test_box_dtype_is_independent_of_features(self, device, backend, box_dtype):
        """Integer-corner boxes are exact in every float dtype: the cells (hence results) must not change."""
        boxes, batch_idx, b, c, image_size, level = box_case("grid_pow2")
        x = self.make_input(b, c, level, boxes.shape[0], torch.float64, device)
        batch_idx = batch_idx.to(device)
        expected = self.call(x, boxes.to(device), batch_idx, image_size, b, level, backend=backend)
        got = self.call(x, boxes.to(device=device, dtype=box_dtype), batch_idx, image_size, b, level, backend=backend)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)

    @DEVICE_BACKEND
    @pytest.mark.parametrize("case", ["mixed", "many"])
    def test_box_order_and_images(self, device, backend, case):
        """Permuting the boxes permutes pool's rows and leaves fill's map as it is; an image's result reads
        nothing of the other images (NaN there stays there)."""
        boxes, batch_idx, b, c, image_size, level = box_case(case)
        boxes, batch_idx = boxes.to(device), batch_idx.to(device)
        x = self.make_input(b, c, level, boxes.shape[0], torch.float64, device)
        perm = torch.randperm(boxes.shape[0], device=device)
        out = self.call(x, boxes, batch_idx, image_size, b, level, backend=backend)
        x_perm, expected = self.permute(x, out, perm)
        out_perm = self.call(x_perm, boxes[perm], batch_idx[perm], image_size, b, level, backend=backend)
        torch.testing.assert_close(out_perm, expected, rtol=1e-12, atol=1e-12)
        out0 = self.call(self.poison_image(x, batch_idx, 1), boxes, batch_idx, image_size, b, level, backend=backend)
        torch.testing.assert_close(self.part_of_image(out0, batch_idx, 0), self.part_of_image(out, batch_idx, 0),
                                   rtol=1e-12, atol=1e-12)

    # -- the raw op: both average modes ------------------------------------------------------------------------

    @KERNELS
    @pytest.mark.parametrize("average", [True, False])
    def test_raw_op(self, device, backend, average, case):
        boxes, batch_idx, b, c, image_size, level = box_case(case)
        boxes, batch_idx = boxes.to(device), batch_idx.to(device)
        x = self.make_input(b, c, level, boxes.shape[0], torch.float64, device, requires_grad=True)
        got = self.run_raw(backend, x, boxes, batch_idx, image_size, b, level, average)
        expected = self.oracle(x, boxes, batch_idx, image_size, b, level, average)
        torch.testing.assert_close(got.detach().cpu(), expected.detach(), rtol=1e-10, atol=1e-10)
        upstream = torch.randn_like(got)
        got.backward(upstream)
        ref = x.detach().cpu().requires_grad_(True)
        (self.oracle(ref, boxes, batch_idx, image_size, b, level, average) * upstream.cpu()).sum().backward()
        torch.testing.assert_close(x.grad.cpu(), ref.grad, rtol=1e-10, atol=1e-10)

    # -- gradcheck, opcheck, determinism, fuzzing ----------------------------------------------------------------

    @DEVICE_BACKEND
    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_gradcheck(self, device, backend, seed):
        g = torch.Generator().manual_seed(seed)
        image_size, b, level = (20, 28), 2, (5, 7)
        boxes = random_boxes(6, image_size, level, generator=g).to(device)
        batch_idx = random_batch_idx(6, b, generator=g).to(device)
        x = torch.randn(self.in_shape(b, 3, level, 6), dtype=torch.float64, generator=g).to(device).requires_grad_(True)
        fn = lambda v: self.call(v, boxes, batch_idx, image_size, b, level, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))  # the backward (the adjoint op) is differentiable too

    @KERNELS
    @pytest.mark.parametrize("average", [True, False])
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_opcheck(self, device, backend, layout, average):
        """Schema, fake kernel, autograd registration and aot dispatch, with a box-free sample, a 1x1 map and
        (channels_last) a map wide enough for the channel blocks."""
        g = torch.Generator().manual_seed(3 if layout == "contiguous" else 5)
        samples = {"contiguous": [((2, 3, 5, 7), 6), ((1, 2, 4, 4), 0), ((1, 1, 1, 1), 2), ((3, 4, 6, 3), 9)],
                   "channels_last": [((2, WIDE, 5, 7), 6), ((1, 3, 4, 4), 3), ((2, 4, 3, 6), 5)]}[layout]
        for (b, c, h, w), n in samples:
            boxes = random_boxes(n, (4 * h, 4 * w), (h, w), generator=g).to(device=device, dtype=torch.float32)
            batch_idx = random_batch_idx(n, b, generator=g).to(device)
            x = self.make_input(b, c, (h, w), n, torch.float32, device, layout, requires_grad=True)
            args = (x, boxes, batch_idx,
                    *self.raw_args(x, boxes, batch_idx, (4 * h, 4 * w), b, (h, w), average, layout))
            index = self.host_index(boxes, batch_idx, (4 * h, 4 * w), b, (h, w), device)
            torch.library.opcheck(raw_op(self.op, backend).default, args)
            torch.library.opcheck(raw_op(self.op, backend).default, (*args, index.tensor))

    @pytest.mark.parametrize("backend", [b for b in all_backends_on("cpu") if b != "reference"])
    def test_deterministic_across_runs_and_threads(self, backend):
        boxes, batch_idx, b, _, image_size, level = box_case("many")
        x = self.make_input(b, 16, level, boxes.shape[0], torch.float32, "cpu", requires_grad=True)
        upstream = torch.randn(self.out_shape(b, 16, level, boxes.shape[0]))

        def run():
            x.grad = None
            out = self.call(x, boxes, batch_idx, image_size, b, level, backend=backend)
            out.backward(upstream)
            return out.detach().clone(), x.grad.clone()

        first = same_bits_across_runs_and_threads(run)
        expected = self.oracle(x, boxes, batch_idx, image_size, b, level)
        assert_close_to_oracle(first[0], expected, torch.float32, value_scale(expected), "2 threads")

    @given(data=st.data())
    @settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
    def test_fuzz_backends_agree(self, data):
        boxes, batch_idx, b, c, image_size, level = draw_box_problem(data)
        x = self.make_input(b, c, level, boxes.shape[0], torch.float64, "cpu")
        expected = self.oracle(x, boxes, batch_idx, image_size, b, level)
        for backend in all_backends_on("cpu"):
            got = self.call(x, boxes, batch_idx, image_size, b, level, backend=backend)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"{backend}: {m}")

    # -- torch.compile (deselect with -m "not compile") ---------------------------------------------------------

    @pytest.mark.compile
    @KERNELS
    @pytest.mark.parametrize("api", ["raw_op", "public_api", "public_api_with_index"])
    def test_compile(self, device, backend, api):
        """torch.compile(fullgraph=True) of the raw op in both modes, and of the public op (with a BoxIndex too)."""
        boxes, batch_idx, b, c, image_size, level = box_case("mixed")
        boxes, batch_idx = boxes.to(device), batch_idx.to(device)
        x = self.make_input(b, c, level, boxes.shape[0], torch.float32, device)
        index = self.host_index(boxes, batch_idx, image_size, b, level, device) if api.endswith("index") else None

        def fn(v):
            if api.startswith("public_api"):
                out = self.call(v * 2.0, boxes, batch_idx, image_size, b, level, backend=backend, index=index)
                return out.square().sum()
            mean = self.run_raw(backend, v * 2.0, boxes, batch_idx, image_size, b, level, True)
            total = self.run_raw(backend, v, boxes, batch_idx, image_size, b, level, False)
            return (mean.square() + total.sin()).sum()

        assert_compiled_matches_eager(fn, [x])

    # -- wide maps: the kernels' channel blocks in both layouts -------------------------------------------------

    @DEVICE_BACKEND
    @pytest.mark.parametrize("case", ["mixed", "many", "grid_odd", "empty_image"])
    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                             ids=lambda d: DTYPE_IDS[d])
    def test_wide_maps_match_oracle(self, device, backend, case, layout, dtype):
        boxes, batch_idx, b, image_size, level, x = self.case_on(case, dtype, device, WIDE, layout, True)
        out = self.call(x, boxes, batch_idx, image_size, b, level, layout, backend)
        ref_x = self.as_reference(x)
        expected = self.oracle(ref_x, boxes, batch_idx, image_size, b, level)
        assert_close_to_oracle(out, expected, dtype, value_scale(expected), f"{backend} {case} {layout}")
        fmt = MEMORY_FORMAT[layout]
        assert self.map_of(x, out).is_contiguous(memory_format=fmt)
        upstream = torch.randn(out.shape, dtype=torch.float64)
        out.backward(upstream.to(device=device, dtype=dtype).contiguous(memory_format=fmt if out.dim() == 4 else
                                                                          torch.contiguous_format))
        (expected * upstream).sum().backward()
        assert_close_to_oracle(x.grad, ref_x.grad, dtype, value_scale(ref_x.grad), f"{backend} {case} {layout} grad")
        if x.dim() == 4 and backend != "reference":
            assert x.grad.is_contiguous(memory_format=fmt)  # pool's gradient keeps the features' layout

    @DEVICE_BACKEND
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
    def test_few_wide_boxes_on_a_large_map(self, device, backend, dtype):
        """Few boxes, most spanning the map: the CPU kernels' one-plane blocks with event rows through the
        segmented row scan (more than one whole-width box starts or ends on a row)."""
        g = torch.Generator().manual_seed(11)
        b, c, image_size, level = 2, 3, (384, 800), (48, 100)
        boxes = random_boxes(8, image_size, level, kinds=("whole", "huge", "normal"), generator=g)
        boxes = boxes.to(device=device, dtype=dtype)
        batch_idx = random_batch_idx(8, b, generator=g).to(device)
        x = self.make_input(b, c, level, 8, dtype, device, requires_grad=True)
        out = self.call(x, boxes, batch_idx, image_size, b, level, backend=backend)
        ref_x = self.as_reference(x)
        expected = self.oracle(ref_x, boxes, batch_idx, image_size, b, level)
        assert_close_to_oracle(out, expected, dtype, value_scale(expected), f"{backend} wide boxes")
        upstream = torch.randn(out.shape, dtype=torch.float64)
        out.backward(upstream.to(device=device, dtype=dtype))
        (expected * upstream).sum().backward()
        assert_close_to_oracle(x.grad, ref_x.grad, dtype, value_scale(ref_x.grad), f"{backend} wide boxes grad")

    @DEVICE_BACKEND
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_non_finite_in_a_channel_block(self, device, backend, layout):
        """A NaN stays with the boxes reading it (pool) / the cells of its box (fill) in wide blocks too."""
        boxes, batch_idx, b, _, image_size, level = box_case("mixed")
        x = self.make_input(b, WIDE, level, boxes.shape[0], torch.float32, device, layout)
        with torch.no_grad():
            self.poison(x, batch_idx, (33, 5))
        out = self.call(x, boxes.to(device), batch_idx.to(device), image_size, b, level, layout, backend)
        expected = self.oracle(x, boxes, batch_idx, image_size, b, level)
        assert not expected.isfinite().all()
        self.assert_non_finite_close(out, expected)

    @pytest.mark.parametrize("threads", [1, 8])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
    def test_wide_channels_last_blocks_match_oracle(self, threads, dtype):
        """139 channels_last channels: one 128-channel CPU block and 11 single channels on 1 thread (the wide
        blocks), 32-channel blocks when the threads outnumber the wide blocks; both against the oracle."""
        import lgd_ops

        if "cpu" not in lgd_ops.available_backends():
            pytest.skip("no CPU kernels")
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            boxes, batch_idx, b, image_size, level, x = self.case_on("many", dtype, "cpu", 139, "channels_last", True)
            out = self.call(x, boxes, batch_idx, image_size, b, level, "channels_last", "cpu")
            ref_x = self.as_reference(x)
            expected = self.oracle(ref_x, boxes, batch_idx, image_size, b, level)
            assert_close_to_oracle(out, expected, dtype, value_scale(expected), f"{threads} threads")
            upstream = torch.randn(out.shape, dtype=torch.float64)
            out.backward(upstream.to(dtype).contiguous(memory_format=torch.channels_last if out.dim() == 4 else
                                                       torch.contiguous_format))
            (expected * upstream).sum().backward()
            assert_close_to_oracle(x.grad, ref_x.grad, dtype, value_scale(ref_x.grad), f"{threads} threads grad")
        finally:
            torch.set_num_threads(before)

    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
    def test_few_events_for_the_size_match_oracle(self, layout, dtype):
        """A 48 x 40 level with one box per image: under one event per 512 cells, where the CPU kernels keep
        column sums (one plane per NCHW block; channels_last blocks without integral rows) instead of the
        paths the small BOX_CASES levels take; forward and backward against the oracle."""
        import lgd_ops

        if "cpu" not in lgd_ops.available_backends():
            pytest.skip("no CPU kernels")
        boxes = torch.tensor([[10.0, 20.0, 300.0, 350.0], [33.0, 5.0, 190.0, 370.0]], dtype=box_dtype_for(dtype))
        batch_idx, image_size, level = torch.tensor([0, 1]), (384, 320), (48, 40)
        x = self.make_input(2, WIDE, level, 2, dtype, "cpu", layout, True)
        out = self.call(x, boxes, batch_idx, image_size, 2, level, layout, "cpu")
        ref_x = self.as_reference(x)
        expected = self.oracle(ref_x, boxes, batch_idx, image_size, 2, level)
        assert_close_to_oracle(out, expected, dtype, value_scale(expected), layout)
        upstream = torch.randn(out.shape, dtype=torch.float64)
        out.backward(upstream.to(dtype).contiguous(memory_format=MEMORY_FORMAT[layout] if out.dim() == 4 else
                                                   torch.contiguous_format))
        (expected * upstream).sum().backward()
        assert_close_to_oracle(x.grad, ref_x.grad, dtype, value_scale(ref_x.grad), f"{layout} grad")

    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
    def test_cpu_instruction_sets_agree(self, layout, dtype):
        """The CPU kernels' AVX2 and baseline copies (LGD_OPS_CPU_ISA=base) give the same bits (the AVX2 copy
        transposes 8-plane NCHW blocks with intrinsics, rounding float -> bfloat16 itself)."""
        same_bits_in_both_cpu_isas(
            "import sys, torch, lgd_ops; sys.path.insert(0, 'tests'); from conftest import box_case, make_features\n"
            "torch.manual_seed(0); boxes, idx, b, _, size, level = box_case('many')\n"
            f"x = make_features((b, {WIDE}, *level), torch.{dtype}, 'cpu', layout='{layout}')\n"
            f"e = torch.randn(boxes.shape[0], x.shape[1]).to(torch.{dtype})\n"
            "pooled = lgd_ops.box_pool(x, boxes, idx, size, backend='cpu')\n"
            "filled = lgd_ops.box_fill(e, boxes, idx, size, (b, *level), backend='cpu')\n"
            "torch.save([pooled, filled], sys.argv[1])\n")
