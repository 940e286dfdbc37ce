"""LabelEnc's label-encoding network (Hao et al., ECCV 2020; docs/methods/labelenc.md).

The ground truth is drawn as dense per-category "colour maps" (render_colour_maps), which a small CNN
(no normalization layers) plus a copy of the detector's own FPN turn into features at the detector's FPN
levels (build_label_encoding_network). feature_distance is the loss between the student's adapted
features and those label features, as the authors' code computes it.
"""
import copy
import math
from typing import Dict, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec
from detectron2.modeling.backbone import FPN, Backbone
from detectron2.modeling.backbone.resnet import BottleneckBlock, ResNet
from detectron2.structures import Instances

__all__ = ["LabelEncodingBottomUp", "build_label_encoding_network", "feature_adapter", "feature_distance",
           "render_colour_maps"]


def render_colour_maps(instances: Sequence[Instances], num_classes: int, image_size: Tuple[int, int], *,
                       jitter: bool = False) -> torch.Tensor:
    """[B, K, H, W] float32 colour maps of the ground truth on the padded input (H, W), as the authors draw them.

    Pixel (x, y) (integer coordinates, no half-pixel offset) gets, from a box of class k with centre (cx, cy)
    and size (w, h), the value 1 - max(|x - cx| / w, |y - cy| / h) when that is >= 0.5 (inside the box,
    edges included: 1 at the centre, 0.5 on the border), else 0; channel k keeps the maximum over its boxes.
    jitter (the authors' step-1 augmentation): each box's values are scaled by min(u, 1), u ~ U(0, 2).
    Boxes with w <= 0 or h <= 0 draw nothing (the authors' formula divides by zero there).
    """
    height, width = (int(s) for s in image_size)
    if not isinstance(instances, (list, tuple)) or not instances:
        raise ValueError("render_colour_maps: instances must be a non-empty list of Instances, one per image")
    device = instances[0].gt_boxes.device
    maps = torch.zeros(len(instances), num_classes, height, width, device=device)
    xs = torch.arange(width, dtype=torch.float32, device=device)
    ys = torch.arange(height, dtype=torch.float32, device=device)
    for b, inst in enumerate(instances):
        if not len(inst):
            continue
        classes = inst.gt_classes
        if bool(((classes < 0) | (classes >= num_classes)).any()):
            raise ValueError(f"render_colour_maps: gt_classes must be in [0, {num_classes}), got "
                             f"{sorted(set(classes.tolist()))}")
        boxes = inst.gt_boxes.tensor.to(device=device, dtype=torch.float32)
        centres, sizes = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]
        scales = (torch.rand(len(boxes), device=device) * 2).clamp(max=1) if jitter else None
        for i, (k, (cx, cy), (w, h)) in enumerate(zip(classes.tolist(), centres.tolist(), sizes.tolist())):
            if w <= 0 or h <= 0:
                continue
            # the pixels that can reach 0.5, with one pixel to spare; the threshold below decides exactly
            x0, x1 = max(math.floor(cx - w / 2) - 1, 0), min(math.ceil(cx + w / 2) + 2, width)
            y0, y1 = max(math.floor(cy - h / 2) - 1, 0), min(math.ceil(cy + h / 2) + 2, height)
            if x0 >= x1 or y0 >= y1:
                continue
            dx = (xs[x0:x1] - centres[i, 0]).abs() / sizes[i, 0]
            dy = (ys[y0:y1] - centres[i, 1]).abs() / sizes[i, 1]
            colour = 1 - torch.maximum(dx[None, :], dy[:, None])
            colour = colour * (colour >= 0.5)
            if scales is not None:
                colour = colour * scales[i]
            window = maps[b, k, y0:y1, x0:x1]
            torch.maximum(window, colour, out=window)
    return maps


