"""LabelEnc (lgd.method="labelenc", docs/methods/labelenc.md): colour maps, the two steps' models, the
stage, the hooks and the settings. Tiny CPU detectors (conftest.shrink_detector_config), images 64 x 96."""
import copy
import dataclasses

import pytest

pytest.importorskip("detectron2")

import torch
from detectron2 import model_zoo
from detectron2.config import instantiate
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from omegaconf import OmegaConf

from conftest import detectron2_input, shrink_detector_config
from lgd.engine.schedule import PAPER_SCHEDULES
from lgd.errors import UsageError
from lgd.methods import build_method, stage_checkpoint
from lgd.methods.labelenc import STEP1_SCHEDULE, LabelEnc, LabelEncStep1, LabelEncStep2, LossWindow
from lgd.modeling.fcos_head import FCOSHead
from lgd.modeling.label_encoding_network import render_colour_maps

NUM_CLASSES = 3
IMAGE = (64, 96)
SOURCES = {
    "retinanet": "COCO-Detection/retinanet_R_50_FPN_1x.py",
    "fcos": "COCO-Detection/fcos_R_50_FPN_1x.py",
    "faster_rcnn": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py",
    "mask_rcnn": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py",
}


def tiny_detector(kind="retinanet", seed=0):
    model = model_zoo.get_config(SOURCES[kind]).model
    if kind == "fcos":
        model.head._target_ = FCOSHead
    if kind == "faster_rcnn":
        model.roi_heads.mask_in_features = model.roi_heads.mask_pooler = model.roi_heads.mask_head = None
    shrink_detector_config(model, NUM_CLASSES)
    torch.manual_seed(seed)
    return instantiate(model)


def run_cfg(max_iter=90, **labelenc):
    """A run of max_iter iterations of the paper's 1x schedule (90k) with lgd.labelenc = labelenc."""
    schedule = dataclasses.asdict(PAPER_SCHEDULES["1x"])
    return OmegaConf.create({"lgd": {"method": "labelenc", "schedule": schedule, "labelenc": labelenc},
                             "model": {"backbone": {"depth": 101}},
                             "dataloader": {"evaluator": {"name": "coco"}}, "train": {"max_iter": max_iter}})


def settings(**kwargs):
    return LabelEnc(run_cfg(**kwargs)).settings


def make_input(boxes, classes, seed):
    item = detectron2_input(boxes, classes, seed, IMAGE)
    masks = torch.zeros(len(boxes), *IMAGE, dtype=torch.bool)  # the boxes as masks (Mask R-CNN)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes):
        mask[y0:y1, x0:x1] = True
    item["instances"].gt_masks = BitMasks(masks)
    return item


def make_batch():
    return [make_input([[5, 6, 40, 50], [30, 10, 90, 60]], [0, 2], seed=1),
            make_input([[20, 15, 70, 55]], [1], seed=2)]


def losses_of(model, batch):
    with EventStorage(0):
        return model(batch)


def grads(module):
    """Whether any parameter of `module` got a non-zero gradient."""
    return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters())


def head_of(detector):
    return [m for name, m in detector.named_children() if name != "backbone"]


# ----------------------------------------------------------------------------------------------- colour maps

def instances(boxes, classes, size=(8, 12)):
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


