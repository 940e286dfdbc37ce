"""mask_pool / mask_fill (docs/method.md §7, Mask R-CNN variant): dense masks nearest-resized to the level.

Reference-only ops: checked against the float64 loop oracle, and against box_pool / box_fill when the masks
are the boxes' own level masks.
"""
import pytest
import torch

import lgd_ops
from conftest import (
    assert_close_to_oracle,
    box_case,
    DTYPES,
    make_features,
    oracle_mask_fill,
    oracle_mask_pool,
    oracle_masks,
    random_batch_idx,
    value_scale,
)

DEVICES = pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available"))])

# name -> (B, C, level (H, W), mask size (Hm, Wm), N, images left without objects)
CASES = {
    "same_size": (2, 3, (8, 10), (8, 10), 7, ()),
    "downsample_x8": (2, 3, (8, 10), (64, 80), 9, ()),
    "odd_ratio": (3, 2, (5, 7), (37, 53), 11, ()),
    "float32_scale": (1, 2, (22, 44), (26, 52), 4, ()),  # ratios where F.interpolate's float32 scale matters
    "upsample": (2, 2, (8, 10), (3, 4), 6, ()),
    "map_1x1": (2, 3, (1, 1), (16, 16), 6, ()),
    "empty_image": (3, 2, (4, 6), (32, 48), 5, (0, 2)),
    "no_objects": (2, 3, (4, 6), (32, 48), 0, ()),
    "one_object": (1, 4, (6, 5), (48, 40), 1, ()),
}


def random_masks(n, size, kind="bool"):
    """[N, Hm, Wm] masks: random blobs (rectangles, noise, empty and full masks mixed in)."""
    hm, wm = size
    masks = torch.rand(n, hm, wm) < torch.rand(n, 1, 1)  # noise of varying density
    for k in range(n):
        style = k % 4
        if style == 0:  # a rectangle
            y0, x0 = torch.randint(0, hm, (1,)).item(), torch.randint(0, wm, (1,)).item()
            masks[k] = False
            masks[k, y0 : y0 + 1 + torch.randint(0, hm, (1,)).item(), x0 : x0 + 1 + torch.randint(0, wm, (1,)).item()] = True
        elif style == 1 and k > 3:
            masks[k] = False  # empty mask
        elif style == 2 and k > 3:
            masks[k] = True
    if kind == "bool":
        return masks
    if kind == "uint8":
        return masks.to(torch.uint8)
    if kind == "float":
        return masks.to(torch.float32)
    if kind == "soft":  # probabilities: inside iff > 0.5
        return torch.where(masks, torch.rand(n, hm, wm) * 0.49 + 0.51, torch.rand(n, hm, wm) * 0.5)
    raise ValueError(kind)


def _inputs(case, dtype, device, mask_kind="bool"):
    b, c, level, msize, n, empty = CASES[case]
    masks = random_masks(n, msize, mask_kind).to(device)
    batch_idx = random_batch_idx(n, b, empty_images=empty).to(device)
    return masks, batch_idx, b, c, level


@DEVICES
@pytest.mark.parametrize("case", list(CASES))
@DTYPES
def test_mask_pool_matches_oracle(device, case, dtype):
    masks, batch_idx, b, c, level = _inputs(case, dtype, device)
    features = make_features((b, c, *level), dtype, device, requires_grad=True)
    got = lgd_ops.mask_pool(features, masks, batch_idx)
    expected = oracle_mask_pool(features, masks, batch_idx)
    assert got.shape == (masks.shape[0], c)
    assert_close_to_oracle(got, expected, dtype, value_scale(expected), case)
    upstream = torch.randn(masks.shape[0], c, dtype=torch.float64).to(device=device, dtype=dtype)
    got.backward(upstream)
    ref = features.detach().to(torch.float64).cpu().requires_grad_(True)
    (oracle_mask_pool(ref, masks, batch_idx) * upstream.cpu().double()).sum().backward()
    assert_close_to_oracle(features.grad, ref.grad, dtype, value_scale(ref.grad), f"{case} grad")


