"""The demo's backbone: torchvision's MobileNetV2 as a detectron2 Backbone (outputs m2-m5, strides 4-32), and an
FPN on it with RetinaNet's P6/P7. Why MobileNetV2: ~2.2M parameters up to stride 32 and ImageNet weights available
offline (lgd.demo.assets), so a detector that starts from pretrained features trains in minutes on 2 CPU cores.

The stage outputs are the last block of each resolution of torchvision's `features`; the 1x1 conv to 1280 channels
(a classifier head) and the blocks after the deepest requested output are dropped. Weights are loaded by position,
since exporters prefix the keys differently, with every shape checked.
"""
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torchvision
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7

__all__ = ["MOBILENETV2_STAGES", "MobileNetV2Backbone", "build_mobilenetv2_fpn", "load_by_position"]

# output name -> (index of the stage's last block in torchvision's mobilenet_v2().features, channels, stride)
MOBILENETV2_STAGES = {"m2": (3, 24, 4), "m3": (6, 32, 8), "m4": (13, 96, 16), "m5": (17, 320, 32)}
NORMS = ("FrozenBN", "BN")


def load_by_position(module: nn.Module, state_dict: Dict[str, torch.Tensor], source: str = "state_dict"):
    """Copies the tensors of `state_dict` into `module`'s state dict entry by entry, in order, ignoring key
    names (they differ by prefix between exporters). Raises ValueError naming `source` when the entry counts
    or any shape differ, before anything is copied."""
    target = module.state_dict()
    if len(state_dict) != len(target):
        raise ValueError(f"load_by_position: {source} has {len(state_dict)} tensors, {type(module).__name__} "
                         f"expects {len(target)}")
    for (src_key, value), (dst_key, expected) in zip(state_dict.items(), target.items()):
        if tuple(value.shape) != tuple(expected.shape):
            raise ValueError(f"load_by_position: {source} entry {src_key!r} has shape {tuple(value.shape)}, "
                             f"but {dst_key!r} expects {tuple(expected.shape)}")
    module.load_state_dict(dict(zip(target.keys(), state_dict.values())))


class MobileNetV2Backbone(Backbone):
    """torchvision MobileNetV2 `features` as a detectron2 Backbone with outputs from MOBILENETV2_STAGES.

    weights: path of a `mobilenet_v2().features` state dict (loaded by position), or None for random init.
    out_features: subset of MOBILENETV2_STAGES' names; blocks after the deepest requested one are dropped, and so
    is the 1x1 conv to 1280 channels (index 18, a classifier head). norm: "FrozenBN" (default: the pretrained
    statistics kept, right for small CPU batches) or "BN".
    Input: RGB normalized with the ImageNet mean/std (set the detector's pixel_mean/pixel_std and
    input_format="RGB" accordingly).
    """

    def __init__(self, weights: Optional[str] = None, out_features: Sequence[str] = ("m3", "m4", "m5"),
                 norm: str = "FrozenBN"):
        super().__init__()
        out_features = list(out_features)
        unknown = [f for f in out_features if f not in MOBILENETV2_STAGES]
        if not out_features or unknown:
            raise ValueError(f"MobileNetV2Backbone: out_features must be a non-empty subset of "
                             f"{sorted(MOBILENETV2_STAGES)}, got {out_features}")
        if norm not in NORMS:
            raise ValueError(f"MobileNetV2Backbone: norm must be one of {NORMS}, got {norm!r}")
        features = torchvision.models.mobilenet_v2().features
        if weights is not None:
            load_by_position(features, torch.load(weights, map_location="cpu", weights_only=True), source=weights)
        out_features.sort(key=lambda f: MOBILENETV2_STAGES[f][0])
        last = MOBILENETV2_STAGES[out_features[-1]][0]
        self.features = features[: last + 1]
        if norm == "FrozenBN":
            self.features = FrozenBatchNorm2d.convert_frozen_batchnorm(self.features)
        self._out_at = {MOBILENETV2_STAGES[f][0]: f for f in out_features}
        self._out_features = out_features
        self._out_feature_channels = {f: MOBILENETV2_STAGES[f][1] for f in out_features}
        self._out_feature_strides = {f: MOBILENETV2_STAGES[f][2] for f in out_features}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"MobileNetV2Backbone takes [N, 3, H, W] images, got shape {tuple(x.shape)}")
        outputs = {}
        for index, block in enumerate(self.features):
            x = block(x)
            if index in self._out_at:
                outputs[self._out_at[index]] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {f: ShapeSpec(channels=self._out_feature_channels[f], stride=self._out_feature_strides[f])
                for f in self._out_features}


def build_mobilenetv2_fpn(weights: Optional[str] = None, out_channels: int = 64, norm: str = "FrozenBN",
                          fpn_norm: str = "") -> FPN:
    """detectron2 FPN on MobileNetV2 m3-m5 with RetinaNet's P6/P7 (from P5): p3..p7, strides 8..128."""
    bottom_up = MobileNetV2Backbone(weights=weights, out_features=("m3", "m4", "m5"), norm=norm)
    return FPN(bottom_up=bottom_up, in_features=["m3", "m4", "m5"], out_channels=out_channels, norm=fpn_norm,
               top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"))
