"""LGD on FCOS, Faster R-CNN and Mask R-CNN (LGDDistiller hooks), the config family, the FCOS head shim and
the EMA normalizer in the state_dict; CPU, tiny.

Models come from the shipped lgd/configs/*_R_50_FPN_1x_lgd.py files shrunk by conftest.shrink_detector_config
(ResNet-18 with BN, 32-channel FPN, small ROI heads), 3 classes, images 128 x 160; the RetinaNet versions of
the distiller tests live in test_lgd_distiller.py.
"""
import copy
import functools
import glob
import os
import re

import pytest

pytest.importorskip("detectron2")

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

import lgd_ops
from conftest import sgd_loss_totals, shrink_detector_config, tiny_yacs_config, value_scale
from lgd import LGDDistiller
from lgd.configs._lgd_config import DEPTHS, DETECTORS, MULTI_SCALE, SCHEDULES, SINGLE_SCALE, config_name, make
from lgd.engine.checkpoint import AtomicCheckpointer, DetectorEMAState
from lgd.modeling.distiller import TEACHER_SUFFIX
from lgd.modeling.fcos_head import FCOSHead
from lgd.modeling.norm import group_norm
from lgd.runner import build_model, build_schedule

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lgd", "configs")
NUM_CLASSES = 3
IMAGE = (128, 160)
RPN_LOSSES = {"loss_rpn_cls", "loss_rpn_loc"}
DETECTOR_LOSSES = {
    "retinanet": {"loss_cls", "loss_box_reg"},
    "fcos": {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"},
    "faster_rcnn": RPN_LOSSES | {"loss_cls", "loss_box_reg"},
    "mask_rcnn": RPN_LOSSES | {"loss_cls", "loss_box_reg", "loss_mask"},
}
SHARED = "shared_proposals"  # the cheaper R-CNN variant: the RPN runs on the student only
# (use_context, detach_appearance, use_masks, distilled levels): the authors' settings per family
TEACHER = {
    "fcos": (True, False, False, ["p3", "p4", "p5", "p6", "p7"]),
    "faster_rcnn": (False, True, False, ["p2", "p3", "p4", "p5", "p6"]),
    "mask_rcnn": (False, True, True, ["p2", "p3", "p4", "p5", "p6"]),
}
NEW = list(TEACHER)  # the families this file adds
# (detector, rcnn_branch): every family, and the R-CNN variant
VARIANTS = [(d, "detector") for d in NEW] + [(d, SHARED) for d in NEW if "rcnn" in d]


def expected_keys(detector, rcnn_branch="detector"):
    det = DETECTOR_LOSSES[detector]
    instructive = det - RPN_LOSSES if rcnn_branch == SHARED else det
    return det | {k + TEACHER_SUFFIX for k in instructive} | {"loss_distill"}


@functools.lru_cache(maxsize=None)
def _tiny_config(detector):
    return shrink_detector_config(LazyConfig.load(os.path.join(CONFIG_DIR, f"{detector}_R_50_FPN_1x_lgd.py")).model,
                                  NUM_CLASSES)


def make_model(detector, backend="reference", seed=0, rcnn_branch="detector"):
    torch.manual_seed(seed)
    return LGDDistiller(instantiate(copy.deepcopy(_tiny_config(detector))), backend=backend,
                        rcnn_branch=rcnn_branch).train()


def make_input(boxes, classes, seed):
    """One image dict; every box also gets its rectangle as a polygon mask (what detectron2's mapper gives)."""
    g = torch.Generator().manual_seed(seed)
    inst = Instances(IMAGE)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    inst.gt_masks = PolygonMasks([[[x1, y1, x2, y1, x2, y2, x1, y2]] for x1, y1, x2, y2 in boxes])
    return {"image": torch.rand(3, *IMAGE, generator=g) * 255, "instances": inst}


def make_batch():
    return [make_input([[10, 20, 60, 90], [80, 10, 150, 70]], [0, 2], seed=1),
            make_input([[30, 30, 120, 110]], [1], seed=2)]


def train_losses(model, batch, seed=0):
    """One training forward; the R-CNN proposal sampling draws from the RNG, so it is seeded."""
    torch.manual_seed(seed)
    with EventStorage(0):
        return model(batch)


@pytest.mark.parametrize("detector, branch", VARIANTS)
def test_losses_teacher_settings_and_gradients(detector, branch):
    model = make_model(detector, rcnn_branch=branch)
    use_context, detach, use_masks, levels = TEACHER[detector]
    teacher = model.teacher
    assert (teacher.use_context, teacher.appearance_encoder.detach_input, teacher.use_masks) == (
        use_context, detach, use_masks)
    assert teacher.label_encoder.input_transform.pool == "object"
    assert model.detector_driver.in_features == (levels[:-1] if branch == SHARED else levels)
    assert model.detector_driver.num_classes == NUM_CLASSES
    losses = train_losses(model, make_batch())
    assert set(losses) == expected_keys(detector, branch)
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.teacher_parameters() if p.grad is not None)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.teacher_parameters())


