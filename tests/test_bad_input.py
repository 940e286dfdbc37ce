"""Bad arguments: the public ops (and lgd_ops.box_index) raise ValueError naming the argument before any kernel
runs; the raw torch.ops.lgd_ops kernels raise RuntimeError (never crash) on bad shapes and corrupt level indices."""
import pytest
import torch

import lgd_ops
from conftest import all_backends_on
from lgd_ops._boxes import level_index

nan, inf = float("nan"), float("inf")
BACKENDS = pytest.mark.parametrize("backend", all_backends_on("cpu"))
HAS_KERNELS = "cpu" in lgd_ops.available_backends()
needs_kernels = pytest.mark.skipif(not HAS_KERNELS, reason="lgd_ops._C not built")


def _features(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype) if dtype.is_floating_point else torch.ones(*shape, dtype=dtype)


BOXES = torch.tensor([[0.0, 0.0, 8.0, 8.0], [1.0, 1.0, 5.0, 5.0]])
IDX = torch.tensor([0, 1])


def pool(features=None, boxes=None, batch_idx=None, image_size=(16, 20), backend="auto"):
    features = _features(2, 3, 4, 5) if features is None else features
    return lgd_ops.box_pool(features, BOXES if boxes is None else boxes, IDX if batch_idx is None else batch_idx,
                            image_size, backend=backend)


def fill(embeddings=None, boxes=None, batch_idx=None, image_size=(16, 20), output_size=(2, 4, 5), backend="auto"):
    embeddings = torch.randn(2, 3) if embeddings is None else embeddings
    return lgd_ops.box_fill(embeddings, BOXES if boxes is None else boxes, IDX if batch_idx is None else batch_idx,
                            image_size, output_size, backend=backend)


BOX_ARG_CASES = [
    # (id, keyword overrides, regex the message must match)
    ("boxes_1d", dict(boxes=torch.zeros(8)), r"boxes must have 2 dimensions"),
    ("boxes_n5", dict(boxes=torch.zeros(2, 5)), r"boxes must be \[N, 4\]"),
    ("boxes_int", dict(boxes=BOXES.long()), r"boxes must be float"),
    ("boxes_list", dict(boxes=[[0.0, 0.0, 8.0, 8.0]] * 2), r"boxes must be a torch.Tensor"),
    ("boxes_nan", dict(boxes=torch.tensor([[0.0, 0.0, 8.0, 8.0], [1.0, nan, 5.0, 5.0]])), r"boxes contain NaN or Inf"),
    ("boxes_inf", dict(boxes=torch.tensor([[0.0, 0.0, inf, 8.0], [1.0, 1.0, 5.0, 5.0]])), r"boxes contain NaN or Inf"),
    ("boxes_neg_inf", dict(boxes=torch.tensor([[-inf, 0.0, 8.0, 8.0], [1.0, 1.0, 5.0, 5.0]])), r"boxes contain NaN"),
    ("batch_idx_int32", dict(batch_idx=IDX.int()), r"batch_idx must be int64"),
    ("batch_idx_float", dict(batch_idx=IDX.float()), r"batch_idx must be int64"),
    ("batch_idx_2d", dict(batch_idx=IDX[:, None]), r"batch_idx must have 1 dimensions"),
    ("batch_idx_short", dict(batch_idx=IDX[:1]), r"batch_idx must have one entry per box \(2\), got 1"),
    ("batch_idx_too_big", dict(batch_idx=torch.tensor([0, 2])), r"batch_idx values must be in \[0, 2\).*max 2"),
    ("batch_idx_negative", dict(batch_idx=torch.tensor([-1, 0])), r"batch_idx values must be in \[0, 2\).*min -1"),
    ("image_size_zero", dict(image_size=(0, 20)), r"image_size must be 2 integers >= 1"),
    ("image_size_negative", dict(image_size=(16, -20)), r"image_size must be 2 integers >= 1"),
    ("image_size_short", dict(image_size=(16,)), r"image_size must be 2 integers"),
    ("image_size_long", dict(image_size=(1, 16, 20)), r"image_size must be 2 integers"),
    ("image_size_float", dict(image_size=(16.0, 20)), r"image_size must be 2 integers"),
    ("image_size_bool", dict(image_size=(True, 20)), r"image_size must be 2 integers"),
    ("image_size_none", dict(image_size=None), r"image_size must be 2 integers"),
]


