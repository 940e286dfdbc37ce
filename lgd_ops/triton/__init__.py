"""Triton kernels of the three ops, registered as torch.library.triton_op custom ops.

Importing this package registers torch.ops.lgd_ops.box_pool_triton, box_fill_triton,
normalized_mse_triton and normalized_mse_backward_triton (with autograd), so torch.compile sees
the Triton kernels inside them. It needs triton; lgd_ops imports it only when the "triton"
backend runs (lgd_ops._backend). Tensors must be on CUDA, or on CPU under TRITON_INTERPRET=1
(set before this package is first imported: @triton.jit reads it at definition time).
"""
from . import box_fill, box_pool, normalized_mse  # noqa: F401  (registers the ops)