@pytest.mark.parametrize("detector", NEW)
def test_sgd_steps_lower_the_total_loss(detector):
    model, batch = make_model(detector), make_batch()
    totals = sgd_loss_totals(model, lambda: train_losses(model, batch), steps=3)
    assert totals[-1] < totals[0], totals


def _first_k_subsample(labels, num_samples, positive_fraction, bg_label):
    """detectron2's subsample_labels without the random permutation (the first positives and negatives)."""
    positive = torch.nonzero((labels != -1) & (labels != bg_label), as_tuple=True)[0]
    negative = torch.nonzero(labels == bg_label, as_tuple=True)[0]
    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    return positive[:num_pos], negative[:min(negative.numel(), num_samples - num_pos)]


@pytest.mark.parametrize("detector, branch", VARIANTS)
def test_instructive_branch_is_the_same_detector(detector, branch, monkeypatch):
    """With X^I replaced by the student features, the "_tea" losses equal the student's exactly: the same
    detector runs on both (dense detectors: the same anchor labels and EMA normalizer; R-CNN: the RPN and the
    ROI heads on X^I, or the shared proposals; the random sampling is made deterministic for the comparison)."""
    from detectron2.modeling.proposal_generator import rpn
    from detectron2.modeling.roi_heads import roi_heads

    for module in (rpn, roi_heads):
        monkeypatch.setattr(module, "subsample_labels", _first_k_subsample)
    model, batch = make_model(detector, rcnn_branch=branch), make_batch()
    monkeypatch.setattr(model.teacher, "forward", lambda features, targets, image_size: dict(features))
    for it in range(2):
        losses = train_losses(model, batch, seed=it)
        compared = {n[:-len(TEACHER_SUFFIX)] for n in losses if n.endswith(TEACHER_SUFFIX)}
        assert compared == (DETECTOR_LOSSES[detector] - RPN_LOSSES if branch == SHARED else DETECTOR_LOSSES[detector])
        for name in compared:
            torch.testing.assert_close(losses[name + TEACHER_SUFFIX], losses[name], rtol=0, atol=0)


@pytest.mark.skipif("cpu" not in lgd_ops.available_backends(), reason="lgd_ops CPU kernels not built")
@pytest.mark.parametrize("detector", NEW)
def test_reference_and_cpu_backends_agree(detector):
    """Same losses and gradients; float64 where the detector allows it (detectron2's NMS, which the RPN runs,
    is float32 only). The backends differ only in the teacher and loss_distill; the student path is shared."""
    dtype, tol = (torch.float32, dict(rtol=1e-4, atol=1e-5)) if "rcnn" in detector else (
        torch.float64, dict(rtol=1e-9, atol=1e-10))
    ref = make_model(detector, "reference").to(dtype)
    cpu = LGDDistiller(copy.deepcopy(ref.detector), backend="cpu").to(dtype).train()
    cpu.load_state_dict(ref.state_dict())
    batch = make_batch()
    out = []
    for model in (ref, cpu):
        losses = train_losses(model, batch)
        sum(losses.values()).backward()
        out.append((losses, {k: p.grad for k, p in model.named_parameters() if p.grad is not None}))
    (ref_losses, ref_grads), (cpu_losses, cpu_grads) = out
    assert set(ref_losses) == set(cpu_losses) == expected_keys(detector)
    for name in ref_losses:
        torch.testing.assert_close(cpu_losses[name], ref_losses[name], **tol)
    assert set(ref_grads) == set(cpu_grads)
    for name in ref_grads:
        torch.testing.assert_close(cpu_grads[name], ref_grads[name], rtol=tol["rtol"] * 100,
                                   atol=tol["atol"] * 100 * value_scale(ref_grads[name]), msg=name)