def test_colour_maps_hand_made_case():
    # class 1: A centre (4, 4) size 4x4 and B centre (7, 5) size 6x4, overlapping; class 0: C; class 2: a
    # zero-width box (draws nothing); the second image has no objects
    boxes = [[2, 2, 6, 6], [4, 3, 10, 7], [0, 0, 2, 2], [5, 5, 5, 8]]
    maps = render_colour_maps([instances(boxes, [1, 1, 0, 2]), instances([], [])], NUM_CLASSES, (8, 12))
    assert maps.shape == (2, NUM_CLASSES, 8, 12) and maps.dtype == torch.float32
    a = maps[0, 1]
    assert a[4, 4] == 1.0  # A's centre
    assert a[2, 2] == 0.5 and a[6, 2] == 0.5  # A's corners: the border gets 0.5
    assert a[1, 4] == 0 and a[4, 1] == 0  # just outside A
    assert a[4, 5] == 0.75  # A: 1 - 1/4; B: 1 - max(2/6, 1/4) = 2/3; the max wins
    torch.testing.assert_close(a[5, 7], torch.tensor(1.0))  # B's centre
    torch.testing.assert_close(a[5, 10], torch.tensor(0.5))  # B's right border
    assert a[5, 11] == 0  # past B
    expected_c = torch.zeros(8, 12)
    expected_c[:3, :3] = torch.tensor([[0.5, 0.5, 0.5], [0.5, 1.0, 0.5], [0.5, 0.5, 0.5]])
    torch.testing.assert_close(maps[0, 0], expected_c)
    assert not maps[0, 2].any() and not maps[1].any()
    assert int((a > 0).sum()) == 25 + 7 * 5 - 3 * 4  # A's 5x5 and B's 7x5 pixels, 3x4 shared


def test_colour_maps_jitter_scales_each_box():
    inst = instances([[0, 0, 4, 4], [6, 2, 11, 7]], [0, 1])
    plain = render_colour_maps([inst], NUM_CLASSES, (8, 12))
    torch.manual_seed(3)
    scales = []
    for _ in range(20):
        jittered = render_colour_maps([inst], NUM_CLASSES, (8, 12), jitter=True)
        for k in (0, 1):
            inside = plain[0, k] > 0
            ratio = jittered[0, k][inside] / plain[0, k][inside]
            torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio))  # one factor per box
            scales.append(float(ratio[0]))
    assert all(0 <= s <= 1 for s in scales)
    assert 0.2 < sum(s == 1.0 for s in scales) / len(scales) < 0.8  # min(U(0, 2), 1) is 1 half the time


def test_colour_maps_refuse_bad_classes():
    with pytest.raises(ValueError, match="gt_classes"):
        render_colour_maps([instances([[0, 0, 4, 4]], [NUM_CLASSES])], NUM_CLASSES, (8, 12))


# ----------------------------------------------------------------------------------------------- step 1

@pytest.mark.parametrize("kind", list(SOURCES))
def test_step1_label_losses_train_the_label_network_and_head_not_the_backbone(kind):
    model = LabelEncStep1(tiny_detector(kind), settings(step=1)).train()
    losses = losses_of(model, make_batch())
    ae = {k for k in losses if k.startswith("ae_")}
    assert ae and {k[3:] for k in ae} == set(losses) - ae - {"loss_labelenc"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.requires_grad for p in model.parameters())
    sum(losses[k] for k in ae).backward()
    assert grads(model.label_net) and all(grads(m) for m in head_of(model.detector) if list(m.parameters()))
    assert not grads(model.detector.backbone) and not grads(model.adapter)


def test_step1_distance_loss_trains_the_adapter_and_backbone_only_while_enabled():
    model = LabelEncStep1(tiny_detector(), settings(step=1)).train()
    losses_of(model, make_batch())["loss_labelenc"].backward()
    assert grads(model.adapter) and grads(model.detector.backbone) and not grads(model.label_net)
    model.loss_enabled = False
    assert "loss_labelenc" not in losses_of(model, make_batch())


