"""box_pool: the mean of a feature map over each object box's cells (docs/method.md §1-2).

The appearance encoder pools every level this way. Kernels: csrc/box_pool/ (torch.ops.lgd_ops.box_pool);
its backward is box_fill with average=True, its adjoint.
"""
import torch

from ._backend import HAS_EXTENSION, select
from ._boxes import box_masks, pool_with_masks
from ._checks import check_boxes, check_tensor, is_channels_last


def box_pool(features, boxes, batch_idx, image_size, *, validate=True, backend="auto"):
    """Mean of `features` [B, C, H, W] over each box's cells -> [N, C].

    boxes [N, 4] (x1, y1, x2, y2) in padded-input pixels, batch_idx [N] int64 (the box's image),
    image_size (H_in, W_in) the padded input size. A box covering no cell gives a zero row.
    features may be NCHW-contiguous or channels_last (read as they are; the gradient has their layout).
    validate=False skips the checks that read the boxes' values (finite, batch_idx in range: one host
    sync) for callers that validated them once per batch (lgd.modeling.labels.PackedLabels does).
    """
    check_tensor("box_pool", "features", features, dim=4, floating=True)
    in_h, in_w = check_boxes("box_pool", boxes, batch_idx, image_size, features.shape[0], features, "features",
                             validate)

    def run(name):
        if name == "reference":
            return reference_box_pool(features, boxes, batch_idx, (in_h, in_w))
        if name == "triton":
            return torch.ops.lgd_ops.box_pool_triton(features, boxes, batch_idx, in_h, in_w, True)
        return torch.ops.lgd_ops.box_pool(features, boxes, batch_idx, in_h, in_w, True)

    return run(select("box_pool", backend, features, is_channels_last(features), run))


def reference_box_pool(features, boxes, batch_idx, image_size, average=True):
    """Dense masks [N, H*W] times the flattened map, image by image (the authors' formulation)."""
    masks = box_masks(boxes, image_size, features.shape[2], features.shape[3]).to(features.dtype)
    return pool_with_masks(features, masks, batch_idx, average)


def register_autograd(op, adjoint):
    """Autograd of a box_pool-schema op: the gradient is torch.ops.lgd_ops.<adjoint> (a box_fill-schema
    op) of the output gradient, with the same average flag (docs/method.md §3: fill and pool are adjoint)."""

    def setup_context(ctx, inputs, output):
        features, boxes, batch_idx, in_h, in_w, average = inputs[:6]
        ctx.save_for_backward(boxes, batch_idx, *inputs[6:])  # the level index, where the schema has one
        ctx.args = (in_h, in_w, features.shape[0], features.shape[2], features.shape[3], average,
                    is_channels_last(features))
        ctx.inputs = len(inputs)

    def backward(ctx, grad):
        boxes, batch_idx, *index = ctx.saved_tensors
        index = [i for i in index if i is not None]
        grad_features = getattr(torch.ops.lgd_ops, adjoint)(grad, boxes, batch_idx, *ctx.args, *index)
        return (grad_features,) + (None,) * (ctx.inputs - 1)  # features' layout

    torch.library.register_autograd(op, backward, setup_context=setup_context)


if HAS_EXTENSION:

    @torch.library.register_fake("lgd_ops::box_pool")
    def _(features, boxes, batch_idx, in_h, in_w, average):
        return features.new_empty(boxes.shape[0], features.shape[1])

    register_autograd("lgd_ops::box_pool", "box_fill")
