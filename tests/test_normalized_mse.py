"""normalized_mse (docs/method.md §4): every backend against the float64 oracle, loss and student gradient."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lgd_ops
from conftest import (
    all_backends_on,
    assert_close_to_oracle,
    assert_compiled_matches_eager,
    DEVICE_BACKEND,
    DTYPES,
    KERNELS,
    oracle_normalized_mse,
    oracle_params,
    raw_op,
    same_bits_across_runs_and_threads,
    same_bits_in_both_cpu_isas,
    TOL,
)


# name -> (student level shapes, how the maps are drawn)
CASES = {
    "single": ([(2, 3, 8, 9)], "randn"),
    "levels": ([(2, 4, 16, 20), (2, 4, 8, 10), (2, 4, 3, 5), (2, 4, 2, 2)], "randn"),
    "odd": ([(3, 5, 7, 11)], "randn"),
    "one_row": ([(1, 2, 1, 9), (1, 2, 9, 1)], "randn"),
    "big_plane": ([(1, 2, 64, 80)], "randn"),
    "offset": ([(2, 3, 6, 7), (2, 3, 3, 4)], "offset"),
    "constant": ([(2, 4, 5, 6), (2, 4, 3, 3)], "constant"),
    "correlated": ([(2, 3, 8, 8)], "correlated"),
    "map_1x1": ([(2, 3, 4, 5), (2, 3, 1, 1)], "randn"),
}


def make_maps(shapes, kind, dtype, device, layout="contiguous"):
    """Student (leaves with requires_grad) and teacher level lists in a given memory layout."""
    students, teachers = [], []
    for shape in shapes:
        s = torch.randn(shape, dtype=torch.float64)
        t = torch.randn(shape, dtype=torch.float64)
        if kind == "offset":  # means far from 0 with small spread: the variance must be taken about the mean
            s, t = 100.0 + 0.1 * s, -50.0 + 3.0 * t
        elif kind == "constant":  # zero-variance planes on either side
            s[:, 0] = 2.5
            t[:, -1] = -1.0
            s[0, -1], t[0, -1] = 0.0, 0.0
        elif kind == "correlated":
            t = 2.0 * s + 0.1 * t + 3.0
        s = _relayout(s.to(device=device, dtype=dtype), layout)
        t = _relayout(t.to(device=device, dtype=dtype), layout)
        students.append(s.detach().requires_grad_(True))
        teachers.append(t)
    return students, teachers


def _relayout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "sliced":
        wide = x.new_zeros(x.shape[0], 2 * x.shape[1] + 1, *x.shape[2:])
        wide[:, 1::2] = x
        return wide[:, 1::2]
    return x


def _case_params():
    params = []
    for p in oracle_params():
        device, backend = p.values
        for case in CASES:
            params.append(pytest.param(device, backend, case, marks=p.marks, id=f"{p.id}-{case}"))
    return params


def _oracle_with_grads(students, teachers, eps=1e-5, upstream=1.0):
    ref = [s.detach().to(torch.float64).cpu().requires_grad_(True) for s in students]
    loss = oracle_normalized_mse(ref, [t.cpu() for t in teachers], eps)
    (loss * upstream).backward()
    return loss.detach(), [r.grad for r in ref]


def _slack(backend, dtype, kind="randn"):
    """Extra tolerance for the reference, which (unlike the kernels, which accumulate in float64) computes in the
    maps' own dtype: x - mean loses |mean| / std digits ("offset" maps: ~1000x) and half types ~8x."""
    if backend != "reference" or dtype == torch.float64:
        return 1.0
    return (100.0 if kind == "offset" else 1.0) * (8.0 if dtype in (torch.float16, torch.bfloat16) else 1.0)


def _check_grads(students, expected_grads, dtype, msg, slack=1.0):
    scale = slack * max(float(g.abs().max()) for g in expected_grads)
    for level, (s, g) in enumerate(zip(students, expected_grads)):
        assert s.grad is not None and s.grad.shape == s.shape
        # atol relative to the largest gradient: the gradients are O(1/numel), far below 1
        assert_close_to_oracle(s.grad, g, dtype, scale, f"{msg} level {level}")


