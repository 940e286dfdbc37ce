"""The op-test base shared by box_pool and box_fill (as torchvision's RoIOpTester): test_box_pool.py and
test_box_fill.py each subclass BoxOpTests with their op's forward, oracle and map argument, and pytest
collects the inherited tests once per op.

These cover what both ops share: every backend against the float64 oracles on maps wide enough for the
kernels' channel blocks (40 channels: NCHW blocks of 8 planes, channels_last blocks of 32 channels plus single
channels), NCHW and channels_last in every dtype, the layout of the result (box_fill writes the memory format
it is asked for; box_pool's gradient keeps the features' layout), non-finite values in a channel block, the
CPU kernels' AVX2 and baseline copies, validate=False, and opcheck with channels_last.
"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import (
    assert_close_to_oracle,
    box_case,
    box_dtype_for,
    DEVICE_BACKEND,
    DTYPE_IDS,
    KERNELS,
    make_features,
    oracle_box_fill,
    oracle_box_pool,
    random_batch_idx,
    random_boxes,
    raw_op,
    value_scale,
)

import lgd_ops

WIDE = 40  # channels: 5 NCHW blocks of 8, one channels_last block of 32 + 8 single channels
LAYOUTS = ("contiguous", "channels_last")
MEMORY_FORMAT = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


class BoxOpTests:
    """Subclasses set `op` ("box_pool" or "box_fill")."""

    op = None

    # -- the op, its input and its oracle ----------------------------------------------------------------------

    def make_input(self, b, c, level, n, dtype, device, layout, requires_grad=False):
        if self.op == "box_pool":
            return make_features((b, c, *level), dtype, device, layout=layout, requires_grad=requires_grad)
        x = torch.randn(n, c, dtype=torch.float64).to(device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)

    def call(self, x, boxes, batch_idx, image_size, b, level, layout, backend, **kw):
        if self.op == "box_pool":
            return lgd_ops.box_pool(x, boxes, batch_idx, image_size, backend=backend, **kw)
        return lgd_ops.box_fill(x, boxes, batch_idx, image_size, (b, *level), memory_format=MEMORY_FORMAT[layout],
                                backend=backend, **kw)

    def oracle(self, x, boxes, batch_idx, image_size, b, level):
        if self.op == "box_pool":
            return oracle_box_pool(x, boxes, batch_idx, image_size)
        return oracle_box_fill(x, boxes, batch_idx, image_size, (b, *level))

    def map_of(self, x, out):
        """The [B, C, H, W] tensor of the call: the features (pool) or the painted output (fill)."""
        return x if self.op == "box_pool" else out

    # -- tests ---------------------------------------------------------------------------------------------------

    @DEVICE_BACKEND
    @pytest.mark.parametrize("case", ["mixed", "many", "grid_odd", "empty_image"])
    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                             ids=lambda d: DTYPE_IDS[d])
    def test_wide_maps_match_oracle(self, device, backend, case, layout, dtype):
        boxes, batch_idx, b, _, image_size, level = box_case(case)
        boxes = boxes.to(device=device, dtype=box_dtype_for(dtype))
        batch_idx = batch_idx.to(device)
        x = self.make_input(b, WIDE, level, boxes.shape[0], dtype, device, layout, requires_grad=True)
        out = self.call(x, boxes, batch_idx, image_size, b, level, layout, backend)
        ref_x = x.detach().to(torch.float64).cpu().requires_grad_(True)
        expected = self.oracle(ref_x, boxes, batch_idx, image_size, b, level)
        assert_close_to_oracle(out, expected, dtype, value_scale(expected), f"{backend} {case} {layout}")
        fmt = MEMORY_FORMAT[layout]
        assert self.map_of(x, out).is_contiguous(memory_format=fmt)
        upstream = torch.randn(out.shape, dtype=torch.float64)
        out.backward(upstream.to(device=device, dtype=dtype).contiguous(memory_format=fmt if out.dim() == 4 else
                                                                          torch.contiguous_format))
        (expected * upstream).sum().backward()
        assert_close_to_oracle(x.grad, ref_x.grad, dtype, value_scale(ref_x.grad), f"{backend} {case} {layout} grad")
        if self.op == "box_pool" and layout == "channels_last" and backend != "reference":
            assert x.grad.is_contiguous(memory_format=torch.channels_last)  # the gradient keeps the layout

    @DEVICE_BACKEND
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_non_finite_in_a_channel_block(self, device, backend, layout):
        """A NaN stays with the boxes reading it (pool) / the cells of its box (fill) in wide blocks too."""
        boxes, batch_idx, b, _, image_size, level = box_case("mixed")
        x = self.make_input(b, WIDE, level, boxes.shape[0], torch.float32, device, layout)
        with torch.no_grad():
            if self.op == "box_pool":
                x[0, 33, 2, 3] = float("nan")
                x[0, 5, 4, 4] = float("inf")
            else:
                x[int((batch_idx == 0).nonzero()[0]), 33] = float("nan")
                x[int((batch_idx == 0).nonzero()[1]), 5] = float("inf")
        out = self.call(x, boxes.to(device), batch_idx.to(device), image_size, b, level, layout, backend)
        expected = self.oracle(x, boxes, batch_idx, image_size, b, level)
        finite = expected.isfinite()
        assert not finite.all()
        torch.testing.assert_close(out.cpu().double(), expected, equal_nan=True, rtol=1e-5,
                                   atol=1e-5 * value_scale(expected[finite]))

    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_cpu_instruction_sets_agree(self, layout):
        """The CPU kernels' AVX2 and baseline copies (LGD_OPS_CPU_ISA=base) give the same bits."""
        if "cpu" not in lgd_ops.available_backends():
            pytest.skip("no CPU kernels")
        script = (
            "import sys, torch, lgd_ops; sys.path.insert(0, 'tests'); from conftest import box_case, make_features\n"
            "torch.manual_seed(0); boxes, idx, b, _, size, level = box_case('many')\n"
            f"x = make_features((b, {WIDE}, *level), torch.float32, 'cpu', layout='{layout}')\n"
            "e = torch.randn(boxes.shape[0], x.shape[1])\n"
            "pooled = lgd_ops.box_pool(x, boxes, idx, size, backend='cpu')\n"
            "filled = lgd_ops.box_fill(e, boxes, idx, size, (b, *level), backend='cpu')\n"
            "torch.save([pooled, filled], sys.argv[1])\n")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        results = []
        for isa, name in (("", "default"), ("base", "base")):
            path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"lgd_isa_{os.getpid()}_{name}.pt")
            env = dict(os.environ, LGD_OPS_CPU_ISA=isa)
            subprocess.run([sys.executable, "-c", script, path], check=True, cwd=root, env=env)
            results.append(torch.load(path))
            os.remove(path)
        for a, b in zip(*results):
            assert torch.equal(a, b)

    @KERNELS
    def test_validate_false_gives_the_same_result(self, device, backend):
        boxes, batch_idx, b, _, image_size, level = box_case("mixed")
        boxes, batch_idx = boxes.to(device), batch_idx.to(device)
        x = self.make_input(b, WIDE, level, boxes.shape[0], torch.float32, device, "contiguous")
        checked = self.call(x, boxes, batch_idx, image_size, b, level, "contiguous", backend)
        trusted = self.call(x, boxes, batch_idx, image_size, b, level, "contiguous", backend, validate=False)
        torch.testing.assert_close(trusted, checked, rtol=0, atol=0)
        bad = boxes.clone()
        bad[0] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            self.call(x, bad, batch_idx, image_size, b, level, "contiguous", backend)
        self.call(x, bad, batch_idx, image_size, b, level, "contiguous", backend, validate=False)  # covers nothing

    @KERNELS
    @pytest.mark.parametrize("average", [True, False])
    def test_opcheck_channels_last(self, device, backend, average):
        g = torch.Generator().manual_seed(5)
        for (b, c, h, w), n in [((2, WIDE, 5, 7), 6), ((1, 3, 4, 4), 3)]:
            boxes = random_boxes(n, (4 * h, 4 * w), (h, w), generator=g).to(device=device, dtype=torch.float32)
            batch_idx = random_batch_idx(n, b, generator=g).to(device)
            if self.op == "box_pool":
                x = make_features((b, c, h, w), torch.float32, device, layout="channels_last", requires_grad=True)
                args = (x, boxes, batch_idx, 4 * h, 4 * w, average)
            else:
                x = torch.randn(n, c, generator=g).to(device).requires_grad_(True)
                args = (x, boxes, batch_idx, 4 * h, 4 * w, b, h, w, average, True)
            torch.library.opcheck(raw_op(self.op, backend).default, args)
