"""Argument checks of the public ops: a ValueError naming the argument, before any kernel runs.

Checks that read tensor values (finite boxes, batch indices in range) need one host sync for device boxes; they are
skipped while torch.compile traces and when the op is given a BoxIndex (lgd_ops.box_index checked the boxes when
it built the index, on the host), where the kernels still treat such boxes as covering nothing.
"""
import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(op, name, value, dim=None, floating=False):
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{op}: {name} must have {dim} dimensions, got shape {tuple(value.shape)}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be float16/bfloat16/float32/float64, got {value.dtype}")


def check_same_device(op, named):
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op}: tensors must be on one device, got {devices}")


def check_size(op, name, value, length, minimum):
    """A tuple/list of `length` ints >= minimum."""
    ok = isinstance(value, (tuple, list)) and len(value) == length and all(
        isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) for v in value
    )
    if not ok or any(v < minimum for v in value):
        raise ValueError(f"{op}: {name} must be {length} integers >= {minimum}, got {value!r}")
    return tuple(value)


def check_boxes(op, boxes, batch_idx, image_size, num_images, like, like_name, check_values=True):
    """Validates the (boxes, batch_idx, image_size) triple every box op takes; returns (in_h, in_w).
    check_values=False (an op given a BoxIndex) skips the value checks, not the shape/dtype/device checks."""
    check_tensor(op, "boxes", boxes, dim=2, floating=True)
    if boxes.shape[1] != 4:
        raise ValueError(f"{op}: boxes must be [N, 4] (x1, y1, x2, y2), got shape {tuple(boxes.shape)}")
    check_tensor(op, "batch_idx", batch_idx, dim=1)
    if batch_idx.dtype != torch.int64:
        raise ValueError(f"{op}: batch_idx must be int64, got {batch_idx.dtype}")
    if batch_idx.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"{op}: batch_idx must have one entry per box ({boxes.shape[0]}), got {batch_idx.shape[0]}"
        )
    check_same_device(op, {like_name: like, "boxes": boxes, "batch_idx": batch_idx})
    in_h, in_w = check_size(op, "image_size", image_size, 2, 1)
    if check_values and boxes.shape[0] and not torch.compiler.is_compiling():
        finite = torch.isfinite(boxes).all()
        in_range = ((batch_idx >= 0) & (batch_idx < num_images)).all()
        if not bool(finite & in_range):  # one host sync for both checks
            if not bool(finite):
                raise ValueError(f"{op}: boxes contain NaN or Inf")
            raise ValueError(
                f"{op}: batch_idx values must be in [0, {num_images}), got min {int(batch_idx.min())} "
                f"max {int(batch_idx.max())}"
            )
    return in_h, in_w


def check_eps(op, eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{op}: eps must be a positive finite number, got {eps!r}")
    return float(eps)


def check_memory_format(op, memory_format):
    if memory_format not in (torch.contiguous_format, torch.channels_last):
        raise ValueError(f"{op}: memory_format must be torch.contiguous_format or torch.channels_last, "
                         f"got {memory_format!r}")
    return memory_format == torch.channels_last


def is_channels_last(x):
    """Whether a [B, C, H, W] map is laid out channels_last (and not also NCHW-contiguous)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