# ---------------------------------------------------------------------------------------------
# Against the oracle
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend,case", _case_params())
@DTYPES
def test_matches_oracle(device, backend, case, dtype):
    shapes, kind = CASES[case]
    students, teachers = make_maps(shapes, kind, dtype, device)
    loss = lgd_ops.normalized_mse(students, teachers, backend=backend)
    assert loss.shape == () and loss.dtype == dtype and loss.device == students[0].device
    expected, grads = _oracle_with_grads(students, teachers)
    slack = _slack(backend, dtype, kind)
    assert_close_to_oracle(loss, expected, dtype, slack, f"{backend} {case} loss")
    loss.backward()
    _check_grads(students, grads, dtype, f"{backend} {case}", slack)


@DEVICE_BACKEND
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_memory_layouts(device, backend, layout, dtype):
    students, teachers = make_maps(CASES["levels"][0], "randn", dtype, device, layout=layout)
    if layout != "channels_last":
        assert not students[0].is_contiguous() and not teachers[0].is_contiguous()
    loss = lgd_ops.normalized_mse(students, teachers, backend=backend)
    expected, grads = _oracle_with_grads(students, teachers)
    assert_close_to_oracle(loss, expected, dtype, _slack(backend, dtype), layout)
    loss.backward()
    _check_grads(students, grads, dtype, layout, _slack(backend, dtype))


@DEVICE_BACKEND
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["f64", "f32", "bf16", "f16"])
def test_channels_last_wide_levels(device, backend, dtype):
    """channels_last levels of 40 channels (the CPU kernel's 32-channel blocks plus a partial one) in every dtype
    against the float64 oracle; every kernel reads them in place and writes the gradient channels_last."""
    students, teachers = make_maps([(2, 40, 6, 7), (2, 40, 3, 4), (2, 40, 1, 1)], "randn", dtype, device,
                                   layout="channels_last")
    loss = lgd_ops.normalized_mse(students, teachers, backend=backend)
    expected, grads = _oracle_with_grads(students, teachers)
    assert_close_to_oracle(loss, expected, dtype, _slack(backend, dtype), "channels_last")
    loss.backward()
    _check_grads(students, grads, dtype, "channels_last", _slack(backend, dtype))
    if backend != "reference":
        assert all(s.grad.is_contiguous(memory_format=torch.channels_last) for s in students[:2])



@DEVICE_BACKEND
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_channels_last_many_tiles(device, backend, dtype):
    """channels_last planes of several tiles of the GPU kernels' channels_last sweeps (512 positions): 5250
    positions are 11 tiles (more than the 8 rows that merge them, the last tile partial), 529 are a full tile and a
    one-row tail; 40 channels, means far from zero."""
    students, teachers = make_maps([(2, 40, 75, 70), (1, 40, 23, 23)], "offset", dtype, device,
                                   layout="channels_last")
    loss = lgd_ops.normalized_mse(students, teachers, backend=backend)
    expected, grads = _oracle_with_grads(students, teachers)
    assert_close_to_oracle(loss, expected, dtype, _slack(backend, dtype, "offset"), "channels_last tiles")
    loss.backward()
    _check_grads(students, grads, dtype, "channels_last tiles", _slack(backend, dtype, "offset"))

@DEVICE_BACKEND
@pytest.mark.parametrize("eps", [1e-3, 0.5, 1e-8])
def test_eps(device, backend, eps):
    students, teachers = make_maps(CASES["constant"][0], "constant", torch.float64, device)
    loss = lgd_ops.normalized_mse(students, teachers, eps=eps, backend=backend)
    expected, grads = _oracle_with_grads(students, teachers, eps=eps)
    torch.testing.assert_close(loss.detach().cpu(), expected, rtol=1e-9, atol=1e-12)
    loss.backward()
    _check_grads(students, grads, torch.float64, f"eps={eps}")