def test_sgd_steps_lower_step1_loss():
    cfg = run_cfg(step=1)
    method = LabelEnc(cfg)
    model = method.build(tiny_detector(), {}).train()
    optimizer = method.build_optimizer(model, lr=0.01)
    batch = make_batch()
    totals = []
    for _ in range(6):
        total = sum(losses_of(model, batch).values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert totals[-1] < 0.9 * totals[0], totals


# ----------------------------------------------------------------------------------------------- step 2

@pytest.fixture(scope="module")
def step1_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("labelenc") / "model_final.pth"
    model = LabelEncStep1(tiny_detector(seed=1), settings(step=1))
    torch.save({"model": model.state_dict(), "iteration": 9}, path)
    return path


def step2_model(step1_file, **kwargs):
    method = LabelEnc(run_cfg(**kwargs))
    return method.build(tiny_detector(seed=2), {"labelenc_step1": str(step1_file)}).train()


def test_step2_starts_from_step1(step1_file):
    model = step2_model(step1_file)
    assert isinstance(model, LabelEncStep2)
    step1 = torch.load(step1_file)["model"]
    for key, value in model.label_net.state_dict().items():
        torch.testing.assert_close(value, step1["label_net." + key])
    student = model.detector.state_dict()
    heads = [k for k in student if not k.startswith("backbone.")]
    fpn = [k for k in student if k.startswith("backbone.") and not k.startswith("backbone.bottom_up.")]
    assert heads and fpn
    for key in heads:  # the head from step 1's detector
        torch.testing.assert_close(student[key], step1["detector." + key])
    for key in fpn:  # the FPN from step 1's label-encoding network
        torch.testing.assert_close(student[key], step1["label_net." + key[len("backbone."):]])
    bottom_up = "backbone.bottom_up.stem.conv1.weight"  # not from step 1
    assert not torch.equal(student[bottom_up], step1["detector." + bottom_up])


def test_step2_trains_student_and_adapter_not_the_label_network(step1_file):
    model = step2_model(step1_file)
    assert not any(p.requires_grad for p in model.label_net.parameters())
    assert not model.label_net.training and model.detector.training
    losses = losses_of(model, make_batch())
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_labelenc"}
    sum(losses.values()).backward()
    assert grads(model.detector.backbone) and grads(model.detector.head) and grads(model.adapter)
    assert all(p.grad is None for p in model.label_net.parameters())
    trained = {id(p) for g in LabelEnc(run_cfg()).build_optimizer(model, lr=0.01).param_groups for p in g["params"]}
    assert trained == {id(p) for p in [*model.detector.parameters(), *model.adapter.parameters()]}


def test_step2_loss_against_a_direct_computation(step1_file):
    model = step2_model(step1_file, loss_weight=0.5)
    batch = make_batch()
    got = losses_of(model, batch)["loss_labelenc"]
    images = model.detector.preprocess_image(batch)
    gt = [x["instances"] for x in batch]
    student = model.detector.backbone(images.tensor)
    labels = model.label_net(render_colour_maps(gt, NUM_CLASSES, tuple(images.tensor.shape[-2:])))
    levels = ["p3", "p4", "p5", "p6", "p7"]

    def normalized(x):  # per image over (C, H, W), float64
        x = x.double().flatten(1)
        return (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-5)

    sq = sum(((normalized(model.adapter(student[f])) - normalized(labels[f])) ** 2).sum() for f in levels)
    count = sum(student[f].numel() for f in levels)
    torch.testing.assert_close(got.double(), 0.5 * sq / count, rtol=1e-5, atol=1e-7)
    model.loss_enabled = False
    assert "loss_labelenc" not in losses_of(model, batch)


def test_step2_needs_a_step1_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="step-1 checkpoint"):
        LabelEnc(run_cfg()).build(tiny_detector(), {})
    path = tmp_path / "plain.pth"
    torch.save({"model": tiny_detector().state_dict()}, path)
    with pytest.raises(ValueError, match="label_net"):
        LabelEnc(run_cfg(step1_checkpoint=str(path))).build(tiny_detector(), {})


# ----------------------------------------------------------------------------------------------- the method

def test_stages_with_and_without_step1_checkpoint():
    cfg = run_cfg(loss_weight=0.5, step1_iters=120)
    original = copy.deepcopy(cfg)
    (stage,) = build_method(cfg).stages()
    assert stage.name == "labelenc_step1"
    assert stage.cfg.lgd.method == "labelenc" and stage.cfg.lgd.labelenc.step == 1
    assert stage.cfg.lgd.labelenc.loss_weight == 0.5 and stage.cfg.lgd.labelenc.step1_checkpoint is None
    assert stage.cfg.dataloader.evaluator is None and stage.cfg.train.max_iter == 120
    assert cfg == original  # the run's own config untouched
    assert LabelEnc(stage.cfg).stages() == []  # step 1 has no prerequisite
    assert LabelEnc(run_cfg(step1_checkpoint="/x/model_final.pth")).stages() == []
    assert stage_checkpoint("out", stage.name).endswith("out/labelenc_step1/model_final.pth")


