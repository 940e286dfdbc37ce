"""box_fill: the knowledge mapper's sum of object embeddings painted into their boxes (docs/method.md §3).

Kernels: csrc/box_fill/ (torch.ops.lgd_ops.box_fill); its backward is box_pool with average=False.
"""
import torch

from ._backend import HAS_EXTENSION, select
from ._boxes import box_masks, fill_with_masks
from ._checks import check_boxes, check_memory_format, check_size, check_tensor


def box_fill(embeddings, boxes, batch_idx, image_size, output_size, *, memory_format=torch.contiguous_format,
             validate=True, backend="auto"):
    """Sum of `embeddings` [N, C] over the boxes covering each cell -> [B, C, H, W].

    output_size = (B, H, W); boxes, batch_idx and image_size as in box_pool. Overlaps add up;
    an image with no boxes gets a zero map. memory_format: torch.contiguous_format or torch.channels_last
    (the kernels write either directly). validate=False skips the checks that read the boxes' values
    (finite, batch_idx in range: one host sync) for callers that validated them once per batch.
    """
    check_tensor("box_fill", "embeddings", embeddings, dim=2, floating=True)
    n_img, height, width = check_size("box_fill", "output_size", output_size, 3, 1)
    in_h, in_w = check_boxes("box_fill", boxes, batch_idx, image_size, n_img, embeddings, "embeddings", validate)
    if embeddings.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"box_fill: embeddings must have one row per box ({boxes.shape[0]}), got {embeddings.shape[0]}"
        )
    channels_last = check_memory_format("box_fill", memory_format)

    def run(name):
        if name == "reference":
            out = reference_box_fill(embeddings, boxes, batch_idx, (in_h, in_w), (n_img, height, width))
            return out.contiguous(memory_format=memory_format)
        if name == "triton":
            return torch.ops.lgd_ops.box_fill_triton(
                embeddings, boxes, batch_idx, in_h, in_w, n_img, height, width, False, channels_last)
        return torch.ops.lgd_ops.box_fill(embeddings, boxes, batch_idx, in_h, in_w, n_img, height, width, False,
                                          channels_last)

    return run(select("box_fill", backend, embeddings, channels_last, run))  # keyed by the map it writes


def reference_box_fill(embeddings, boxes, batch_idx, image_size, output_size, average=False):
    """Dense masks [N, H*W]: each image's map is its embeddings^T times its masks."""
    masks = box_masks(boxes, image_size, output_size[1], output_size[2]).to(embeddings.dtype)
    return fill_with_masks(embeddings, masks, batch_idx, output_size, average)


def fake_box_fill(values, boxes, batch_idx, in_h, in_w, batch, out_h, out_w, average, channels_last=False):
    """The output a box_fill-schema op returns, for fake tensors."""
    return values.new_empty(batch, values.shape[1], out_h, out_w).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def register_autograd(op, adjoint):
    """Autograd of a box_fill-schema op: the gradient is torch.ops.lgd_ops.<adjoint> (a box_pool-schema
    op) of the output gradient, with the same average flag (docs/method.md §3: fill and pool are adjoint)."""

    def setup_context(ctx, inputs, output):
        _, boxes, batch_idx, in_h, in_w, _, _, _, average = inputs[:9]
        ctx.save_for_backward(boxes, batch_idx, *inputs[10:])  # the level index, where the schema has one
        ctx.args = (in_h, in_w, average)
        ctx.inputs = len(inputs)

    def backward(ctx, grad):
        boxes, batch_idx, *index = ctx.saved_tensors
        index = [i for i in index if i is not None]
        grad_values = getattr(torch.ops.lgd_ops, adjoint)(grad, boxes, batch_idx, *ctx.args, *index)
        return (grad_values,) + (None,) * (ctx.inputs - 1)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


if HAS_EXTENSION:
    torch.library.register_fake("lgd_ops::box_fill")(fake_box_fill)
    register_autograd("lgd_ops::box_fill", "box_pool")