@DEVICE_BACKEND
def test_upstream_gradient_scales(device, backend):
    students, teachers = make_maps(CASES["levels"][0], "randn", torch.float64, device)
    (lgd_ops.normalized_mse(students, teachers, backend=backend) * -3.5).backward()
    _, grads = _oracle_with_grads(students, teachers, upstream=-3.5)
    _check_grads(students, grads, torch.float64, "x -3.5")


# ---------------------------------------------------------------------------------------------
# Properties of the loss
# ---------------------------------------------------------------------------------------------

@DEVICE_BACKEND
def test_single_tensor_equals_list_of_one(device, backend):
    (s,), (t,) = make_maps([(2, 3, 6, 7)], "randn", torch.float32, device)
    single = lgd_ops.normalized_mse(s, t, backend=backend)
    single.backward()
    grad_single, s.grad = s.grad.clone(), None
    listed = lgd_ops.normalized_mse([s], [t], backend=backend)
    listed.backward()
    assert torch.equal(single, listed) and torch.equal(grad_single, s.grad)


@DEVICE_BACKEND
def test_levels_share_one_mean(device, backend):
    """One mean over all levels' elements, not a mean of per-level means."""
    students, teachers = make_maps([(2, 3, 8, 8), (2, 3, 2, 2)], "randn", torch.float64, device)
    total = lgd_ops.normalized_mse(students, teachers, backend=backend)
    per_level = [lgd_ops.normalized_mse(s, t, backend=backend) for s, t in zip(students, teachers)]
    sizes = [s.numel() for s in students]
    expected = sum(loss * n for loss, n in zip(per_level, sizes)) / sum(sizes)
    torch.testing.assert_close(total, expected)


@DEVICE_BACKEND
def test_teacher_gets_no_gradient(device, backend):
    students, teachers = make_maps([(2, 3, 5, 6), (2, 3, 3, 3)], "randn", torch.float32, device)
    teachers = [t.requires_grad_(True) for t in teachers]
    weight = torch.ones((), device=device, requires_grad=True)
    produced = [t * weight for t in teachers]  # a teacher that comes out of a graph
    loss = lgd_ops.normalized_mse(students, produced, backend=backend)
    loss.backward()
    assert all(t.grad is None for t in teachers)
    assert weight.grad is None
    assert all(s.grad is not None for s in students)
    # only the teacher requires grad: nothing to differentiate
    only_teacher = lgd_ops.normalized_mse([s.detach() for s in students], produced, backend=backend)
    assert not only_teacher.requires_grad


@DEVICE_BACKEND
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_student_equal_to_teacher(device, backend, dtype):
    students, _ = make_maps(CASES["levels"][0], "randn", dtype, device)
    teachers = [s.detach().clone() for s in students]
    loss = lgd_ops.normalized_mse(students, teachers, backend=backend)
    assert abs(float(loss.detach())) < 1e-6
    loss.backward()
    for s in students:
        assert float(s.grad.abs().max()) < 1e-7


@DEVICE_BACKEND
def test_affine_teacher_gives_zero(device, backend):
    """IN removes each plane's offset and positive scale: teacher = 3 * student + 7 gives ~0 (up to eps)."""
    students, _ = make_maps([(2, 3, 6, 6)], "randn", torch.float64, device)
    loss = lgd_ops.normalized_mse(students, [3.0 * students[0].detach() + 7.0], backend=backend)
    assert float(loss.detach()) < 1e-9


@DEVICE_BACKEND
def test_constant_planes(device, backend):
    """Zero variance: a constant plane normalizes to 0, so two constant maps give exactly 0 and finite grads;
    a constant student against a random teacher gives mean(IN(t)^2) ~ 1."""
    s = torch.full((2, 3, 4, 5), 4.0, dtype=torch.float64, device=device, requires_grad=True)
    loss = lgd_ops.normalized_mse(s, torch.full_like(s, -2.0), backend=backend)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.isfinite(s.grad).all() and not s.grad.any()
    s.grad = None
    t = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device)
    loss = lgd_ops.normalized_mse(s, t, backend=backend)
    expected, (grad,) = _oracle_with_grads([s], [t])
    torch.testing.assert_close(loss.detach().cpu(), expected)
    assert 0.9 < float(loss.detach()) < 1.0  # var / (var + eps) per element
    loss.backward()
    torch.testing.assert_close(s.grad.cpu(), grad)