@BACKENDS
@pytest.mark.parametrize("case,kwargs,match", BOX_ARG_CASES, ids=[c[0] for c in BOX_ARG_CASES])
def test_box_pool_bad_box_args(backend, case, kwargs, match):
    with pytest.raises(ValueError, match=r"^box_pool: .*" + match):
        pool(backend=backend, **kwargs)


@BACKENDS
@pytest.mark.parametrize("case,kwargs,match", BOX_ARG_CASES, ids=[c[0] for c in BOX_ARG_CASES])
def test_box_fill_bad_box_args(backend, case, kwargs, match):
    with pytest.raises(ValueError, match=r"^box_fill: .*" + match):
        fill(backend=backend, **kwargs)


@pytest.mark.parametrize("case,kwargs,match", BOX_ARG_CASES, ids=[c[0] for c in BOX_ARG_CASES])
def test_box_index_bad_box_args(case, kwargs, match):
    """The index checks the boxes once, where they are, as the ops do without one."""
    args = dict(boxes=BOXES, batch_idx=IDX, image_size=(16, 20), num_images=2, level_size=(4, 5))
    with pytest.raises(ValueError, match=r"^box_index: .*" + match):
        lgd_ops.box_index(**{**args, **kwargs})


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_images=-1), r"num_images must be an int >= 0"),
    (dict(num_images=2.0), r"num_images must be an int >= 0"),
    (dict(num_images=1), r"batch_idx values must be in \[0, 1\)"),
    (dict(level_size=(4,)), r"level_size must be 2 integers >= 0"),
    (dict(level_size=(4, -5)), r"level_size must be 2 integers >= 0"),
])
def test_box_index_bad_sizes(kwargs, match):
    args = dict(boxes=BOXES, batch_idx=IDX, image_size=(16, 20), num_images=2, level_size=(4, 5))
    with pytest.raises(ValueError, match=r"^box_index: .*" + match):
        lgd_ops.box_index(**{**args, **kwargs})


@BACKENDS
@pytest.mark.parametrize("features,match", [
    (_features(3, 4, 5), r"features must have 4 dimensions, got shape \(3, 4, 5\)"),
    (_features(1, 2, 3, 4, 5), r"features must have 4 dimensions"),
    (_features(2, 3, 4, 5, dtype=torch.int32), r"features must be float16/bfloat16/float32/float64, got torch.int32"),
    (_features(2, 3, 4, 5, dtype=torch.bool), r"features must be float"),
    (_features(2, 3, 4, 5).numpy(), r"features must be a torch.Tensor"),
], ids=["3d", "5d", "int", "bool", "numpy"])
def test_box_pool_bad_features(backend, features, match):
    with pytest.raises(ValueError, match=r"^box_pool: .*" + match):
        pool(features=features, backend=backend)


@BACKENDS
@pytest.mark.parametrize("kwargs,match", [
    (dict(embeddings=torch.randn(2, 3, 1)), r"embeddings must have 2 dimensions"),
    (dict(embeddings=torch.randn(6)), r"embeddings must have 2 dimensions"),
    (dict(embeddings=torch.ones(2, 3, dtype=torch.int64)), r"embeddings must be float"),
    (dict(embeddings=torch.randn(3, 3)), r"embeddings must have one row per box \(2\), got 3"),
    (dict(output_size=(2, 4)), r"output_size must be 3 integers >= 1"),
    (dict(output_size=(0, 4, 5)), r"output_size must be 3 integers >= 1"),
    (dict(output_size=(2, 0, 5)), r"output_size must be 3 integers >= 1"),
    (dict(output_size=(2, 4, -5)), r"output_size must be 3 integers >= 1"),
    (dict(output_size=(2, 4.0, 5)), r"output_size must be 3 integers"),
    (dict(output_size=torch.Size([2, 4])), r"output_size must be 3 integers"),
    (dict(output_size=(1, 4, 5)), r"batch_idx values must be in \[0, 1\)"),  # image 1 does not exist
], ids=["3d", "1d", "int", "rows", "size_short", "batch_0", "height_0", "width_neg", "float", "size2", "few_images"])
def test_box_fill_bad_args(backend, kwargs, match):
    with pytest.raises(ValueError, match=r"^box_fill: .*" + match):
        fill(backend=backend, **kwargs)