@pytest.mark.parametrize("max_iter, step1_iters", [(90000, 120000), (90, 120), (900, 1200), (1, 1)])
def test_step1_runs_the_authors_schedule_scaled_as_the_run(max_iter, step1_iters):
    """step1_iters None: the authors' 120k (30k without the distance loss, then their 1x), in the proportion the
    run's train.max_iter has to its schedule's 90k; LR steps at 90k and 110k of 120k, scaled by lgd's rule."""
    (stage,) = LabelEnc(run_cfg(max_iter)).stages()
    assert stage.cfg.train.max_iter == step1_iters
    assert stage.cfg.lgd.schedule == dataclasses.asdict(STEP1_SCHEDULE)
    assert (STEP1_SCHEDULE.max_iter, STEP1_SCHEDULE.steps) == (120000, (90000, 110000))
    if max_iter == 900:
        from lgd.runner import build_schedule

        assert build_schedule(stage.cfg).steps == (900, 1100)
        (window,) = LabelEnc(stage.cfg).hooks(build_schedule(stage.cfg))
        assert (window.start, window.end) == (300, 1200)  # no distance loss for the first 30k-equivalent


def test_step1_overrides_give_the_step1_detector():
    cfg = run_cfg(step1_overrides=["model.backbone.depth=50"])
    (stage,) = LabelEnc(cfg).stages()
    assert stage.cfg.model.backbone.depth == 50 and cfg.model.backbone.depth == 101
    assert list(stage.cfg.lgd.labelenc.step1_overrides) == []  # applied once, not again by step 1's own method
    with pytest.raises(UsageError, match="lgd.labelenc.step1_overrides: .*depht"):
        LabelEnc(run_cfg(step1_overrides=["model.backbone.depht=50"])).stages()
    with pytest.raises(ValueError, match="step1_overrides must be a list"):
        LabelEnc(run_cfg(step1_overrides="model.backbone.depth=50"))


class _Trainer:
    def __init__(self, model):
        self.model, self.iter, self.storage = model, 0, EventStorage(0)


@pytest.mark.parametrize("step, window", [(1, (25, 100)), (2, (0, 89))])
def test_hooks_switch_the_loss_on_its_window(step, window):
    from lgd.engine.schedule import LGDSchedule

    (hook,) = LabelEnc(run_cfg(step=step)).hooks(LGDSchedule(100, (60,), 30, 10))
    assert isinstance(hook, LossWindow) and (hook.start, hook.end) == window
    hook.trainer = _Trainer(torch.nn.Module())
    for it, expected in ((window[0] - 1, False), (window[0], True), (window[1] - 1, True), (window[1], False)):
        hook.trainer.iter = it
        hook.before_step()
        assert hook.trainer.model.loss_enabled is (expected and it >= 0)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="unknown settings"):
        LabelEnc(run_cfg(weight=1.0))
    with pytest.raises(ValueError, match="step must be 1 or 2"):
        LabelEnc(run_cfg(step=3))
    with pytest.raises(ValueError, match="step1_iters"):
        LabelEnc(run_cfg(step1_iters=0))
    with pytest.raises(ValueError, match="step2_loss_end"):
        LabelEnc(run_cfg(step2_loss_end=1.5))


def test_unsupported_detector_is_refused():
    class Plain(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="LabelEnc: unsupported detector Plain"):
        LabelEnc(run_cfg(step=1)).build(Plain(), {})


FAST_STEP = """
import torch
from detectron2.config import instantiate
from detectron2.utils.events import EventStorage
from lgd.engine.trainer import use_channels_last
from lgd.methods import build_method
from lgd.tools.demo import DEMO_CONFIG
from lgd.config import load_config

torch.set_num_threads(1)
cfg = load_config(DEMO_CONFIG, ["lgd.method=labelenc", "lgd.labelenc.step=1", "model.backbone.weights=null"])
model = use_channels_last(build_method(cfg).build(instantiate(cfg.model), {}).train())
assert all(p.is_contiguous() for p in model.label_net.parameters())
assert model.detector.backbone.fpn_lateral3.weight.is_contiguous(memory_format=torch.channels_last)
g = torch.Generator().manual_seed(0)
batch = [{"image": torch.rand(3, 256, 256, generator=g) * 255, "instances": inst}
         for inst in [__import__("conftest").detectron2_input([[10, 20, 90, 120]], [0], 1, (256, 256))["instances"]] * 2]
with EventStorage(0), torch.autocast("cpu", torch.bfloat16):
    losses = model(batch)
sum(losses.values()).backward()
print("step ok")
"""


