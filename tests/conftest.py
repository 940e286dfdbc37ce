"""Shared helpers of the lgd_ops tests: seeds, the device x backend matrix, float64 oracles, box generators.

The oracles below are written from docs/method.md §1-4 with plain Python loops over grid cells, independently
of lgd_ops._boxes and the reference ops, so a bug shared by the reference and the kernels still shows.
"""
import logging
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from hypothesis import settings

import lgd_ops

SEED = 0
settings.register_profile("lgd_ops", deadline=None, database=None, print_blob=True)
settings.load_profile("lgd_ops")
HALF_DTYPES = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: torch.compile tests (slow-ish; deselect with -m 'not compile')")


@pytest.fixture(scope="session", autouse=True)
def _one_intra_op_thread():
    """Tiny ops spend more time waking OpenMP threads than computing: on a 2-core machine gradcheck of the
    reference runs ~40x slower with 2 threads. The suite runs single-threaded; the determinism tests switch
    to 2 threads themselves so the kernels' parallel paths are still checked."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_handlers_on_closed_streams():
    """The commands attach console handlers (detectron2's setup_logger, cached per process) to the sys.stdout
    of the test that ran them, which pytest closes afterwards: later tests drop those handlers instead of
    printing "--- Logging error ---"."""

    def drop():
        for logger in [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]:
            for handler in list(getattr(logger, "handlers", ())):
                if getattr(getattr(handler, "stream", None), "closed", False):
                    logger.removeHandler(handler)

    drop()
    yield
    drop()


@pytest.fixture(autouse=True)
def _fixed_seeds():
    """Every test starts from the same RNG state, whatever ran before it."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    yield


# ----------------------------------------------------------------------------------------------
# Device x backend matrix
# ----------------------------------------------------------------------------------------------

_DEVICE_ONLY = {"cpu": "cpu", "cuda": "cuda"}  # compiled backends bound to one device type


def backends_for(device):
    """Every available backend except "reference" that can run tensors on `device` ("cpu"/"cuda").

    "cpu"/"cuda" run on their own device only; "triton" runs on cuda (or on cpu under
    TRITON_INTERPRET=1); any other future backend is tried on every device.
    """
    names = []
    for name in lgd_ops.available_backends():
        if name == "reference":
            continue
        if name in _DEVICE_ONLY and _DEVICE_ONLY[name] != device:
            continue
        if name == "triton" and device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            continue
        names.append(name)
    return names


def _device_params(names_for, ids_prefix=""):
    params = []
    for device in ("cpu", "cuda"):
        if device == "cuda" and not torch.cuda.is_available():
            params.append(pytest.param("cuda", "cuda", id="cuda-cuda",
                                       marks=pytest.mark.skip(reason="CUDA not available")))
            continue
        for name in names_for(device):
            params.append(pytest.param(device, name, id=f"{device}-{name}"))
    return params


def kernel_params():
    """(device, backend) pairs of the compiled backends under test (reference excluded)."""
    return _device_params(backends_for)


def oracle_params():
    """kernel_params() plus the reference backend on each device: all are checked against the oracles."""
    return _device_params(lambda device: ["reference"] + backends_for(device))


def all_backends_on(device):
    return ["reference"] + backends_for(device)


DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
DTYPES = pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: DTYPE_IDS[d])
DEVICE_BACKEND = pytest.mark.parametrize("device,backend", oracle_params())
KERNELS = pytest.mark.parametrize("device,backend", kernel_params())