@BACKENDS
def test_box_ops_accept_torch_size_and_lists(backend):
    """The sizes may be any int sequence of the right length (tuple, list, torch.Size)."""
    pool(image_size=[16, 20], backend=backend)
    fill(image_size=torch.Size([16, 20]), output_size=[2, 4, 5], backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_box_ops_device_mismatch():
    with pytest.raises(ValueError, match=r"box_pool: tensors must be on one device"):
        pool(features=_features(2, 3, 4, 5).cuda(), backend="reference")
    with pytest.raises(ValueError, match=r"box_fill: tensors must be on one device"):
        fill(boxes=BOXES.cuda(), backend="reference")
    with pytest.raises(ValueError, match=r"normalized_mse: tensors must be on one device"):
        lgd_ops.normalized_mse([torch.randn(1, 2, 3, 3).cuda()], [torch.randn(1, 2, 3, 3)])


# ---------------------------------------------------------------------------------------------
# normalized_mse
# ---------------------------------------------------------------------------------------------

def _maps(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


NMSE_CASES = [
    ("tensor_and_list", lambda: (_maps(1, 2, 3, 3), [_maps(1, 2, 3, 3)]), r"both be tensors or both be lists"),
    ("list_and_tensor", lambda: ([_maps(1, 2, 3, 3)], _maps(1, 2, 3, 3)), r"both be tensors or both be lists"),
    ("empty_lists", lambda: ([], []), r"non-empty lists of equal length, got 0 and 0"),
    ("length_mismatch", lambda: ([_maps(1, 2, 3, 3)] * 2, [_maps(1, 2, 3, 3)]), r"equal length, got 2 and 1"),
    ("shape_mismatch", lambda: (_maps(1, 2, 3, 3), _maps(1, 2, 3, 4)),
     r"student\[0\] \(1, 2, 3, 3\) and teacher\[0\] \(1, 2, 3, 4\) must have one shape"),
    ("shape_mismatch_level1", lambda: ([_maps(1, 2, 3, 3), _maps(1, 2, 2, 2)], [_maps(1, 2, 3, 3), _maps(1, 3, 2, 2)]),
     r"student\[1\] .* and teacher\[1\] .* must have one shape"),
    ("student_3d", lambda: (_maps(2, 3, 3), _maps(2, 3, 3)), r"student\[0\] must have 4 dimensions"),
    ("teacher_3d", lambda: (_maps(1, 2, 3, 3), _maps(2, 3, 3)), r"teacher\[0\] must have 4 dimensions"),
    ("student_5d_level1", lambda: ([_maps(1, 2, 3, 3), _maps(1, 1, 2, 3, 3)], [_maps(1, 2, 3, 3)] * 2),
     r"student\[1\] must have 4 dimensions"),
    ("int_maps", lambda: (torch.ones(1, 2, 3, 3, dtype=torch.int64), torch.ones(1, 2, 3, 3, dtype=torch.int64)),
     r"student\[0\] must be float"),
    ("teacher_not_tensor", lambda: ([_maps(1, 2, 3, 3)], [_maps(1, 2, 3, 3).numpy()]), r"teacher\[0\] must be a torch"),
    ("dtype_mismatch", lambda: (_maps(1, 2, 3, 3), _maps(1, 2, 3, 3, dtype=torch.float64)), r"share one dtype"),
    ("dtype_mismatch_levels", lambda: ([_maps(1, 2, 3, 3), _maps(1, 2, 2, 2, dtype=torch.float16)],
                                       [_maps(1, 2, 3, 3), _maps(1, 2, 2, 2, dtype=torch.float16)]), r"share one dtype"),
    ("empty_map", lambda: (_maps(1, 2, 0, 3), _maps(1, 2, 0, 3)), r"student\[0\] is empty"),
    ("empty_channels", lambda: (_maps(1, 0, 3, 3), _maps(1, 0, 3, 3)), r"student\[0\] is empty"),
    ("empty_batch_level1", lambda: ([_maps(1, 2, 3, 3), _maps(0, 2, 3, 3)], [_maps(1, 2, 3, 3), _maps(0, 2, 3, 3)]),
     r"student\[1\] is empty"),
]


@BACKENDS
@pytest.mark.parametrize("case,make,match", NMSE_CASES, ids=[c[0] for c in NMSE_CASES])
def test_normalized_mse_bad_maps(backend, case, make, match):
    student, teacher = make()
    with pytest.raises(ValueError, match=r"^normalized_mse: .*" + match):
        lgd_ops.normalized_mse(student, teacher, backend=backend)


@BACKENDS
@pytest.mark.parametrize("eps", [0.0, -1e-5, nan, inf, -inf, "1e-5", None, torch.tensor(1e-5),
                                 True],
                         ids=["zero", "negative", "nan", "inf", "-inf", "str", "none", "tensor", "bool"])
def test_normalized_mse_bad_eps(backend, eps):
    with pytest.raises(ValueError, match=r"^normalized_mse: eps must be a positive finite number"):
        lgd_ops.normalized_mse(_maps(1, 2, 3, 3), _maps(1, 2, 3, 3), eps=eps, backend=backend)


# ---------------------------------------------------------------------------------------------
# mask ops (reference only)
# ---------------------------------------------------------------------------------------------

MASKS = torch.rand(2, 8, 10) > 0.5
@pytest.mark.parametrize("op", ["mask_pool", "mask_fill"])
@pytest.mark.parametrize("kwargs,match", [
    (dict(masks=MASKS[0]), r"masks must have 3 dimensions"),
    (dict(masks=MASKS.numpy()), r"masks must be a torch.Tensor"),
    (dict(batch_idx=IDX.int()), r"batch_idx must be int64"),
    (dict(batch_idx=IDX[:1]), r"batch_idx must be int64 \[N\] with N = masks.shape\[0\] \(2\)"),
    (dict(batch_idx=IDX[None]), r"batch_idx must have 1 dimensions"),
    (dict(batch_idx=torch.tensor([0, 2])), r"batch_idx values must be in \[0, 2\)"),
    (dict(batch_idx=torch.tensor([-1, 0])), r"batch_idx values must be in \[0, 2\)"),
    (dict(masks=torch.zeros(2, 0, 10, dtype=torch.bool)), r"masks must be \[N, Hm, Wm\] with Hm, Wm >= 1"),
], ids=["masks_2d", "masks_numpy", "idx_int32", "idx_short", "idx_2d", "idx_too_big", "idx_negative",
        "masks_empty_spatial"])
def test_mask_ops_bad_masks(op, kwargs, match):
    args = dict(masks=MASKS, batch_idx=IDX)
    args.update(kwargs)
    with pytest.raises((ValueError, RuntimeError), match=rf"{op}: .*" + match):
        if op == "mask_pool":
            lgd_ops.mask_pool(_features(2, 3, 4, 5), args["masks"], args["batch_idx"])
        else:
            lgd_ops.mask_fill(torch.randn(2, 3), args["masks"], args["batch_idx"], (2, 4, 5))


@pytest.mark.parametrize("call,match", [
    (lambda: lgd_ops.mask_pool(_features(3, 4, 5), MASKS, IDX), r"mask_pool: features must have 4 dimensions"),
    (lambda: lgd_ops.mask_pool(_features(2, 3, 4, 5, dtype=torch.int32), MASKS, IDX), r"mask_pool: features must be"),
    (lambda: lgd_ops.mask_fill(torch.randn(3, 3), MASKS, IDX, (2, 4, 5)),
     r"mask_fill: embeddings must have one row per mask \(2\), got 3"),
    (lambda: lgd_ops.mask_fill(torch.randn(2), MASKS, IDX, (2, 4, 5)), r"mask_fill: embeddings must have 2 dim"),
    (lambda: lgd_ops.mask_fill(torch.randn(2, 3), MASKS, IDX, (2, 0, 5)), r"mask_fill: output_size must be 3 integers"),
    (lambda: lgd_ops.mask_fill(torch.randn(2, 3), MASKS, IDX, (2, 4)), r"mask_fill: output_size must be 3 integers"),
    (lambda: lgd_ops.mask_fill(torch.randn(2, 3), MASKS, IDX, (1, 4, 5)), r"mask_fill: batch_idx values must be in"),
], ids=["pool_3d", "pool_int", "fill_rows", "fill_1d", "fill_height_0", "fill_size_short", "fill_few_images"])
def test_mask_ops_bad_args(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# Raw custom ops: RuntimeError (c10::Error), never a crash
# ---------------------------------------------------------------------------------------------

def _raw_pool(features=None, boxes=BOXES, batch_idx=IDX, in_h=16, in_w=20, average=True, index=None):
    features = _features(2, 3, 4, 5) if features is None else features
    return torch.ops.lgd_ops.box_pool(features, boxes, batch_idx, in_h, in_w, average, index)


def _raw_fill(values=None, boxes=BOXES, batch_idx=IDX, in_h=16, in_w=20, batch=2, out_h=4, out_w=5, average=False,
              index=None):
    values = torch.randn(2, 3) if values is None else values
    return torch.ops.lgd_ops.box_fill(values, boxes, batch_idx, in_h, in_w, batch, out_h, out_w, average, False,
                                      index)


def _corrupt_index(place, value):
    """The level index of BOXES/IDX on the 4 x 5 level with entry `place` (an offset into its cells [0, 8), event
    ids [12, 16) or starts [16, 19)) set to value: a raw call must refuse it rather than read outside the map."""
    index = lgd_ops.box_index(BOXES, IDX, (16, 20), 2, (4, 5)).tensor.clone()
    index[place] = value
    return index


RAW_CASES = [
    ("pool_features_3d", lambda: _raw_pool(features=_features(3, 4, 5)), r"features must be \[B, C, H, W\]"),
    ("pool_features_int", lambda: _raw_pool(features=_features(2, 3, 4, 5, dtype=torch.int32)), r"box_pool"),
    ("pool_boxes_n5", lambda: _raw_pool(boxes=torch.zeros(2, 5)), r"boxes must be \[N, 4\]"),
    ("pool_boxes_1d", lambda: _raw_pool(boxes=torch.zeros(8)), r"boxes must be \[N, 4\]"),
    ("pool_boxes_int", lambda: _raw_pool(boxes=BOXES.long()), r"boxes must be floating point"),
    ("pool_idx_int32", lambda: _raw_pool(batch_idx=IDX.int()), r"batch_idx must be int64"),
    ("pool_idx_short", lambda: _raw_pool(batch_idx=IDX[:1]), r"batch_idx must be \[N\]"),
    ("pool_idx_2d", lambda: _raw_pool(batch_idx=IDX[None]), r"batch_idx must be \[N\]"),
    ("pool_in_h_0", lambda: _raw_pool(in_h=0), r"image_size must be positive"),
    ("pool_in_w_neg", lambda: _raw_pool(in_w=-3), r"image_size must be positive"),
    ("fill_values_1d", lambda: _raw_fill(values=torch.randn(2)), r"values must be \[N, C\]"),
    ("fill_values_rows", lambda: _raw_fill(values=torch.randn(3, 3)), r"values must be \[N, C\]"),
    ("fill_values_int", lambda: _raw_fill(values=torch.ones(2, 3, dtype=torch.int64)), r"box_fill"),
    ("fill_batch_neg", lambda: _raw_fill(batch=-1), r"output size must be non-negative"),
    ("fill_out_h_neg", lambda: _raw_fill(out_h=-4), r"output size must be non-negative"),
    ("fill_boxes_3d", lambda: _raw_fill(boxes=BOXES[:, None]), r"boxes must be \[N, 4\]"),
    ("fill_idx_int32", lambda: _raw_fill(batch_idx=IDX.int()), r"batch_idx must be int64"),
    ("fill_in_h_0", lambda: _raw_fill(in_h=0), r"image_size must be positive"),
    ("pool_index_size", lambda: _raw_pool(index=torch.zeros(8 * 2 + 2, dtype=torch.int32)),
     r"level index of 2 boxes over 2 images \(8 \* N \+ batch \+ 1 = 19 entries\)"),
    ("pool_index_int64", lambda: _raw_pool(index=torch.zeros(19, dtype=torch.int64)), r"index must be int32"),
    ("fill_index_2d", lambda: _raw_fill(index=torch.zeros(1, 19, dtype=torch.int32)), r"level index of 2 boxes"),
    ("fill_index_strided", lambda: _raw_fill(index=torch.zeros(38, dtype=torch.int32)[::2]), r"contiguous"),
    ("pool_index_cell_past_the_map", lambda: _raw_pool(index=_corrupt_index(1, 5)), r"corrupt level index \(box 0"),
    ("fill_index_cell_negative", lambda: _raw_fill(index=_corrupt_index(6, -1)), r"corrupt level index \(box 1"),
    ("pool_index_event_id", lambda: _raw_pool(index=_corrupt_index(12, 4)), r"corrupt level index \(event id 4"),
    ("fill_index_start", lambda: _raw_fill(index=_corrupt_index(18, 5)), r"corrupt level index \(events of image 1"),
    ("pool_index_duplicate_top", lambda: _raw_pool(index=_corrupt_index(14, 0)), r"corrupt level index \(box 0"),
    ("nmse_empty", lambda: torch.ops.lgd_ops.normalized_mse([], [], 1e-5), r"no tensor arguments|non-empty"),
    ("nmse_lengths", lambda: torch.ops.lgd_ops.normalized_mse([_maps(1, 2, 3, 3)] * 2, [_maps(1, 2, 3, 3)], 1e-5),
     r"equal-length non-empty lists, got 2 and 1"),
    ("nmse_shapes", lambda: torch.ops.lgd_ops.normalized_mse([_maps(1, 2, 3, 3)], [_maps(1, 2, 3, 4)], 1e-5),
     r"level 0 student .* must be equal \[B, C, H, W\] shapes"),
    ("nmse_3d", lambda: torch.ops.lgd_ops.normalized_mse([_maps(2, 3, 3)], [_maps(2, 3, 3)], 1e-5),
     r"must be equal \[B, C, H, W\] shapes"),
    ("nmse_dtypes", lambda: torch.ops.lgd_ops.normalized_mse([_maps(1, 2, 3, 3)],
                                                             [_maps(1, 2, 3, 3, dtype=torch.float64)], 1e-5),
     r"share one dtype"),
    ("nmse_int", lambda: torch.ops.lgd_ops.normalized_mse([torch.ones(1, 2, 3, 3, dtype=torch.int32)] * 1,
                                                          [torch.ones(1, 2, 3, 3, dtype=torch.int32)], 1e-5),
     r"normalized_mse"),
    ("nmse_bwd_stats", lambda: torch.ops.lgd_ops.normalized_mse_backward(
        torch.tensor(1.0), [_maps(1, 2, 3, 3)], [_maps(1, 2, 3, 3)], torch.zeros(5, 3)), r"stats must be \[5, 2\]"),
    ("nmse_bwd_stats_1d", lambda: torch.ops.lgd_ops.normalized_mse_backward(
        torch.tensor(1.0), [_maps(1, 2, 3, 3)], [_maps(1, 2, 3, 3)], torch.zeros(10)), r"stats must be \[5, 2\]"),
    ("nmse_bwd_grad", lambda: torch.ops.lgd_ops.normalized_mse_backward(
        torch.ones(2), [_maps(1, 2, 3, 3)], [_maps(1, 2, 3, 3)], torch.zeros(5, 2)), r"grad must be a scalar"),
    ("nmse_bwd_shapes", lambda: torch.ops.lgd_ops.normalized_mse_backward(
        torch.tensor(1.0), [_maps(1, 2, 3, 3)], [_maps(1, 2, 3, 2)], torch.zeros(5, 2)), r"must be equal"),
]


@needs_kernels
@pytest.mark.parametrize("case,call,match", RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_raw_ops_raise_runtime_error(case, call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


@needs_kernels
def test_raw_ops_tolerate_what_the_api_rejects():
    """Values the Python API refuses up front reach the raw ops under torch.compile: they must not crash.
    Out-of-range images and NaN boxes cover nothing; +-inf corners clamp to the image edge."""
    features = torch.randn(2, 3, 4, 5)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 8.0, 8.0], [nan, 0.0, 8.0, 8.0],
                          [-inf, -inf, inf, inf], [0.0, 0.0, 8.0, 8.0]])
    batch_idx = torch.tensor([-1, 2, 0, 1, 1 << 40])
    out = torch.ops.lgd_ops.box_pool(features, boxes, batch_idx, 16, 20, True)
    expected = torch.zeros(5, 3)
    expected[3] = features[1].mean(dim=(1, 2))
    torch.testing.assert_close(out, expected)
    filled = torch.ops.lgd_ops.box_fill(torch.ones(5, 3), boxes, batch_idx, 16, 20, 2, 4, 5, False)
    expected_fill = torch.zeros(2, 3, 4, 5)
    expected_fill[1] = 1.0
    torch.testing.assert_close(filled, expected_fill)
    # the same from their level index (built without the API's checks, as under torch.compile)
    index = level_index(boxes, batch_idx, 2, 16, 20, 4, 5)
    torch.testing.assert_close(torch.ops.lgd_ops.box_pool(features, boxes, batch_idx, 16, 20, True, index), expected)
    torch.testing.assert_close(torch.ops.lgd_ops.box_fill(torch.ones(5, 3), boxes, batch_idx, 16, 20, 2, 4, 5, False,
                                                          False, index), expected_fill)
    # empty outputs are fine too
    assert torch.ops.lgd_ops.box_fill(torch.ones(5, 3), boxes, batch_idx, 16, 20, 0, 4, 5, False).shape == (0, 3, 4, 5)