def test_fast_path_keeps_the_label_network_nchw_and_trains_the_demo_step1():
    """On the fast path the label network stays NCHW: the demo's label network has a 1x1 stride-2 conv on 8
    channels whose channels_last CPU backward corrupts the heap in torch 2.14 (a crash, hence a subprocess)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__)] + sys.path))
    result = subprocess.run([sys.executable, "-c", FAST_STEP], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "step ok" in result.stdout, result.stderr[-2000:]


def test_step2_keeps_the_students_frozen_batchnorm_statistics():
    """Step 2's initialisation must not touch the student's bottom-up: a partial load_state_dict makes
    detectron2's FrozenBatchNorm2d reset missing running statistics to 0 / 1 (it did, wiping ImageNet's)."""
    from lgd.tools.demo import DEMO_CONFIG
    from lgd.config import load_config

    cfg = load_config(DEMO_CONFIG, ["lgd.method=labelenc", "lgd.labelenc.step=1", "model.backbone.weights=null"])
    step1 = build_method(cfg).build(instantiate(cfg.model), {})
    student = instantiate(cfg.model)
    g = torch.Generator().manual_seed(0)
    stats = {k: torch.rand(v.shape, generator=g) + 0.5 for k, v in student.state_dict().items()
             if k.startswith("backbone.bottom_up.") and ("running_var" in k or "running_mean" in k)}
    assert stats  # the demo's MobileNetV2 has FrozenBN layers
    student.load_state_dict({**student.state_dict(), **stats})
    cfg.lgd.labelenc.step = 2
    model = LabelEncStep2(student, build_method(cfg).settings, step1.state_dict())
    after = model.detector.state_dict()
    assert all(torch.equal(after[k], v) for k, v in stats.items())
    assert torch.equal(after["head.cls_score.weight"], step1.detector.state_dict()["head.cls_score.weight"])


def test_dcn_config_step1_is_the_authors_r50_and_step2_starts_from_it(tmp_path):
    """The X-101 DCN v2 FCOS config: step 1 trains a plain MSRA R-50 FCOS (no deformable block, R-50 depth,
    its weights and pixel std) for the authors' 120k iterations; step 2, the X-101 DCN student, loads its head,
    FPN and label-encoding network from that step-1 checkpoint."""
    import os

    from detectron2.modeling.backbone.resnet import BottleneckBlock

    from lgd.config import load_config
    from lgd.modeling.deform import DeformBottleneckBlock
    from lgd.runner import build_model

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "lgd", "configs", "fcos_X_101_32x8d_DCNv2_FPN_2x_ms_lgd.py"),
                      ["lgd.method=labelenc", "train.device=cpu", f"train.output_dir={tmp_path}"])
    (stage,) = build_method(cfg).stages()
    assert stage.cfg.train.max_iter == 120000 and stage.cfg.train.init_checkpoint.endswith("/R-50.pkl")
    assert list(stage.cfg.model.pixel_std) == [1.0, 1.0, 1.0]
    step1 = build_model(stage.cfg)
    bottom_up = step1.detector.backbone.bottom_up
    assert len(bottom_up.res4) == 6 and all(type(b) is BottleneckBlock for b in bottom_up.res4)
    path = stage_checkpoint(str(tmp_path), stage.name)
    os.makedirs(os.path.dirname(path))
    torch.save({"model": step1.state_dict()}, path)
    step2 = build_model(cfg)
    assert any(isinstance(b, DeformBottleneckBlock) for b in step2.detector.backbone.bottom_up.res4)
    head = "head.cls_score.weight"
    assert torch.equal(step2.detector.state_dict()[head], step1.detector.state_dict()[head])