def same_bits_across_runs_and_threads(run):
    """run() -> tensors; asserts two runs on 2 threads and one on 1 thread agree bit for bit, returns the first."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = run(), run()
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, s in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, s)
    return first


def same_bits_in_both_cpu_isas(script):
    """Runs `script` (python source that torch.saves a list of tensors to sys.argv[1]) from the repository root
    with the CPU kernels' default instruction set and with the baseline copy (LGD_OPS_CPU_ISA=base), and asserts
    the two lists agree bit for bit."""
    if "cpu" not in lgd_ops.available_backends():
        pytest.skip("no CPU kernels")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = []
    for isa in ("", "base"):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"lgd_isa_{os.getpid()}_{isa or 'default'}.pt")
        subprocess.run([sys.executable, "-c", script, path], check=True, cwd=root,
                       env=dict(os.environ, LGD_OPS_CPU_ISA=isa))
        results.append(torch.load(path))
        os.remove(path)
    assert len(results[0]) == len(results[1])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def value_scale(x):
    """Tolerance scale for comparing x: its largest magnitude, at least 1."""
    return max(1.0, float(x.detach().abs().max())) if x.numel() else 1.0


# ----------------------------------------------------------------------------------------------
# Tolerances against the float64 oracles
# ----------------------------------------------------------------------------------------------

TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def assert_close_to_oracle(got, expected, dtype, scale=1.0, msg=""):
    """`got` (any dtype) against a float64 oracle value; atol scales with the values' magnitude."""
    tol = TOL[dtype]
    assert got.dtype == dtype, f"{msg}: dtype {got.dtype}, expected {dtype}"
    torch.testing.assert_close(got.detach().cpu().to(torch.float64), expected.detach().cpu().to(torch.float64),
                               rtol=tol["rtol"], atol=tol["atol"] * scale, msg=lambda m: f"{msg}\n{m}")


# ----------------------------------------------------------------------------------------------
# Float64 oracles, straight from the spec
# ----------------------------------------------------------------------------------------------

def oracle_cells(box, image_size, height, width):
    """(rows, cols) of the level grid inside `box` (docs/method.md §1), one Python float comparison per index.

    Clamp to [0, W_in-1] x [0, H_in-1]; x2 <= x1 or y2 <= y1 (or NaN) covers nothing; r_x = W_l / W_in;
    column i is inside iff x1*r_x <= i <= x2*r_x (inclusive, no +0.5), rows alike.
    """
    in_h, in_w = image_size
    x1, y1, x2, y2 = (float(v) for v in box)
    if any(math.isnan(v) for v in (x1, y1, x2, y2)):
        return [], []
    x1, x2 = min(max(x1, 0.0), in_w - 1.0), min(max(x2, 0.0), in_w - 1.0)
    y1, y2 = min(max(y1, 0.0), in_h - 1.0), min(max(y2, 0.0), in_h - 1.0)
    if x2 <= x1 or y2 <= y1:
        return [], []
    rx, ry = width / in_w, height / in_h
    cols = [i for i in range(width) if x1 * rx <= i <= x2 * rx]
    rows = [j for j in range(height) if y1 * ry <= j <= y2 * ry]
    return rows, cols


def oracle_masks(boxes, image_size, height, width):
    """Float64 [N, H, W] 0/1 masks of the boxes on an H x W level."""
    masks = []
    for box in boxes.detach().cpu().to(torch.float64).tolist():
        rows, cols = (set(v) for v in oracle_cells(box, image_size, height, width))
        masks.append([[1.0 if (j in rows and i in cols) else 0.0 for i in range(width)] for j in range(height)])
    return torch.tensor(masks, dtype=torch.float64).reshape(len(masks), height, width)


def _pool_with_masks(features, masks, batch_idx, average):
    """[N, C] float64 sums (or means) of features[b_n] over masks[n]; differentiable in features."""
    f = features.to(torch.float64).cpu()
    picked = f[batch_idx.cpu()]  # [N, C, H, W], each box's own image
    sums = torch.where(masks[:, None] > 0, picked, 0.0).sum(dim=(2, 3))  # a NaN outside a box stays out
    if average:
        sums = sums / masks.sum(dim=(1, 2)).clamp(min=1.0)[:, None]
    return sums


def _fill_with_masks(values, masks, batch_idx, output_size, average):
    """[B, C, H, W] float64: sum over boxes n of values[n] painted on masks[n] of image batch_idx[n]."""
    n_img, height, width = output_size
    v = values.to(torch.float64).cpu()
    if average:
        v = v / masks.sum(dim=(1, 2)).clamp(min=1.0)[:, None]
    painted = torch.where(masks[:, None, :, :] > 0, v[:, :, None, None], 0.0)  # [N, C, H, W], NaN kept in its box
    out = v.new_zeros(n_img, v.shape[1], height, width)
    return out.index_add(0, batch_idx.cpu(), painted)


