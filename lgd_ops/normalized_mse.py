"""normalized_mse: InstanceNorm both maps, then one mean squared error over all levels (docs/method.md §4).

Kernels: csrc/normalized_mse/. The forward keeps five numbers per (b, c) plane and the backward
recomputes the normalized maps from them, so no normalized copy of a feature map is ever stored.
"""
import torch

from ._backend import HAS_EXTENSION, select
from ._checks import check_eps, check_same_device, check_tensor, is_channels_last


def normalized_mse(student, teacher, *, eps=1e-5, backend="auto"):
    """sum_l ||IN(student_l) - IN(teacher_l)||^2 / sum_l numel(student_l); no gradient to the teacher.

    student and teacher are [B, C, H, W] tensors or equal-length lists of them (pyramid levels);
    IN is InstanceNorm2d(affine=False, eps): each (b, c) plane by its mean and biased variance.
    """
    students, teachers = _levels(student, teacher)
    eps = check_eps("normalized_mse", eps)
    teachers = [t.detach() for t in teachers]

    def run(name):
        if name == "reference":
            return reference_normalized_mse(students, teachers, eps)
        if name == "triton":
            return torch.ops.lgd_ops.normalized_mse_triton(students, teachers, eps)[0]
        return torch.ops.lgd_ops.normalized_mse(students, teachers, eps)[0]

    return run(select("normalized_mse", backend, students[0], is_channels_last(students[0]), run))


def reference_normalized_mse(students, teachers, eps=1e-5):
    """InstanceNorm on every level, squared error summed, divided by the total element count."""
    total = sum(s.numel() for s in students)
    sq = sum((_instance_norm(s, eps) - _instance_norm(t.detach(), eps)).pow(2).sum() for s, t in zip(students, teachers))
    return sq / total


def _instance_norm(x, eps):
    """F.instance_norm(x, eps=eps)'s math, written out because F.instance_norm refuses 1x1 maps
    in training mode (a 1x1 plane normalizes to 0, which the kernels return). fp16/bf16 maps are
    normalized in fp32, as autocast runs instance_norm."""
    y = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    mean = y.mean((2, 3), keepdim=True)
    var = y.var((2, 3), unbiased=False, keepdim=True)
    return ((y - mean) * torch.rsqrt(var + eps)).to(x.dtype)


def _levels(student, teacher):
    op = "normalized_mse"
    single = isinstance(student, torch.Tensor)
    if single != isinstance(teacher, torch.Tensor):
        raise ValueError(f"{op}: student and teacher must both be tensors or both be lists of tensors")
    students = [student] if single else list(student)
    teachers = [teacher] if single else list(teacher)
    if not students or len(students) != len(teachers):
        raise ValueError(
            f"{op}: student and teacher must be non-empty lists of equal length, got "
            f"{len(students)} and {len(teachers)}"
        )
    for level, (s, t) in enumerate(zip(students, teachers)):
        check_tensor(op, f"student[{level}]", s, dim=4, floating=True)
        check_tensor(op, f"teacher[{level}]", t, dim=4, floating=True)
        if s.shape != t.shape:
            raise ValueError(
                f"{op}: student[{level}] {tuple(s.shape)} and teacher[{level}] {tuple(t.shape)} must have one shape"
            )
        if s.numel() == 0:
            raise ValueError(f"{op}: student[{level}] is empty (shape {tuple(s.shape)})")
        for name, x in ((f"student[{level}]", s), (f"teacher[{level}]", t)):
            if x.dtype != students[0].dtype:
                raise ValueError(f"{op}: all maps must share one dtype: {name} is {x.dtype}, student[0] is "
                                 f"{students[0].dtype}")
    check_same_device(op, {f"{side}[{i}]": x for side, xs in (("student", students), ("teacher", teachers))
                           for i, x in enumerate(xs)})
    return students, teachers


def register_autograd(op, backward_op):
    """Autograd of a normalized_mse-schema op: torch.ops.lgd_ops.<backward_op>(grad, student, teacher,
    stats) gives the students' gradients from the saved per-plane statistics; the teacher gets none."""

    def setup_context(ctx, inputs, output):
        student, teacher, _ = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(*student, *teacher, output[1])
        ctx.levels = len(student)

    def backward(ctx, grad, _grad_stats):
        saved, n = ctx.saved_tensors, ctx.levels
        grads = getattr(torch.ops.lgd_ops, backward_op)(grad, saved[:n], saved[n : 2 * n], saved[-1])
        return list(grads), [None] * n, None

    torch.library.register_autograd(op, backward, setup_context=setup_context)


if HAS_EXTENSION:

    @torch.library.register_fake("lgd_ops::normalized_mse")
    def _(student, teacher, eps):
        planes = sum(s.shape[0] * s.shape[1] for s in student)
        acc = torch.float64 if student[0].dtype == torch.float64 else torch.float32
        return student[0].new_empty(()), student[0].new_empty(5, planes, dtype=acc)

    @torch.library.register_fake("lgd_ops::normalized_mse_backward")
    def _(grad, student, teacher, stats):
        # the kernels write a channels_last student's gradient channels_last; otherwise NCHW-contiguous
        return [torch.empty_like(s, memory_format=torch.channels_last if is_channels_last(s) else torch.contiguous_format)
                for s in student]

    register_autograd("lgd_ops::normalized_mse", "normalized_mse_backward")
