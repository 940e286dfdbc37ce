"""Deformable convolution (v1, and modulated v2) on torchvision.ops.deform_conv2d, and ResNet stages with it.

detectron2's own deformable conv is missing on CUDA in a Python-only install (its placeholder detectron2._C
raises) and, in every install, on CPU for v2 and for several deformable groups (its CPU path is torchvision's op,
v1 only). DeformBottleneckBlock here is detectron2's block with its 3x3 deformable conv on torchvision's op, which
covers every case on CPU and CUDA, under detectron2's parameter names (its weights and checkpoints load).
make_resnet_stages builds a (ResNeXt-capable) ResNet's stages with deformable blocks on the chosen stages, as
detectron2's build_resnet_backbone does for DEFORM_ON_PER_STAGE; a LazyConfig selects it as
model.backbone.bottom_up.stages (lgd/configs/_lgd_config.py). Nothing in detectron2 is patched.
"""
import torch
from detectron2.modeling.backbone.resnet import BottleneckBlock, ResNet
from detectron2.modeling.backbone.resnet import DeformBottleneckBlock as D2DeformBottleneckBlock
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d

# ResNet depth -> blocks per stage (res2..res5), as detectron2's ResNet.make_default_stages
BLOCKS_PER_STAGE = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


class DeformConv2d(nn.Module):
    """detectron2's DeformConv / ModulatedDeformConv interface (weight, bias, norm, activation; forward(x,
    offset[, mask])) on torchvision.ops.deform_conv2d: v1 without a mask, modulated v2 with one."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 deformable_groups=1, bias=False, norm=None, activation=None):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"DeformConv2d: channels {in_channels} -> {out_channels} not divisible by groups "
                             f"{groups}")
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.deformable_groups = deformable_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.norm, self.activation = norm, activation
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def forward(self, x, offset, mask=None):
        """Offsets (N, 2*G*kh*kw, H', W') as (dy, dx) per kernel point; mask (N, G*kh*kw, H', W') for v2."""
        x = deform_conv2d(x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                          dilation=self.dilation, mask=mask)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class DeformBottleneckBlock(D2DeformBottleneckBlock):
    """detectron2's DeformBottleneckBlock (same arguments, forward and initialisation: zero offsets, so it starts
    as a plain 3x3 conv), its conv2 on torchvision's op."""

    def __init__(self, in_channels, out_channels, *, bottleneck_channels, stride=1, num_groups=1, norm="BN",
                 stride_in_1x1=False, dilation=1, deform_modulated=False, deform_num_groups=1):
        super().__init__(in_channels, out_channels, bottleneck_channels=bottleneck_channels, stride=stride,
                         num_groups=num_groups, norm=norm, stride_in_1x1=stride_in_1x1, dilation=dilation,
                         deform_modulated=deform_modulated, deform_num_groups=deform_num_groups)
        d2 = self.conv2
        self.conv2 = DeformConv2d(bottleneck_channels, bottleneck_channels, kernel_size=3, stride=d2.stride,
                                  padding=d2.padding, dilation=d2.dilation, groups=num_groups,
                                  deformable_groups=deform_num_groups, bias=False, norm=d2.norm)
        self.conv2.weight = d2.weight  # detectron2's c2_msra_fill initialisation, kept


def make_resnet_stages(depth, *, deform_on_per_stage=(False, False, False, False), deform_modulated=False,
                       deform_num_groups=1, num_groups=1, width_per_group=64, stride_in_1x1=True, norm="FrozenBN",
                       in_channels=64, out_channels=256):
    """ResNet / ResNeXt (num_groups x width_per_group) stages res2..res5 for ResNet(stages=...), with
    DeformBottleneckBlock on the stages flagged in deform_on_per_stage, as detectron2's build_resnet_backbone
    (RES5_DILATION 1)."""
    if depth not in BLOCKS_PER_STAGE:
        raise ValueError(f"make_resnet_stages: depth must be one of {list(BLOCKS_PER_STAGE)}, got {depth!r}")
    if len(deform_on_per_stage) != 4:
        raise ValueError(f"make_resnet_stages: deform_on_per_stage needs 4 flags (res2..res5), got "
                         f"{list(deform_on_per_stage)}")
    bottleneck_channels = num_groups * width_per_group
    stages = []
    for idx, num_blocks in enumerate(BLOCKS_PER_STAGE[depth]):
        kwargs = dict(bottleneck_channels=bottleneck_channels, num_groups=num_groups, norm=norm,
                      stride_in_1x1=stride_in_1x1)
        if deform_on_per_stage[idx]:
            kwargs.update(block_class=DeformBottleneckBlock, deform_modulated=deform_modulated,
                          deform_num_groups=deform_num_groups)
        else:
            kwargs.update(block_class=BottleneckBlock)
        stages.append(ResNet.make_stage(num_blocks=num_blocks, in_channels=in_channels, out_channels=out_channels,
                                        stride_per_block=[1 if idx == 0 else 2] + [1] * (num_blocks - 1),
                                        **kwargs))
        in_channels, out_channels, bottleneck_channels = out_channels, out_channels * 2, bottleneck_channels * 2
    return stages