@DEVICES
@pytest.mark.parametrize("case", list(CASES))
@DTYPES
def test_mask_fill_matches_oracle(device, case, dtype):
    masks, batch_idx, b, c, level = _inputs(case, dtype, device)
    emb = torch.randn(masks.shape[0], c, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_(True)
    got = lgd_ops.mask_fill(emb, masks, batch_idx, (b, *level))
    expected = oracle_mask_fill(emb, masks, batch_idx, (b, *level))
    assert got.shape == (b, c, *level)
    assert_close_to_oracle(got, expected, dtype, value_scale(expected), case)
    upstream = torch.randn(b, c, *level, dtype=torch.float64).to(device=device, dtype=dtype)
    got.backward(upstream)
    ref = emb.detach().to(torch.float64).cpu().requires_grad_(True)
    (oracle_mask_fill(ref, masks, batch_idx, (b, *level)) * upstream.cpu().double()).sum().backward()
    assert_close_to_oracle(emb.grad, ref.grad, dtype, value_scale(ref.grad), f"{case} grad")


@DEVICES
@pytest.mark.parametrize("mask_kind", ["uint8", "float", "soft"])
def test_mask_encodings(device, mask_kind):
    """bool, 0/1 integer, 0/1 float and soft (> 0.5 inside) masks of one shape give the same result."""
    masks, batch_idx, b, c, level = _inputs("odd_ratio", torch.float64, device, mask_kind)
    features = make_features((b, c, *level), torch.float64, device)
    emb = torch.randn(masks.shape[0], c, dtype=torch.float64, device=device)
    as_bool = masks > 0.5
    torch.testing.assert_close(lgd_ops.mask_pool(features, masks, batch_idx),
                               lgd_ops.mask_pool(features, as_bool, batch_idx), rtol=0, atol=0)
    torch.testing.assert_close(lgd_ops.mask_fill(emb, masks, batch_idx, (b, *level)),
                               lgd_ops.mask_fill(emb, as_bool, batch_idx, (b, *level)), rtol=0, atol=0)
    torch.testing.assert_close(lgd_ops.mask_pool(features, masks, batch_idx).cpu(),
                               oracle_mask_pool(features, masks, batch_idx))


@DEVICES
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_mask_pool_memory_layouts(device, layout):
    masks, batch_idx, b, c, level = _inputs("downsample_x8", torch.float32, device)
    features = make_features((b, c, *level), torch.float32, device, layout=layout, requires_grad=True)
    got = lgd_ops.mask_pool(features, masks, batch_idx)
    assert_close_to_oracle(got, oracle_mask_pool(features, masks, batch_idx), torch.float32, 1.0, layout)
    got.sum().backward()
    ref = features.detach().double().cpu().requires_grad_(True)
    oracle_mask_pool(ref, masks, batch_idx).sum().backward()
    assert_close_to_oracle(features.grad, ref.grad, torch.float32, 1.0, f"{layout} grad")


@DEVICES
@pytest.mark.parametrize("case", ["mixed", "grid_odd", "empty_image", "no_boxes", "map_1x1"])
def test_box_masks_at_level_size_agree_with_box_ops(device, case):
    """Masks already at the level size need no resize: mask_pool/mask_fill with the boxes' own level masks
    must equal box_pool/box_fill (the two paths of the appearance encoder and the knowledge mapper)."""
    boxes, batch_idx, b, c, image_size, level = box_case(case)
    boxes, batch_idx = boxes.to(device), batch_idx.to(device)
    masks = oracle_masks(boxes, image_size, *level).to(device) > 0.5
    features = make_features((b, c, *level), torch.float64, device)
    emb = torch.randn(boxes.shape[0], c, dtype=torch.float64, device=device)
    torch.testing.assert_close(lgd_ops.mask_pool(features, masks, batch_idx),
                               lgd_ops.box_pool(features, boxes, batch_idx, image_size))
    torch.testing.assert_close(lgd_ops.mask_fill(emb, masks, batch_idx, (b, *level)),
                               lgd_ops.box_fill(emb, boxes, batch_idx, image_size, (b, *level)))


@DEVICES
@pytest.mark.parametrize("seed", [0, 1])
def test_gradcheck(device, seed):
    g = torch.Generator().manual_seed(seed)
    masks = (torch.rand(5, 12, 14, generator=g) < 0.4).to(device)
    batch_idx = torch.randint(0, 2, (5,), generator=g).to(device)
    features = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g).to(device).requires_grad_(True)
    emb = torch.randn(5, 3, dtype=torch.float64, generator=g).to(device).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: lgd_ops.mask_pool(f, masks, batch_idx), (features,))
    assert torch.autograd.gradcheck(lambda e: lgd_ops.mask_fill(e, masks, batch_idx, (2, 4, 5)), (emb,))


def test_nearest_source_index_matches_interpolate():
    """The oracle's resize rule is F.interpolate(mode="nearest")'s, checked on the sizes the tests use."""
    from conftest import nearest_source_index

    for in_size, out_size in [(64, 8), (37, 5), (53, 7), (26, 22), (52, 44), (3, 8), (4, 10), (16, 1), (6, 74)]:
        src = torch.arange(in_size, dtype=torch.float32).reshape(1, 1, in_size, 1)
        got = torch.nn.functional.interpolate(src, size=(out_size, 1), mode="nearest").flatten().long().tolist()
        assert got == [nearest_source_index(j, in_size, out_size) for j in range(out_size)], (in_size, out_size)