def oracle_box_pool(features, boxes, batch_idx, image_size, average=True):
    """docs/method.md §2: a[n] = sum over the box's cells of F[b_n, :, j, i] / max(count, 1), in float64."""
    _, _, height, width = features.shape
    return _pool_with_masks(features, oracle_masks(boxes, image_size, height, width), batch_idx, average)


def oracle_box_fill(values, boxes, batch_idx, image_size, output_size, average=False):
    """docs/method.md §3: M[b, :, j, i] = sum of e_n over the image's boxes covering (i, j), in float64."""
    _, height, width = output_size
    masks = oracle_masks(boxes, image_size, height, width)
    return _fill_with_masks(values, masks, batch_idx, output_size, average)


def oracle_normalized_mse(students, teachers, eps=1e-5):
    """docs/method.md §4 in float64: per (b, c) plane, x -> (x - mean) / sqrt(biased var + eps) for both maps,
    sum of squared differences over all levels / total student element count. Teacher detached."""
    if isinstance(students, torch.Tensor):
        students, teachers = [students], [teachers]
    total = 0
    sq = 0.0
    for s, t in zip(students, teachers):
        s = s.to(torch.float64).cpu()
        t = t.detach().to(torch.float64).cpu()

        def norm(x):
            flat = x.reshape(x.shape[0], x.shape[1], -1)
            mean = flat.sum(-1, keepdim=True) / flat.shape[-1]
            var = ((flat - mean) ** 2).sum(-1, keepdim=True) / flat.shape[-1]
            return (flat - mean) / torch.sqrt(var + eps)

        sq = sq + ((norm(s) - norm(t)) ** 2).sum()
        total += s.numel()
    return sq / total


def nearest_source_index(dst, in_size, out_size):
    """Row/column of the source a nearest resize (PyTorch's legacy "nearest", which F.interpolate uses
    and the authors' code relied on) reads for destination index `dst`: floor(dst * (in/out)), the scale
    and the product both rounded to float32, capped at in_size - 1."""
    if in_size == out_size:
        return dst
    scale = np.float32(in_size) / np.float32(out_size)
    return min(int(math.floor(np.float32(dst) * scale)), in_size - 1)


def oracle_level_masks(masks, height, width):
    """Float64 [N, H, W]: masks [N, Hm, Wm] (bool / 0-1) nearest-resized to the level, > 0.5 inside."""
    m = masks.detach().cpu().to(torch.float64)
    n, hm, wm = m.shape
    out = torch.zeros(n, height, width, dtype=torch.float64)
    for k in range(n):
        for j in range(height):
            sj = nearest_source_index(j, hm, height)
            for i in range(width):
                si = nearest_source_index(i, wm, width)
                out[k, j, i] = 1.0 if float(m[k, sj, si]) > 0.5 else 0.0
    return out


def oracle_mask_pool(features, masks, batch_idx):
    _, _, height, width = features.shape
    return _pool_with_masks(features, oracle_level_masks(masks, height, width), batch_idx, True)


def oracle_mask_fill(values, masks, batch_idx, output_size):
    _, height, width = output_size
    return _fill_with_masks(values, oracle_level_masks(masks, height, width), batch_idx, output_size, False)


# ----------------------------------------------------------------------------------------------
# Random inputs covering the hard cases
# ----------------------------------------------------------------------------------------------

BOX_KINDS = ("normal", "tiny", "outside", "degenerate", "grid", "integer", "whole", "huge")


