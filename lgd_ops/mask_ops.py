"""mask_pool / mask_fill: box_pool and box_fill with dense per-object masks (Mask R-CNN variant, docs/method.md §7).

Masks [N, Hm, Wm] (bool or 0/1), rasterized at any resolution, are nearest-resized to the level.
Reference implementations only: the masks are dense by nature.
"""
import torch
import torch.nn.functional as F

from ._boxes import fill_with_masks, pool_with_masks
from ._checks import check_same_device, check_size, check_tensor


def _level_masks(op, masks, batch_idx, num_images, height, width, like, like_name):
    check_tensor(op, "masks", masks, dim=3)
    if masks.shape[1] == 0 or masks.shape[2] == 0:
        raise ValueError(f"{op}: masks must be [N, Hm, Wm] with Hm, Wm >= 1, got shape {tuple(masks.shape)}")
    check_tensor(op, "batch_idx", batch_idx, dim=1)
    if batch_idx.dtype != torch.int64 or batch_idx.shape[0] != masks.shape[0]:
        raise ValueError(f"{op}: batch_idx must be int64 [N] with N = masks.shape[0] ({masks.shape[0]})")
    check_same_device(op, {like_name: like, "masks": masks, "batch_idx": batch_idx})
    if masks.shape[0] and not torch.compiler.is_compiling():
        if not bool(((batch_idx >= 0) & (batch_idx < num_images)).all()):
            raise ValueError(f"{op}: batch_idx values must be in [0, {num_images})")
    m = masks.to(torch.float32)
    if m.shape[1:] != (height, width) and m.shape[0]:
        m = F.interpolate(m[:, None], size=(height, width), mode="nearest")[:, 0]
    return (m > 0.5).reshape(m.shape[0], height * width).to(like.dtype)


def mask_pool(features, masks, batch_idx):
    """Mean of `features` [B, C, H, W] over each object's mask pixels -> [N, C] (zero for an empty mask)."""
    check_tensor("mask_pool", "features", features, dim=4, floating=True)
    n_img, _, height, width = features.shape
    m = _level_masks("mask_pool", masks, batch_idx, n_img, height, width, features, "features")
    return pool_with_masks(features, m, batch_idx, average=True)


def mask_fill(embeddings, masks, batch_idx, output_size):
    """Sum of `embeddings` [N, C] over the masks covering each pixel -> [B, C, H, W]."""
    check_tensor("mask_fill", "embeddings", embeddings, dim=2, floating=True)
    n_img, height, width = check_size("mask_fill", "output_size", output_size, 3, 1)
    m = _level_masks("mask_fill", masks, batch_idx, n_img, height, width, embeddings, "embeddings")
    if embeddings.shape[0] != m.shape[0]:
        raise ValueError(f"mask_fill: embeddings must have one row per mask ({m.shape[0]}), got {embeddings.shape[0]}")
    return fill_with_masks(embeddings, m, batch_idx, (n_img, height, width), average=False)
