"""lgd.modeling.deform: DeformConv2d (torchvision's deform_conv2d) against a float64 direct implementation
written here (v1 and modulated v2, groups, deformable groups, stride, dilation, offsets sampling outside the map),
forward and backward, gradcheck; DeformBottleneckBlock starting as a plain conv; a deformable ResNet / ResNeXt
running forward and backward with detectron2's parameter names; the paper's DCN configs building and training
(shrunk) and refusing missing ImageNet weights in one line. CPU, seconds."""
import copy
import glob
import math
import os

import pytest

pytest.importorskip("detectron2")

import torch
from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock, ResNet
from detectron2.modeling.backbone.resnet import DeformBottleneckBlock as D2DeformBottleneckBlock
from detectron2.utils.events import EventStorage

from lgd.modeling.deform import DeformBottleneckBlock, DeformConv2d, make_resnet_stages

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lgd", "configs")


def _sample(plane, y, x):
    """Bilinear value of one (H, W) plane at the real point (y, x) (0-d tensors, so gradients reach them);
    corners outside the plane count as zero."""
    height, width = plane.shape
    y0, x0 = math.floor(y.item()), math.floor(x.item())
    value = plane.new_zeros(())
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < height and 0 <= xx < width:
                value = value + wy * wx * plane[yy, xx]
    return value


def reference_deform_conv(x, offset, weight, bias, stride, padding, dilation, mask=None):
    """Deformable conv by definition: output[n, o, i, j] = bias[o] + sum over the input channels c of o's group
    and kernel points k of weight[o, c, k] * mask[n, g k, i, j] * x[n, c] sampled at
    (i*stride - padding + ky*dilation + dy, j*stride - padding + kx*dilation + dx), (dy, dx) = the offsets of
    c's deformable group g at k (channels 2 (g K + k) and 2 (g K + k) + 1)."""
    n_img, in_ch, _, _ = x.shape
    out_ch, in_per_group, kh, kw = weight.shape
    groups, points = in_ch // in_per_group, kh * kw
    deform_groups = offset.shape[1] // (2 * points)
    out_h, out_w = offset.shape[2:]
    columns = []  # [n][c][k] -> (out_h, out_w)
    for n in range(n_img):
        per_channel = []
        for c in range(in_ch):
            g = c // (in_ch // deform_groups)
            per_point = []
            for k in range(points):
                ky, kx = divmod(k, kw)
                rows = []
                for i in range(out_h):
                    row = []
                    for j in range(out_w):
                        dy, dx = offset[n, 2 * (g * points + k), i, j], offset[n, 2 * (g * points + k) + 1, i, j]
                        v = _sample(x[n, c], i * stride - padding + ky * dilation + dy,
                                    j * stride - padding + kx * dilation + dx)
                        row.append(v if mask is None else v * mask[n, g * points + k, i, j])
                    rows.append(torch.stack(row))
                per_point.append(torch.stack(rows))
            per_channel.append(torch.stack(per_point))
        columns.append(torch.stack(per_channel))
    columns = torch.stack(columns)  # (N, C, K, out_h, out_w)
    out_per_group = out_ch // groups
    out = []
    for o in range(out_ch):
        g = o // out_per_group
        cols = columns[:, g * in_per_group:(g + 1) * in_per_group]
        out.append(torch.einsum("nckij,ck->nij", cols, weight[o].reshape(in_per_group, points)))
    out = torch.stack(out, 1)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


# (modulated, in_ch, out_ch, groups, deformable_groups, stride, padding, dilation, bias)
CASES = [
    (False, 2, 2, 1, 1, 1, 1, 1, False),
    (True, 2, 2, 1, 1, 1, 1, 1, True),
    (False, 4, 2, 2, 2, 2, 1, 1, True),
    (True, 4, 4, 2, 2, 1, 2, 2, False),
    (True, 2, 4, 1, 2, 2, 0, 1, False),
]


def _inputs(case, seed=0, size=(5, 4)):
    modulated, in_ch, out_ch, groups, dgroups, stride, padding, dilation, bias = case
    gen = torch.Generator().manual_seed(seed)
    conv = DeformConv2d(in_ch, out_ch, 3, stride=stride, padding=padding, dilation=dilation, groups=groups,
                        deformable_groups=dgroups, bias=bias).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64))
        if bias:
            conv.bias.copy_(torch.randn(out_ch, generator=gen, dtype=torch.float64))
    x = torch.randn(1, in_ch, *size, generator=gen, dtype=torch.float64)
    out_h = (size[0] + 2 * padding - 2 * dilation - 1) // stride + 1
    out_w = (size[1] + 2 * padding - 2 * dilation - 1) // stride + 1
    # offsets up to ~6 pixels: many samples fall partly or wholly outside the map
    offset = 3 * torch.randn(1, 2 * dgroups * 9, out_h, out_w, generator=gen, dtype=torch.float64)
    mask = torch.rand(1, dgroups * 9, out_h, out_w, generator=gen, dtype=torch.float64) if modulated else None
    return conv, x, offset, mask