def random_boxes(n, image_size, level_size=None, *, kinds=BOX_KINDS, generator=None, dtype=torch.float64):
    """[n, 4] boxes (x1, y1, x2, y2) in input pixels, each drawn from one of `kinds`:

    normal      inside the image, random float corners
    tiny        smaller than a level cell: often covers no cell on coarse levels
    outside     partly or wholly past the image edge (negative coords, beyond W_in / H_in)
    degenerate  x2 <= x1 or y2 <= y1 (equal or swapped corners)
    grid        corners exactly on level-grid lines (x * W_l / W_in an integer): the inclusive rule's edge
    integer     integer pixel corners
    whole       the whole padded image (0, 0, W_in, H_in) or its clamp edge (W_in - 1, H_in - 1)
    huge        spanning far beyond the image on every side
    """
    rng = random.Random(torch.randint(0, 2**31, (1,), generator=generator).item())
    in_h, in_w = image_size
    lh, lw = level_size if level_size is not None else (max(1, in_h // 8), max(1, in_w // 8))
    out = []
    for _ in range(n):
        kind = rng.choice(kinds)
        if kind == "normal":
            xa, xb = sorted(rng.uniform(0, in_w) for _ in range(2))
            ya, yb = sorted(rng.uniform(0, in_h) for _ in range(2))
            box = [xa, ya, xb, yb]
        elif kind == "tiny":
            x, y = rng.uniform(0, in_w), rng.uniform(0, in_h)
            box = [x, y, x + rng.uniform(0.01, 1.5 * in_w / lw), y + rng.uniform(0.01, 1.5 * in_h / lh)]
        elif kind == "outside":
            xa, xb = sorted(rng.uniform(-0.5 * in_w, 1.5 * in_w) for _ in range(2))
            ya, yb = sorted(rng.uniform(-0.5 * in_h, 1.5 * in_h) for _ in range(2))
            box = [xa, ya, xb, yb]
        elif kind == "degenerate":
            x, y = rng.uniform(0, in_w), rng.uniform(0, in_h)
            if rng.random() < 0.5:
                box = [x, y, x - rng.choice([0.0, rng.uniform(0, 5)]), y + rng.uniform(1, 10)]
            else:
                box = [x, y, x + rng.uniform(1, 10), y - rng.choice([0.0, rng.uniform(0, 5)])]
        elif kind == "grid":
            # multiples of in/level, so coordinate * level/in lands (about) exactly on an integer
            sx, sy = in_w / lw, in_h / lh
            i1, i2 = sorted(rng.randint(0, lw) for _ in range(2))
            j1, j2 = sorted(rng.randint(0, lh) for _ in range(2))
            box = [i1 * sx, j1 * sy, i2 * sx, j2 * sy]
        elif kind == "integer":
            xa, xb = sorted(rng.randint(0, in_w) for _ in range(2))
            ya, yb = sorted(rng.randint(0, in_h) for _ in range(2))
            box = [float(xa), float(ya), float(xb), float(yb)]
        elif kind == "whole":
            box = [0.0, 0.0, float(in_w), float(in_h)] if rng.random() < 0.5 else [0.0, 0.0, in_w - 1.0, in_h - 1.0]
        elif kind == "huge":
            box = [-rng.uniform(1, 1e4), -rng.uniform(1, 1e4), in_w + rng.uniform(0, 1e4), in_h + rng.uniform(0, 1e4)]
        else:
            raise ValueError(kind)
        out.append(box)
    return torch.tensor(out, dtype=dtype).reshape(n, 4)


def random_batch_idx(n, num_images, *, empty_images=(), generator=None):
    """[n] int64 image indices in [0, num_images), never naming an image listed in `empty_images`."""
    choices = [b for b in range(num_images) if b not in set(empty_images)]
    if n and not choices:
        raise ValueError("every image is empty but n > 0")
    if not n:
        return torch.zeros(0, dtype=torch.int64)
    pick = torch.randint(0, len(choices), (n,), generator=generator)
    return torch.tensor(choices, dtype=torch.int64)[pick]


def make_features(shape, dtype, device, layout="contiguous", requires_grad=False):
    """Random [B, C, H, W] features of a given memory layout:
    contiguous, channels_last, transposed (a permuted view of a [B, C, W, H] tensor) or sliced (every other
    channel of a twice-wider tensor, a non-contiguous view with a storage offset)."""
    b, c, h, w = shape

    def rand(*size):
        return torch.randn(*size, dtype=torch.float64).to(device=device, dtype=dtype)

    if layout == "contiguous":
        x = rand(b, c, h, w)
    elif layout == "channels_last":
        x = rand(b, c, h, w).contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = rand(b, c, w, h).transpose(2, 3)
    elif layout == "sliced":
        x = rand(b, 2 * c + 1, h, w)[:, 1::2]
    else:
        raise ValueError(layout)
    if layout == "transposed" and h > 1 and w > 1:
        assert not x.is_contiguous()
    return x.requires_grad_(requires_grad)


# name -> (B, C, (H_in, W_in), (H_l, W_l), N, box kinds, images left without boxes)
BOX_CASES = {
    "mixed": (2, 3, (64, 80), (8, 10), 40, BOX_KINDS, ()),
    "coarse_tiny": (2, 2, (128, 96), (2, 3), 25, ("tiny",), ()),
    "outside": (2, 3, (50, 70), (7, 9), 30, ("outside", "huge"), ()),
    "degenerate": (1, 2, (40, 40), (5, 5), 12, ("degenerate",), ()),
    "grid_pow2": (2, 2, (64, 128), (8, 16), 40, ("grid", "integer", "whole"), ()),
    "grid_odd": (2, 2, (100, 70), (7, 9), 40, ("grid", "whole"), ()),
    "empty_image": (3, 2, (32, 32), (4, 4), 10, BOX_KINDS, (1,)),
    "no_boxes": (2, 3, (32, 48), (4, 6), 0, BOX_KINDS, ()),
    "one_box": (1, 4, (33, 45), (5, 6), 1, ("normal",), ()),
    "many": (2, 4, (256, 320), (32, 40), 500, BOX_KINDS, ()),
    "odd": (3, 5, (37, 53), (5, 7), 23, BOX_KINDS, ()),
    "map_1x1": (2, 3, (16, 16), (1, 1), 15, BOX_KINDS, ()),
    "image_2x3": (2, 2, (2, 3), (2, 3), 10, BOX_KINDS, ()),
    "upsampled": (1, 2, (8, 10), (16, 20), 12, BOX_KINDS, ()),
}


def box_case(name):
    """(boxes float64 [N, 4], batch_idx, B, C, image_size, level_size) of a BOX_CASES entry."""
    b, c, image_size, level, n, kinds, empty = BOX_CASES[name]
    boxes = random_boxes(n, image_size, level, kinds=kinds)
    batch_idx = random_batch_idx(n, b, empty_images=empty)
    return boxes, batch_idx, b, c, image_size, level


def box_dtype_for(dtype):
    """Boxes stay fp32 next to half features (as under autocast), else share the features' dtype."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------

def assert_compiled_matches_eager(fn, inputs):
    """fn(*inputs) -> scalar: torch.compile(fullgraph=True) gives eager's value and input gradients."""
    eager_inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    compiled_inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    expected = fn(*eager_inputs)
    expected.backward()
    got = torch.compile(fn, fullgraph=True)(*compiled_inputs)
    got.backward()
    torch.testing.assert_close(got, expected)
    for a, b in zip(compiled_inputs, eager_inputs):
        torch.testing.assert_close(a.grad, b.grad)


# ----------------------------------------------------------------------------------------------
# hypothesis strategies for the box fuzz tests
# ----------------------------------------------------------------------------------------------

def draw_box_problem(data, max_boxes=10):
    """(boxes float64 [N, 4], batch_idx, B, C, image_size, level) drawn by hypothesis. Input sizes are often
    a multiple of the level size, and corners often sit on level grid lines (x = k * W_in / W_l), integers
    or outside the image, so the inclusive rule's edges are hit."""
    from hypothesis import strategies as st

    b, c = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    level = (data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12)))
    image_size = tuple(
        data.draw(st.one_of(st.integers(1, 96), st.integers(1, 8).map(lambda f, n=n: f * n))) for n in level)

    def coord(in_len, level_len):
        return st.one_of(
            st.floats(-0.5 * in_len - 5, 1.5 * in_len + 5, allow_nan=False, width=32),
            st.integers(-5, in_len + 5).map(float),
            st.integers(0, level_len).map(lambda k: k * in_len / level_len),
        )

    xs, ys = coord(image_size[1], level[1]), coord(image_size[0], level[0])
    n = data.draw(st.integers(0, max_boxes))
    rows = data.draw(st.lists(st.tuples(xs, ys, xs, ys), min_size=n, max_size=n))
    boxes = torch.tensor(rows, dtype=torch.float64).reshape(n, 4)
    batch_idx = torch.tensor(data.draw(st.lists(st.integers(0, b - 1), min_size=n, max_size=n)), dtype=torch.int64)
    return boxes, batch_idx, b, c, image_size, level