NON_FINITE = {  # name -> (side, where, value): one cell of level 1 [2, 4, 3, 3], or all of it
    "student_nan": ("student", (1, 2, 2, 1), float("nan")),
    "teacher_nan": ("teacher", (0, 0, 0, 0), float("nan")),
    "student_inf": ("student", (0, 1, 2, 2), float("inf")),
    "teacher_neg_inf": ("teacher", (1, 3, 1, 1), -float("inf")),  # in a constant plane
    "student_all_nan": ("student", (), float("nan")),
}


@DEVICE_BACKEND
@pytest.mark.parametrize("case", list(NON_FINITE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_non_finite_input_gives_nan(device, backend, case, dtype):
    """A NaN or inf anywhere in either map gives a NaN loss, as the oracle: no clamp may hide it (an all-NaN
    student once gave 0.0); the other level's constant planes (variance 0) still count as before."""
    side, where, value = NON_FINITE[case]
    students, teachers = make_maps(CASES["constant"][0], "constant", dtype, device)
    maps = students if side == "student" else teachers
    bad = maps[1].detach().clone()
    bad[where] = value
    maps[1] = bad.requires_grad_(side == "student")
    loss = lgd_ops.normalized_mse(students, teachers, backend=backend)
    assert torch.isnan(loss).item() and torch.isnan(oracle_normalized_mse(students, teachers)).item()


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, determinism, fuzzing
# ---------------------------------------------------------------------------------------------

@DEVICE_BACKEND
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck(device, backend, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 2, 3, 4), (2, 2, 2, 3)]
    students = [torch.randn(sh, dtype=torch.float64, generator=g).to(device).requires_grad_(True) for sh in shapes]
    teachers = [torch.randn(sh, dtype=torch.float64, generator=g).to(device) for sh in shapes]
    fn = lambda *s: lgd_ops.normalized_mse(list(s), teachers, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(students))


def _stats_planes(students):
    return sum(s.shape[0] * s.shape[1] for s in students)


@KERNELS
def test_opcheck(device, backend):
    for shapes, dtype, layout in [([(2, 3, 4, 5)], torch.float32, "contiguous"),
                                  ([(2, 3, 4, 5), (2, 3, 2, 3)], torch.float64, "contiguous"),
                                  ([(1, 2, 3, 3), (1, 2, 1, 1)], torch.float32, "channels_last")]:
        students, teachers = make_maps(shapes, "randn", dtype, device, layout=layout)
        torch.library.opcheck(raw_op("normalized_mse", backend).default, (students, teachers, 1e-5))
        loss, stats = raw_op("normalized_mse", backend)([s.detach() for s in students], teachers, 1e-5)
        assert stats.shape == (5, _stats_planes(students))
        assert stats.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        grad = torch.tensor(0.7, dtype=dtype, device=device)
        torch.library.opcheck(raw_op("normalized_mse_backward", backend).default,
                              (grad, [s.detach() for s in students], teachers, stats))


@KERNELS
def test_backward_op_matches_oracle(device, backend):
    students, teachers = make_maps([(2, 3, 5, 6), (2, 3, 2, 7)], "randn", torch.float64, device)
    _, stats = raw_op("normalized_mse", backend)([s.detach() for s in students], teachers, 1e-5)
    grad = torch.tensor(2.5, dtype=torch.float64, device=device)
    got = raw_op("normalized_mse_backward", backend)(grad, [s.detach() for s in students], teachers, stats)
    _, expected = _oracle_with_grads(students, teachers, upstream=2.5)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.cpu(), e)