def _reference(conv, x, offset, mask=None):
    return reference_deform_conv(x, offset, conv.weight, conv.bias, conv.stride[0], conv.padding[0],
                                 conv.dilation[0], mask)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_matches_direct_implementation_forward_and_backward(case, device):
    conv, x, offset, mask = _inputs(case)
    # offsets of a few pixels both ways: border outputs sample partly or wholly outside the map
    assert (offset > 2).any() and (offset < -2).any()
    tensors = [t for t in (x, offset, mask) if t is not None]
    ref_inputs = [t.clone().requires_grad_() for t in tensors]
    ref = _reference(conv, *ref_inputs)
    moved = copy.deepcopy(conv).to(device)
    inputs = [t.to(device).requires_grad_() for t in tensors]
    out = moved(*inputs)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(ref)
    got = torch.autograd.grad(out, inputs + list(moved.parameters()), grad_out.to(device))
    want = torch.autograd.grad(ref, ref_inputs + list(conv.parameters()), grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-9, atol=1e-9)


def test_offsets_wholly_outside_read_zeros():
    conv, x, offset, _ = _inputs(CASES[0])
    out = conv(x, torch.full_like(offset, 100.0))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
def test_gradcheck(case):
    conv, x, offset, mask = _inputs(case, seed=1, size=(4, 4))
    inputs = tuple(t.requires_grad_() for t in (x, offset, mask) if t is not None)
    assert torch.autograd.gradcheck(lambda x, offset, *mask: conv(x, offset, *mask), inputs, eps=1e-6, atol=1e-6)


def test_detectron2_block_fails_where_ours_runs():
    """The premise (detectron2's block runs v2 on no CPU) and the swap it calls for."""
    x = torch.randn(1, 8, 6, 6)
    with pytest.raises(NotImplementedError, match="not supported on CPUs"):
        D2DeformBottleneckBlock(8, 16, bottleneck_channels=4, norm="BN", deform_modulated=True)(x)
    block = DeformBottleneckBlock(8, 16, bottleneck_channels=4, norm="BN", deform_modulated=True)
    assert isinstance(block.conv2, DeformConv2d)
    assert block(x).shape == (1, 16, 6, 6)