@pytest.mark.parametrize("detector", NEW)
def test_images_without_objects(detector):
    """Training with an image that has no objects, and inference (student only, the detector's own output)
    on images where nothing is detected."""
    model = make_model(detector)
    batch = make_batch()
    batch[1] = make_input([], [], seed=3)
    losses = train_losses(model, batch)
    assert set(losses) == expected_keys(detector) and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()

    det = model.detector
    if hasattr(det, "roi_heads"):
        det.roi_heads.box_predictor.test_score_thresh = 1.0
    else:
        det.test_score_thresh = 1.0
    blank = [{"image": torch.zeros(3, *IMAGE)}, {"image": batch[1]["image"]}]
    model.eval()
    with torch.no_grad():
        results = model(blank)
        expected = det(blank)
    for got, want in zip(results, expected):
        assert got["instances"].image_size == IMAGE
        assert len(got["instances"]) == len(want["instances"]) == 0


def test_wraps_a_yacs_built_one_class_mask_rcnn():
    from detectron2.modeling import build_model

    cfg = tiny_yacs_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 100
    cfg.MODEL.ROI_HEADS.NUM_CLASSES, cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 1, 64
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM, cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 64, 32
    torch.manual_seed(0)
    model = LGDDistiller(build_model(cfg), backend="reference").train()
    assert model.teacher.use_masks and model.teacher.label_encoder.num_classes == 1
    batch = make_batch()
    for x in batch:
        x["instances"].gt_classes.zero_()
    losses = train_losses(model, batch)
    assert set(losses) == expected_keys("mask_rcnn") and all(torch.isfinite(v) for v in losses.values())


def test_unsupported_rcnn_variants_fail_clearly():
    detector = instantiate(copy.deepcopy(_tiny_config("faster_rcnn")))
    detector.proposal_generator = None
    with pytest.raises(ValueError, match="proposal generator"):
        LGDDistiller(detector)


# ------------------------------------------------------------------------------------------------
# EMA loss normalizer: a checkpointable (DetectorEMAState), for LGD and baseline runs alike
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("detector", ["retinanet", "fcos"])
def test_loss_normalizer_saved_and_restored(detector, tmp_path):
    model = make_model(detector)
    fresh = make_model(detector, seed=1)
    assert DetectorEMAState(fresh.detector).state_dict() == {}  # no EMA before the first iteration
    train_losses(model, make_batch())
    value = model.detector.loss_normalizer
    assert DetectorEMAState(model.detector).state_dict() == {"loss_normalizer": value}

    AtomicCheckpointer(model, str(tmp_path), detector_ema=DetectorEMAState(model.detector)).save("ckpt")
    AtomicCheckpointer(fresh, detector_ema=DetectorEMAState(fresh.detector)).load(str(tmp_path / "ckpt.pth"))
    assert fresh.detector.loss_normalizer == value
    # a checkpoint from before the first iteration clears a stale normalizer
    DetectorEMAState(fresh.detector).load_state_dict({})
    assert not hasattr(fresh.detector, "loss_normalizer")


def test_rcnn_has_no_ema_state():
    assert DetectorEMAState(make_model("faster_rcnn").detector).names == ()


def test_detector_drivers_are_a_registry():
    from lgd.modeling.detector_drivers import DETECTOR_DRIVER_REGISTRY, RCNNDriver, build_detector_driver

    assert {name for name, _ in DETECTOR_DRIVER_REGISTRY} == {"RetinaNetDriver", "FCOSDriver", "RCNNDriver"}
    detector = make_model("mask_rcnn").detector
    assert isinstance(build_detector_driver(detector), RCNNDriver)
    with pytest.raises(ValueError, match="unsupported detector"):
        build_detector_driver(torch.nn.Linear(1, 1))


# ------------------------------------------------------------------------------------------------
# FCOS head shim
# ------------------------------------------------------------------------------------------------