@pytest.mark.parametrize("backend", [b for b in all_backends_on("cpu") if b != "reference"])
def test_deterministic_across_runs_and_threads(backend):
    students, teachers = make_maps([(2, 64, 32, 40), (2, 64, 16, 20), (2, 64, 3, 5)], "randn", torch.float32, "cpu")

    def run():
        for s in students:
            s.grad = None
        loss = lgd_ops.normalized_mse(students, teachers, backend=backend)
        loss.backward()
        return [loss.detach().clone()] + [s.grad.clone() for s in students]

    first = same_bits_across_runs_and_threads(run)
    expected = oracle_normalized_mse(students, teachers)
    torch.testing.assert_close(first[0].double(), expected, **TOL[torch.float32])


_level = st.tuples(st.integers(1, 9), st.integers(1, 9))


@given(
    b=st.integers(1, 2),
    c=st.integers(1, 3),
    levels=st.lists(_level, min_size=1, max_size=3),
    kind=st.sampled_from(["randn", "offset", "constant", "correlated"]),
    eps=st.sampled_from([1e-5, 1e-3, 1.0]),
)
@settings(max_examples=30)
def test_fuzz_backends_agree(b, c, levels, kind, eps):
    students, teachers = make_maps([(b, c, h, w) for h, w in levels], kind, torch.float64, "cpu")
    expected, grads = _oracle_with_grads(students, teachers, eps=eps)
    for backend in all_backends_on("cpu"):
        for s in students:
            s.grad = None
        loss = lgd_ops.normalized_mse(students, teachers, eps=eps, backend=backend)
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-9, atol=1e-12)
        loss.backward()
        for s, g in zip(students, grads):
            torch.testing.assert_close(s.grad, g, rtol=1e-7, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# torch.compile (deselect with -m "not compile")
# ---------------------------------------------------------------------------------------------

@pytest.mark.compile
@KERNELS
def test_compile_raw_op(device, backend):
    students, teachers = make_maps([(2, 3, 8, 9), (2, 3, 4, 5)], "randn", torch.float32, device)

    op = raw_op("normalized_mse", backend)

    def fn(s0, s1):
        loss, _ = op([s0 * 2.0, s1], teachers, 1e-5)
        return loss * 3.0

    assert_compiled_matches_eager(fn, students)


@pytest.mark.compile
@KERNELS
def test_compile_public_api(device, backend):
    students, teachers = make_maps([(2, 3, 8, 9), (2, 3, 4, 5)], "randn", torch.float32, device)

    def fn(s0, s1):
        return lgd_ops.normalized_mse([s0 * 2.0, s1], teachers, backend=backend) * 3.0

    assert_compiled_matches_eager(fn, students)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cpu_instruction_sets_agree(layout, dtype):
    """The CPU kernel's AVX2 and baseline copies (LGD_OPS_CPU_ISA=base) give the same bits: loss, statistics and
    gradient, with 43 channels (channels_last: a 32-channel block, then 11 = vectors of 4 float64 or 8 float32
    lanes + single channels) and planes of 77 and 3 elements (tails past the vector loops)."""
    same_bits_in_both_cpu_isas(
        "import sys, torch, lgd_ops\n"
        "torch.manual_seed(0)\n"
        f"fmt = torch.{'channels_last' if layout == 'channels_last' else 'contiguous_format'}\n"
        f"maps = [torch.randn(2, 43, h, w).to(torch.{dtype}).contiguous(memory_format=fmt)"
        " for h, w in ((7, 11), (1, 3)) for _ in range(2)]\n"
        "s, t = maps[0::2], maps[1::2]\n"
        "loss, stats = torch.ops.lgd_ops.normalized_mse(s, t, 1e-5)\n"
        "grads = torch.ops.lgd_ops.normalized_mse_backward(torch.ones((), dtype=loss.dtype), s, t, stats)\n"
        "torch.save([loss, stats, *grads], sys.argv[1])\n")