@pytest.mark.parametrize("modulated", [False, True])
def test_block_starts_as_a_plain_bottleneck(modulated):
    """Offsets initialised to zero as detectron2 does: v1 is the plain block with the same weights; v2's mask
    starts at sigmoid(0) = 1/2, so it is the plain block with conv2's weight halved."""
    torch.manual_seed(0)
    kwargs = dict(bottleneck_channels=8, stride=2, num_groups=2, norm="BN", stride_in_1x1=True)
    block = DeformBottleneckBlock(16, 32, deform_modulated=modulated, deform_num_groups=2, **kwargs).eval()
    assert block.conv2_offset.weight.abs().sum() == 0 and block.conv2_offset.bias.abs().sum() == 0
    plain = BottleneckBlock(16, 32, **kwargs).eval()
    state = {k: v for k, v in block.state_dict().items() if not k.startswith("conv2_offset")}
    if modulated:
        state["conv2.weight"] = state["conv2.weight"] / 2
    plain.load_state_dict(state)
    x = torch.randn(2, 16, 9, 10)
    torch.testing.assert_close(block(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("modulated", [False, True])
def test_deformable_resnext_forward_backward(modulated):
    """A (shrunk) ResNeXt-50 with deformable res3..res5 trains: every parameter, the offset convs included, gets
    a finite gradient, and moving the offsets changes the output."""
    torch.manual_seed(0)
    stages = make_resnet_stages(50, deform_on_per_stage=[False, True, True, True], deform_modulated=modulated,
                                num_groups=2, width_per_group=2, norm="BN", in_channels=8, out_channels=16)
    model = ResNet(BasicStem(3, 8, norm="BN"), stages, out_features=["res3", "res4", "res5"])
    assert sum(isinstance(b, DeformBottleneckBlock) for s in stages for b in s) == 4 + 6 + 3
    assert model.res4[0].conv2.weight.shape == (16, 8, 3, 3)  # groups: bottleneck 2 x 2 x 4 at res4
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out["res5"].shape == (2, 128, 2, 2)
    sum(v.square().mean() for v in out.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.res3[0].conv2_offset.weight.grad.abs().sum() > 0
    before = model(x)["res5"]
    with torch.no_grad():
        model.res3[0].conv2_offset.bias.fill_(0.5)
    assert not torch.allclose(model(x)["res5"], before)


def test_same_parameters_as_detectron2_build_resnet_backbone():
    """Same state-dict keys and shapes as detectron2's own deformable ResNeXt (build_resnet_backbone), so its
    ImageNet weights and checkpoints load (shrunk widths; X-101 32x8d DCN v2 matches too)."""
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    settings = dict(deform_on_per_stage=[False, True, True, True], deform_modulated=True, num_groups=2,
                    width_per_group=4, stride_in_1x1=False, out_channels=64)
    cfg = get_cfg()
    cfg.MODEL.RESNETS.update(DEPTH=50, NUM_GROUPS=2, WIDTH_PER_GROUP=4, STRIDE_IN_1X1=False, RES2_OUT_CHANNELS=64,
                             DEFORM_ON_PER_STAGE=[False, True, True, True], DEFORM_MODULATED=True,
                             OUT_FEATURES=["res5"])
    theirs = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    ours = ResNet(BasicStem(3, 64, norm="FrozenBN"), make_resnet_stages(50, **settings), out_features=["res5"])
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_make_resnet_stages_refuses_bad_arguments():
    with pytest.raises(ValueError, match="depth must be one of \\[50, 101, 152\\]"):
        make_resnet_stages(34)
    with pytest.raises(ValueError, match="4 flags"):
        make_resnet_stages(50, deform_on_per_stage=[True])


# ------------------------------------------------------------------------------------------------
# The paper's DCN configs (lgd/configs/_lgd_config.py: make_dcn)
# ------------------------------------------------------------------------------------------------

def _dcn_configs():
    from lgd.configs._lgd_config import DCN_ROWS, dcn_config_name
    return [(det, backbone, os.path.join(CONFIG_DIR, dcn_config_name(det, backbone, "2x", True) + ".py"))
            for det, backbone in DCN_ROWS]


def test_every_dcn_row_has_a_file():
    files = {os.path.basename(f) for f in glob.glob(os.path.join(CONFIG_DIR, "*DCN*_lgd.py"))}
    assert files == {os.path.basename(path) for _, _, path in _dcn_configs()} and len(files) == 4


@pytest.mark.parametrize("det, backbone, path", _dcn_configs(), ids=lambda v: os.path.basename(str(v)))
def test_dcn_config_builds_and_trains(det, backbone, path):
    """The full config names the paper's backbone and weights; shrunk (64..512 channels, depth 50, BN), it builds
    with torchvision-backed DCN v2 blocks on res3..res5 and one LGD training step runs forward and backward."""
    from detectron2.config import LazyConfig
    from conftest import detectron2_input, shrink_detector_config
    from lgd.runner import build_model

    cfg = LazyConfig.load(path)
    stages = cfg.model.backbone.bottom_up.stages
    assert stages._target_ is make_resnet_stages and stages.depth == 101
    assert (list(stages.deform_on_per_stage), stages.deform_modulated) == ([False, True, True, True], True)
    resnext = backbone.startswith("X")
    assert (stages.get("num_groups", 1), stages.get("width_per_group", 64)) == ((32, 8) if resnext else (1, 64))
    assert stages.stride_in_1x1 is not resnext
    assert cfg.train.init_checkpoint.endswith("FAIR/X-101-32x8d.pkl" if resnext else "MSRA/R-101.pkl")
    assert cfg.train.max_iter == 180000 and len(cfg.dataloader.train.mapper.augmentations[0].short_edge_length) == 6
    cfg.model = shrink_detector_config(cfg.model, 3)
    # res5 with 512 channels, as R-18's (what shrink_detector_config sizes the rest for)
    cfg.model.backbone.bottom_up.stages.update(depth=50, out_channels=64, width_per_group=2 if resnext else 16)
    torch.manual_seed(0)
    model = build_model(cfg)
    blocks = [m for m in model.modules() if isinstance(m, DeformBottleneckBlock)]
    assert len(blocks) == 4 + 6 + 3 and all(isinstance(b.conv2, DeformConv2d) and b.deform_modulated for b in blocks)
    batch = [detectron2_input([[10, 20, 60, 90], [80, 10, 150, 70]], [0, 2], seed=1, image_size=(128, 160))]
    with EventStorage(0):
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert blocks[0].conv2_offset.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("det, backbone, path", _dcn_configs()[-1:], ids=lambda v: os.path.basename(str(v)))
def test_dcn_config_refuses_missing_weights(det, backbone, path, tmp_path):
    """A local copy of the weights that is not there: one line naming the file and where it comes from."""
    from detectron2.config import LazyConfig
    from lgd.runner.checks import check_run_inputs

    cfg = LazyConfig.load(path)
    cfg.dataloader.train.dataset.names = []
    cfg.train.output_dir = str(tmp_path / "out")
    cfg.train.init_checkpoint = missing = str(tmp_path / "X-101-32x8d.pkl")
    with pytest.raises(FileNotFoundError) as info:
        check_run_inputs(cfg)
    source = "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/FAIR/X-101-32x8d.pkl"
    assert str(info.value) == (f"train.init_checkpoint: file not found: {missing} (detectron2's ImageNet weights, "
                               f"from {source})")