def raw_op(name, backend):
    """The custom op behind a compiled backend: torch.ops.lgd_ops.<name>, or <name>_triton for "triton"."""
    if backend == "triton":
        import importlib

        importlib.import_module("lgd_ops.triton")  # registers the *_triton ops
        return getattr(torch.ops.lgd_ops, f"{name}_triton")
    return getattr(torch.ops.lgd_ops, name)


def shrink_detector_config(model, num_classes):
    """Shrinks a model-zoo LazyConfig `model` (RetinaNet, FCOS, Faster/Mask R-CNN) in place for CPU tests:
    ResNet-18 with BN (no weights, so no FrozenBN), a 32-channel FPN and heads, small ROI heads and
    samples, `num_classes` classes."""
    from detectron2.layers import ShapeSpec

    stages = model.backbone.bottom_up.stages
    stages.depth = 18
    del stages.stride_in_1x1  # BasicBlock has no such option
    stages.norm = model.backbone.bottom_up.stem.norm = "BN"
    model.backbone.bottom_up.freeze_at = 0
    model.backbone.out_channels = 32
    if "head" in model:  # RetinaNet / FCOS
        top = model.backbone.top_block
        top.in_channels = 32 if top.get("in_feature") == "p5" else 512  # FCOS builds P6 from P5, RetinaNet from C5
        model.head.input_shape = [ShapeSpec(channels=32)] * 5
        model.head.conv_dims = [32, 32]
        model.num_classes = num_classes
        return model
    rpn, heads = model.proposal_generator, model.roi_heads
    rpn.head.in_channels = 32
    rpn.batch_size_per_image, rpn.pre_nms_topk, rpn.post_nms_topk = 64, (200, 100), (100, 100)
    heads.num_classes, heads.batch_size_per_image = num_classes, 64
    heads.box_head.input_shape = ShapeSpec(channels=32, height=7, width=7)
    heads.box_head.fc_dims = [64, 64]
    heads.box_predictor.input_shape = ShapeSpec(channels=64)
    if heads.get("mask_head") is not None:
        heads.mask_head.input_shape = ShapeSpec(channels=32, width=14, height=14)
        heads.mask_head.conv_dims = [32, 32]
    return model


