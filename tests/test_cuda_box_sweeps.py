"""The CUDA box kernels' level index argument and banded sweeps (csrc/box_pool/cuda, csrc/box_fill/cuda), through
the raw torch.ops.lgd_ops ops: with the caller's index (lgd_ops._boxes.level_index, built on the host) the
results are bit-identical to the ones with the index built on the device, identical run to run, equal in NCHW
and channels_last, and equal to the float64 reference on levels the sweeps split into many bands; a wrong index
is rejected; no images (B = 0) with boxes gives zeros. The banding arithmetic itself is proven on the CPU by
ctest (csrc/tests/test_box_sweeps.cpp). Skipped without CUDA."""
import pytest
import torch

from lgd_ops._boxes import level_index
from lgd_ops.box_fill import reference_box_fill
from lgd_ops.box_pool import reference_box_pool

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

IN_H, IN_W = 800, 1216


def _boxes(batch, per_image, seed):
    """Random boxes on the padded input plus one whole-image box per image (spans every band)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch * per_image, 2, generator=g) * torch.tensor([IN_W, IN_H])
    wh = torch.rand(batch * per_image, 2, generator=g) * torch.tensor([IN_W, IN_H]) / 2
    boxes = torch.cat([xy, xy + wh], dim=1)
    whole = torch.tensor([[0.0, 0.0, IN_W, IN_H]]).repeat(batch, 1)
    batch_idx = torch.cat([torch.arange(batch).repeat_interleave(per_image), torch.arange(batch)])
    return torch.cat([boxes, whole]).double(), batch_idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hw", [(100, 152), (13, 19), (7, 10), (200, 304)])
def test_pool_and_fill_with_and_without_index(hw, dtype):
    batch, channels = 2, 24
    boxes, batch_idx = _boxes(batch, 30, seed=hw[0])
    index = level_index(boxes, batch_idx, batch, IN_H, IN_W, *hw).cuda()
    x = torch.randn(batch, channels, *hw, dtype=dtype, device="cuda")
    bc, ic = boxes.cuda(), batch_idx.cuda()
    pooled = torch.ops.lgd_ops.box_pool(x, bc, ic, IN_H, IN_W, True, index)
    assert torch.equal(pooled, torch.ops.lgd_ops.box_pool(x, bc, ic, IN_H, IN_W, True))
    assert torch.equal(pooled, torch.ops.lgd_ops.box_pool(x, bc, ic, IN_H, IN_W, True, index))
    cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(pooled, torch.ops.lgd_ops.box_pool(cl, bc, ic, IN_H, IN_W, True, index))
    want = reference_box_pool(x.double().cpu(), boxes, batch_idx, (IN_H, IN_W))
    torch.testing.assert_close(pooled.double().cpu(), want, rtol=1e-5, atol=1e-5)

    values = torch.randn(boxes.shape[0], channels, dtype=dtype, device="cuda")
    filled = torch.ops.lgd_ops.box_fill(values, bc, ic, IN_H, IN_W, batch, *hw, True, False, index)
    assert torch.equal(filled, torch.ops.lgd_ops.box_fill(values, bc, ic, IN_H, IN_W, batch, *hw, True, False))
    filled_cl = torch.ops.lgd_ops.box_fill(values, bc, ic, IN_H, IN_W, batch, *hw, True, True, index)
    assert filled_cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(filled_cl, filled)
    want = reference_box_fill(values.double().cpu(), boxes, batch_idx, (IN_H, IN_W), (batch, *hw), True)
    torch.testing.assert_close(filled.double().cpu(), want, rtol=1e-5, atol=1e-5)


def test_nan_stays_with_its_boxes_across_bands():
    batch, hw = 1, (100, 152)
    boxes = torch.tensor([[0.0, 0.0, IN_W, IN_H], [0.0, 0.0, 100.0, 100.0], [600.0, 400.0, 1200.0, 790.0]]).double()
    batch_idx = torch.zeros(3, dtype=torch.int64)
    x = torch.ones(batch, 2, *hw, device="cuda")
    x[0, :, 60, 100] = float("nan")  # inside boxes 0 and 2 only
    out = torch.ops.lgd_ops.box_pool(x, boxes.cuda(), batch_idx.cuda(), IN_H, IN_W, False)
    assert out[0].isnan().all() and out[2].isnan().all() and out[1].isfinite().all()


def test_wrong_index_rejected_and_no_images():
    boxes, batch_idx = _boxes(2, 3, seed=0)
    x = torch.randn(2, 4, 20, 30, device="cuda")
    index = level_index(boxes, batch_idx, 2, IN_H, IN_W, 20, 30).cuda()
    with pytest.raises(RuntimeError, match="level index"):
        torch.ops.lgd_ops.box_pool(x, boxes.cuda(), batch_idx.cuda(), IN_H, IN_W, True, index[:-1])
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.lgd_ops.box_pool(x, boxes.cuda(), batch_idx.cuda(), IN_H, IN_W, True, index.long())
    with pytest.raises(RuntimeError, match="index must be on"):
        torch.ops.lgd_ops.box_pool(x, boxes.cuda(), batch_idx.cuda(), IN_H, IN_W, True, index.cpu())
    none = torch.ops.lgd_ops.box_pool(x[:0], boxes.cuda(), batch_idx.cuda(), IN_H, IN_W, True)
    assert none.shape == (boxes.shape[0], 4) and not none.any()
