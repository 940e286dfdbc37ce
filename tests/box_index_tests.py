"""The level-index tests box_pool and box_fill share (lgd_ops.box_index, docs/method.md §1), run through the op
hooks of tests/box_op_base.py's BoxOpTests, which inherits them: the same bits with and without an index on every
backend, an index of another call refused (by the public op, and by its size alone in the raw op), an index
trusted (no box value read), gradcheck through it. opcheck with an index runs in BoxOpTests.test_opcheck."""
import pytest
import torch

import lgd_ops
from conftest import DEVICE_BACKEND, KERNELS, random_batch_idx, random_boxes

WIDE = 40  # channels: 5 NCHW blocks of 8, one channels_last block of 32 + 8 single channels


class BoxIndexTests:
    """Mixed into BoxOpTests; uses its hooks (call, run_raw, case_on, out_shape, in_shape)."""

    def host_index(self, boxes, batch_idx, image_size, b, level, device):
        """The BoxIndex of the boxes built on the host from CPU copies, moved to `device` as a training step does."""
        return lgd_ops.box_index(boxes.cpu(), batch_idx.cpu(), image_size, b, level).to(device, non_blocking=True)

    @DEVICE_BACKEND
    @pytest.mark.parametrize("case", ["mixed", "outside", "degenerate", "empty_image", "no_boxes", "map_1x1",
                                      "upsampled", "many"])
    @pytest.mark.parametrize("layout,dtype", [("contiguous", torch.float32), ("channels_last", torch.float32),
                                              ("contiguous", torch.float16), ("channels_last", torch.bfloat16)],
                             ids=["nchw-fp32", "cl-fp32", "nchw-fp16", "cl-bf16"])
    def test_index_gives_the_same_bits(self, device, backend, case, layout, dtype):
        """With a BoxIndex built on the host the op gives bitwise the output and gradient it gives building the
        index itself, on fresh random boxes (empty, degenerate and past-edge ones, images without boxes)."""
        boxes, batch_idx, b, image_size, level, x = self.case_on(case, dtype, device, WIDE, layout, requires_grad=True)
        index = self.host_index(boxes, batch_idx, image_size, b, level, device)
        upstream = torch.randn(self.out_shape(b, WIDE, level, boxes.shape[0]), dtype=torch.float64)
        upstream = upstream.to(device=device, dtype=dtype)

        def run(**kw):
            x.grad = None
            out = self.call(x, boxes, batch_idx, image_size, b, level, layout, backend, **kw)
            out.backward(upstream)
            return out.detach(), x.grad

        (out, grad), (ref_out, ref_grad) = run(index=index), run()
        assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)

    @KERNELS
    def test_index_of_another_call_is_refused(self, device, backend):
        """An index built for other boxes, images or level: the public op names what differs, the raw op refuses
        one of another batch by its size alone (no value read)."""
        boxes, batch_idx, b, image_size, level, x = self.case_on("mixed", torch.float32, device)
        other = {"num_boxes": self.host_index(boxes[1:], batch_idx[1:], image_size, b, level, device),
                 "num_images": self.host_index(boxes, batch_idx, image_size, b + 1, level, device),
                 "image_size": self.host_index(boxes, batch_idx, (image_size[0] + 8, image_size[1]), b, level, device),
                 "level_size": self.host_index(boxes, batch_idx, image_size, b, (level[0], level[1] + 1), device)}
        for what, index in other.items():
            with pytest.raises(ValueError, match=f"index was built for another call: {what} "):
                self.call(x, boxes, batch_idx, image_size, b, level, backend=backend, index=index)
        with pytest.raises(ValueError, match="index must be an lgd_ops.BoxIndex"):
            self.call(x, boxes, batch_idx, image_size, b, level, backend=backend, index=other["num_boxes"].tensor)
        for what in ("num_boxes", "num_images"):
            with pytest.raises(RuntimeError, match="index must be a level index of"):
                self.run_raw(backend, x, boxes, batch_idx, image_size, b, level, True, other[what].tensor)
        index = self.host_index(boxes, batch_idx, image_size, b, level, device).tensor
        for bad, message in ((index.long(), "int32"), (index.reshape(1, -1), "level index of"),
                             (torch.stack([index, index], 1)[:, 0], "contiguous")):
            with pytest.raises(RuntimeError, match=message):
                self.run_raw(backend, x, boxes, batch_idx, image_size, b, level, True, bad)

    @KERNELS
    def test_index_is_trusted(self, device, backend):
        """Given an index the op reads no box value: NaN boxes raise without one, and with one the op follows the
        index (built from the good boxes; the check was made when it was built)."""
        boxes, batch_idx, b, image_size, level, x = self.case_on("mixed", torch.float32, device, WIDE)
        index = self.host_index(boxes, batch_idx, image_size, b, level, device)
        bad = boxes.clone()
        bad[0] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            self.call(x, bad, batch_idx, image_size, b, level, backend=backend)
        expected = self.call(x, boxes, batch_idx, image_size, b, level, backend=backend)
        assert torch.equal(self.call(x, bad, batch_idx, image_size, b, level, backend=backend, index=index), expected)

    @KERNELS
    def test_gradcheck_with_index(self, device, backend):
        g = torch.Generator().manual_seed(4)
        image_size, b, level = (20, 28), 2, (5, 7)
        boxes = random_boxes(6, image_size, level, generator=g).to(device)
        batch_idx = random_batch_idx(6, b, generator=g).to(device)
        index = self.host_index(boxes, batch_idx, image_size, b, level, device)
        x = torch.randn(self.in_shape(b, 3, level, 6), dtype=torch.float64, generator=g).to(device).requires_grad_(True)
        fn = lambda v: self.call(v, boxes, batch_idx, image_size, b, level, backend=backend, index=index)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))