def detectron2_input(boxes, classes, seed, image_size):
    """One detectron2 training input: a random image of image_size (H, W) drawn from `seed`, and ground truth
    Instances with `boxes` (XYXY pixels) and `classes`."""
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    inst = Instances(image_size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return {"image": torch.rand(3, *image_size, generator=g) * 255, "instances": inst}


def tiny_yacs_config(config_file):
    """detectron2's yacs model-zoo config `config_file` shrunk like shrink_detector_config: CPU, no weights,
    ResNet-18 with BN, a 32-channel FPN."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(config_file))
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", ""
    cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS, cfg.MODEL.RESNETS.NORM = 18, 64, "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    return cfg


def sgd_loss_totals(model, losses, steps, lr=0.01):
    """Total loss before each of `steps` SGD steps of an LGDDistiller with lgd's optimizer (the authors'
    settings: lgd.engine.optim.build_lgd_optimizer); `losses()` returns one training loss dict."""
    from lgd.engine.optim import build_lgd_optimizer  # here: lgd needs detectron2, which the GPU machine lacks

    optimizer = build_lgd_optimizer(model, lr=lr)
    totals = []
    for _ in range(steps):
        total = sum(losses().values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    return totals


shrink_retinanet_config = shrink_detector_config  # the name the RetinaNet tests use