def test_fcos_head_builds_with_detectron2_group_norm():
    from detectron2.layers import ShapeSpec

    head = FCOSHead(input_shape=[ShapeSpec(channels=64)] * 3, conv_dims=[64, 64], num_classes=NUM_CLASSES, norm="GN")
    norms = [m for m in head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 4 and all(m.num_groups == 32 and m.num_channels == 64 for m in norms)
    logits, deltas, centerness = head([torch.randn(2, 64, s, s) for s in (8, 4, 2)])
    assert [x.shape[1] for x in (logits[0], deltas[0], centerness[0])] == [NUM_CLASSES, 4, 1]
    assert group_norm(1).num_groups == 1
    with pytest.raises(ValueError, match="channels"):
        group_norm(0)


# ------------------------------------------------------------------------------------------------
# The config family
# ------------------------------------------------------------------------------------------------

NAME = re.compile(r"(?P<det>\w+?)_R_(?P<depth>\d+)_FPN_(?P<sched>\dx)(?P<ms>_ms)?_lgd\.py$")
CONFIG_FILES = sorted(f for f in glob.glob(os.path.join(CONFIG_DIR, "*_lgd.py")) if NAME.search(f))  # the family


def test_every_variant_has_a_file():
    names = {os.path.basename(f)[:-3] for f in CONFIG_FILES}
    expected = {config_name(d, n, s, m) for d in DETECTORS for n in DEPTHS for s in SCHEDULES for m in (False, True)}
    assert names == expected and len(expected) == 32


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_loads_and_builds(path):
    cfg = LazyConfig.load(path)
    m = NAME.search(path)
    det, depth, sched, ms = m["det"], int(m["depth"]), m["sched"], bool(m["ms"])
    lgd = cfg.lgd
    schedule = build_schedule(cfg)
    assert schedule == SCHEDULES[sched] and cfg.train.max_iter == schedule.max_iter
    assert (schedule.max_iter, schedule.steps, schedule.backbone_freeze_iters, schedule.distill_start_iter) == (
        (90000, (60000, 80000), 10000, 30000) if sched == "1x" else (180000, (120000, 160000), 20000, 30000))
    assert cfg.optimizer.lr == lgd.teacher_lr == (0.02 if "rcnn" in det else 0.01)
    assert "lr_multiplier" not in cfg  # the schedule is lgd.schedule, once
    assert cfg.model.backbone.bottom_up.stages.depth == depth and f"R-{depth}" in cfg.train.init_checkpoint
    resize = cfg.dataloader.train.mapper.augmentations[0]
    assert tuple(resize.short_edge_length) == (MULTI_SCALE if ms else SINGLE_SCALE)
    assert cfg.dataloader.train.mapper.use_instance_mask == (det == "mask_rcnn")
    assert cfg.dataloader.evaluator.use_fast_impl is False
    # the authors' settings (docs/method.md §8b): value clipping at 1.0, decay on norms too, per-object STN,
    # the whole R-CNN detector on X^I, no context object for FCOS R50
    clip = cfg.train.clip_gradients
    assert (clip.clip_type, clip.clip_value, cfg.optimizer.params.weight_decay_norm) == ("value", 1.0, 1e-4)
    assert (lgd.stn_pool, lgd.rcnn_branch) == ("object", "detector")
    assert lgd.use_context == (False if (det, depth) == ("fcos", 50) else None)
    cfg.model = shrink_detector_config(cfg.model, NUM_CLASSES)
    model = build_model(cfg)
    assert model.teacher.use_masks == (det == "mask_rcnn")
    assert model.teacher.use_context == (det == "retinanet" or (det, depth) == ("fcos", 101))
    assert model.teacher.label_encoder.input_transform.pool == "object"


@pytest.mark.parametrize("kwargs", [dict(detector="yolo"), dict(detector="fcos", depth=18),
                                    dict(detector="fcos", schedule="3x"), dict(detector="fcos", multiscale=1)])
def test_make_rejects_unknown_variants(kwargs):
    name = next(k for k in kwargs if k != "detector") if len(kwargs) > 1 else "detector"
    with pytest.raises(ValueError, match=name):
        make(**kwargs)