class _Stem(CNNBlockBase):
    """The authors' first stage: one 7x7 stride-2 convolution, no normalization and no activation."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 2)
        self.conv = Conv2d(in_channels, out_channels, kernel_size=7, stride=2, padding=3)
        weight_init.c2_msra_fill(self.conv)

    def forward(self, x):
        return self.conv(x)


class LabelEncodingBottomUp(Backbone):
    """The label-encoding CNN: the stem, then bottleneck stages (detectron2's BottleneckBlock without norm,
    stride 2 in each stage's first block, bottleneck width = output width / 4), one per stride 4, 8, ...

    outputs: the FPN's bottom-up inputs it must produce, name -> ShapeSpec(channels, stride), strides powers
    of two from 8 (or 4) upwards; the stages below the first output get half the next stage's width.
    blocks: blocks per stage, one entry per stage (strides 4 .. the largest output stride).
    """

    def __init__(self, num_classes: int, outputs: Dict[str, ShapeSpec], *, blocks: Sequence[int],
                 stem_channels=None):
        super().__init__()
        by_stride = {spec.stride: (name, spec.channels) for name, spec in outputs.items()}
        top = max(by_stride)
        strides = [4 * 2 ** i for i in range(int(math.log2(top)) - 1)]
        if set(by_stride) - set(strides) or len(blocks) != len(strides):
            raise ValueError(f"LabelEncodingBottomUp: outputs need strides among {strides} and blocks one count "
                             f"per stage ({len(strides)}), got strides {sorted(by_stride)} and blocks {list(blocks)}")
        widths = [0] * len(strides)
        for i in reversed(range(len(strides))):
            widths[i] = by_stride[strides[i]][1] if strides[i] in by_stride else widths[i + 1] // 2
        stem_channels = int(stem_channels) if stem_channels is not None else max(widths[0] // 2, 1)
        self.stem = _Stem(num_classes, stem_channels)
        self.stage_names = [by_stride.get(s, (f"label_stride{s}",))[0] for s in strides]
        self.stages = nn.ModuleList()
        in_channels = stem_channels
        for width, count in zip(widths, blocks):
            self.stages.append(nn.Sequential(*ResNet.make_stage(
                BottleneckBlock, int(count), in_channels=in_channels, out_channels=width,
                bottleneck_channels=max(width // 4, 1), stride_per_block=[2] + [1] * (int(count) - 1), norm="")))
            in_channels = width
        self._outputs = dict(outputs)
        self._out_features = list(outputs)

    def forward(self, x):
        x = self.stem(x)
        out = {}
        for name, stage in zip(self.stage_names, self.stages):
            x = stage(x)
            if name in self._outputs:
                out[name] = x
        return out

    def output_shape(self):
        return dict(self._outputs)


def build_label_encoding_network(fpn: FPN, num_classes: int, *, blocks: Sequence[int] = (1, 2, 2, 1),
                                 stem_channels=None) -> FPN:
    """The label-encoding network for a detector whose backbone is `fpn`: a LabelEncodingBottomUp producing
    the inputs the FPN reads (same names, strides, widths), under a freshly initialised copy of the FPN
    (same levels, channels, norm, top block). Its state_dict therefore matches the detector's FPN key for key
    outside bottom_up.*, which is how step 2 initialises the student's FPN from it."""
    if not isinstance(fpn, FPN):
        raise ValueError(f"LabelEnc: the detector's backbone must be a detectron2 FPN, got {type(fpn).__name__}")
    shapes = fpn.bottom_up.output_shape()
    read = set(fpn.in_features)
    top_in = getattr(fpn.top_block, "in_feature", None)
    if top_in in shapes:
        read.add(top_in)
    bottom_up = LabelEncodingBottomUp(num_classes, {f: shapes[f] for f in shapes if f in read}, blocks=blocks,
                                      stem_channels=stem_channels)
    network = copy.deepcopy(fpn, memo={id(fpn.bottom_up): bottom_up})  # the FPN's structure, our bottom-up
    for name, module in network.named_modules():
        if name == "bottom_up" or name.startswith("bottom_up."):
            continue
        if isinstance(module, nn.Conv2d):
            weight_init.c2_xavier_fill(module)  # as detectron2's FPN initialises its convolutions
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return network


def feature_adapter(channels: int) -> nn.Sequential:
    """The authors' student adapter, shared by all levels: conv3x3-ReLU-conv3x3-ReLU-conv3x3, C -> C."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(channels, channels, 3, padding=1))


def feature_distance(students: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], eps: float = 1e-5):
    """Mean squared difference over all levels' elements, each map first normalised per image over (C, H, W)
    (GroupNorm with one group, no affine), computed in fp32; the label features are detached."""
    def flat(maps, detach):
        return torch.cat([F.group_norm((m.detach() if detach else m).float(), 1, eps=eps).flatten(1)
                          for m in maps], dim=1)

    return F.mse_loss(flat(students, False), flat(labels, True))
