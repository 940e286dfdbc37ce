"""Pyramid levels in and out: dicts (detectron2 backbone outputs) or lists, checked once with clear errors."""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

Levels = Union[Dict[str, torch.Tensor], Sequence[torch.Tensor]]


def split_levels(features: Levels, where: str) -> Tuple[List[torch.Tensor], Optional[List[str]]]:
    """(list of level tensors, the dict's keys in order or None for a list)."""
    if isinstance(features, dict):
        keys = list(features)
        levels = [features[k] for k in keys]
    elif isinstance(features, (list, tuple)):
        keys, levels = None, list(features)
    else:
        raise ValueError(f"{where}: features must be a dict or list of [B, C, H, W] tensors, "
                         f"got {type(features).__name__}")
    if not levels:
        raise ValueError(f"{where}: features must hold at least one level")
    return levels, keys


def join_levels(levels: List[torch.Tensor], keys: Optional[List[str]]) -> Levels:
    """The inverse of split_levels: a dict with the same keys, or a list."""
    return levels if keys is None else dict(zip(keys, levels))


def check_levels(levels: Sequence[torch.Tensor], channels: int, num_images: Optional[int], where: str, name="features"):
    """Every level a floating [B, channels, H, W] tensor with one B (= num_images when given)."""
    if not isinstance(levels, (list, tuple)) or not levels:
        raise ValueError(f"{where}: {name} must be a non-empty list of [B, C, H, W] tensors")
    batch = levels[0].shape[0] if isinstance(levels[0], torch.Tensor) else None
    for i, x in enumerate(levels):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{where}: {name}[{i}] must be a float [B, C, H, W] tensor, got {got}")
        if x.shape[1] != channels:
            raise ValueError(f"{where}: {name}[{i}] must have {channels} channels, got shape {tuple(x.shape)}")
        if x.shape[0] != (num_images if num_images is not None else batch):
            expected = num_images if num_images is not None else batch
            raise ValueError(f"{where}: {name}[{i}] must have batch size {expected} (one per image), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"{where}: {name}[{i}] is empty, shape {tuple(x.shape)}")
