"""FGFI as a training method (lgd.methods.fgfi, docs/methods/fgfi.md); CPU, tiny.

The imitation mask against a float64 transcription of the rule (plain Python IoUs, anchors written out by
hand), loss_imitation against a direct float64 computation, the frozen teacher, stages(), build()'s checkpoint
loading and one training step of RetinaNet, FCOS and Faster R-CNN. Detectors: the shipped
lgd/configs/*_R_50_FPN_1x_lgd.py shrunk by conftest.shrink_detector_config; the teacher is the same config
with teacher overrides (a ResNet-34 bottom-up and a 48-channel FPN for the dense detectors).
"""
import copy
import functools
import math
import os

import pytest

pytest.importorskip("detectron2")

import torch
import torch.nn.functional as F
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage

from conftest import detectron2_input, shrink_detector_config
from lgd.engine.checkpoint import CheckpointError
from lgd.methods import build_method
from lgd.methods.fgfi import FGFI, FGFIDistiller, imitation_masks
from lgd.errors import UsageError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lgd", "configs")
NUM_CLASSES = 3
IMAGE = (96, 128)
# dense detectors: a deeper, wider teacher (the adapter maps 32 -> 48 channels); R-CNN: a deeper one
TEACHER_OVERRIDES = {
    "retinanet": ["model.backbone.bottom_up.stages.depth=34", "model.backbone.out_channels=48"],
    "fcos": ["model.backbone.bottom_up.stages.depth=34", "model.backbone.out_channels=48",
             "model.backbone.top_block.in_channels=48"],  # FCOS builds P6 from P5
    "faster_rcnn": ["model.backbone.bottom_up.stages.depth=34"],
}
LEVELS = {"retinanet": ["p3", "p4", "p5", "p6", "p7"], "fcos": ["p3", "p4", "p5", "p6", "p7"],
          "faster_rcnn": ["p2", "p3", "p4", "p5", "p6"]}
DETECTOR_LOSSES = {
    "retinanet": {"loss_cls", "loss_box_reg"},
    "fcos": {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"},
    "faster_rcnn": {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"},
}


# ----------------------------------------------------------------------------------------------
# float64 transcription of the mask rule
# ----------------------------------------------------------------------------------------------

def oracle_iou(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def square_anchors(height, width, stride, sizes):
    """{(row, col): [boxes]}: squares of `sizes` centred on (col * stride, row * stride) (offset 0)."""
    return {(r, c): [(c * stride - s / 2, r * stride - s / 2, c * stride + s / 2, r * stride + s / 2) for s in sizes]
            for r in range(height) for c in range(width)}


def oracle_masks(levels, gt_boxes, psi):
    """levels: [(H, W, {(row, col): [anchor boxes]})]; the set of kept (row, col) per level."""
    kept = [set() for _ in levels]
    for gt in gt_boxes:
        gt = [float(v) for v in gt]
        best = max(oracle_iou(a, gt) for _, _, cells in levels for boxes in cells.values() for a in boxes)
        for k, (_, _, cells) in enumerate(levels):
            kept[k] |= {cell for cell, boxes in cells.items() if any(oracle_iou(a, gt) > psi * best for a in boxes)}
    return kept


def level_cells(anchors, height, width):
    """A level's anchors (Boxes, location-major) as oracle_masks' {(row, col): [boxes]} in float64."""
    grid = anchors.tensor.double().view(height, width, -1, 4).tolist()
    return {(r, c): [tuple(a) for a in grid[r][c]] for r in range(height) for c in range(width)}


def as_sets(masks):
    return [{tuple(rc) for rc in m.nonzero().tolist()} for m in masks]


# two levels as in an FPN: 4 x 4 at stride 8 with squares of 8 and 16, 2 x 2 at stride 16 with squares of 32
HAND_GRID = [(4, 4), (2, 2)]
HAND_LEVELS = [(4, 4, square_anchors(4, 4, 8, (8, 16))), (2, 2, square_anchors(2, 2, 16, (32,)))]


def hand_anchors():
    generator = DefaultAnchorGenerator(sizes=[[8, 16], [32]], aspect_ratios=[[1.0]], strides=[8, 16], offset=0.0)
    return generator([torch.zeros(1, 1, *size) for size in HAND_GRID])


def test_anchor_order_is_location_major():
    """imitation_masks reads anchors[l] as [H, W, A]: check that against the hand-written anchors."""
    for anchors, (h, w, cells) in zip(hand_anchors(), HAND_LEVELS):
        expected = [box for r in range(h) for c in range(w) for box in cells[(r, c)]]
        assert anchors.tensor.tolist() == [list(b) for b in expected]


def test_mask_of_one_box_by_hand():
    """GT (0, 0, 24, 20), area 480. Best IoU M = 0.533 (16-squares at level-0 cells (1, 1) and (1, 2):
    256 / 480), threshold 0.267. Kept: level 0 cells (2, 1), (2, 2) (192 / 544 = 0.353) and those two;
    level 1 cells (1, 1) (480 / 1024 = 0.469), (0, 1) (384 / 1120 = 0.343) and (1, 0) (320 / 1184 = 0.270,
    just above); not level 1 (0, 0) (256 / 1248 = 0.205) nor level-0 neighbours (128 / 608 = 0.211)."""
    gt = [[0.0, 0.0, 24.0, 20.0]]
    expected = [{(1, 1), (1, 2), (2, 1), (2, 2)}, {(0, 1), (1, 0), (1, 1)}]
    assert oracle_masks(HAND_LEVELS, gt, 0.5) == expected
    masks = imitation_masks(hand_anchors(), HAND_GRID, Boxes(torch.tensor(gt)), 0.5)
    assert [m.shape for m in masks] == [torch.Size(s) for s in HAND_GRID] and masks[0].dtype == torch.bool
    assert as_sets(masks) == expected
    # psi = 0.55: threshold 0.293 drops level 1 (1, 0) only
    assert as_sets(imitation_masks(hand_anchors(), HAND_GRID, Boxes(torch.tensor(gt)), 0.55)) == [
        expected[0], {(0, 1), (1, 1)}]


def test_masks_of_random_boxes_match_the_oracle():
    """Several boxes per image (union of their masks; best IoU over both levels), inside and partly outside."""
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = 1 + trial % 4
        xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 36 - 4
        wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 30 + 1
        boxes = torch.cat([xy, xy + wh], dim=1)
        psi = (0.3, 0.5, 0.7)[trial % 3]
        got = imitation_masks(hand_anchors(), HAND_GRID, Boxes(boxes.float()), psi)
        assert as_sets(got) == oracle_masks(HAND_LEVELS, boxes.float().double().tolist(), psi), (boxes, psi)


def test_mask_without_boxes_or_overlap_is_empty():
    empty = imitation_masks(hand_anchors(), HAND_GRID, Boxes(torch.zeros(0, 4)), 0.5)
    far = imitation_masks(hand_anchors(), HAND_GRID, Boxes(torch.tensor([[200.0, 200.0, 220.0, 230.0]])), 0.5)
    for masks in (empty, far):  # far: M = 0, and IoU > 0 holds nowhere
        assert [m.shape for m in masks] == [torch.Size(s) for s in HAND_GRID] and not any(m.any() for m in masks)


# ----------------------------------------------------------------------------------------------
# tiny detectors
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _config(detector):
    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, f"{detector}_R_50_FPN_1x_lgd.py"))
    shrink_detector_config(cfg.model, NUM_CLASSES)
    cfg.train.init_checkpoint = ""
    return cfg


def make_config(detector="retinanet", **settings):
    cfg = copy.deepcopy(_config(detector))
    cfg.lgd.method = "fgfi"
    cfg.lgd.fgfi = dict(teacher_overrides=TEACHER_OVERRIDES[detector], **settings)
    return cfg


def save_teacher(method, path, seed=1, prefix=""):
    """A randomly initialised teacher of method's teacher config, saved as {"model": state} (keys prefixed)."""
    torch.manual_seed(seed)
    teacher = instantiate(method.teacher_config().model)
    torch.save({"model": {prefix + k: v for k, v in teacher.state_dict().items()}}, path)
    return teacher


def make_model(tmp_path, detector="retinanet", **settings):
    """(method, FGFIDistiller in train mode) with a saved random teacher given as teacher_checkpoint."""
    path = str(tmp_path / f"teacher_{detector}.pth")
    method = build_method(make_config(detector, teacher_checkpoint=path, **settings))
    save_teacher(method, path)
    torch.manual_seed(0)
    return method, method.build(instantiate(method.cfg.model), {}).train()


def make_input(boxes, classes, seed):
    return detectron2_input(boxes, classes, seed, IMAGE)


def make_batch():
    return [make_input([[10, 20, 60, 90], [70, 10, 120, 60]], [0, 2], seed=1),
            make_input([[30, 30, 100, 80]], [1], seed=2)]


def train_losses(model, batch, seed=0):
    torch.manual_seed(seed)  # the R-CNN samplers draw from the RNG
    with EventStorage(0):
        return model(batch)


# ----------------------------------------------------------------------------------------------
# the loss and the frozen teacher
# ----------------------------------------------------------------------------------------------

def test_loss_matches_a_direct_computation(tmp_path):
    _, model = make_model(tmp_path, loss_weight=0.3)
    torch.nn.init.normal_(model.adapter.weight, std=0.05)  # a non-trivial adapter
    torch.nn.init.normal_(model.adapter.bias, std=0.1)
    batch = make_batch()
    gt = [x["instances"].gt_boxes for x in batch]
    g = torch.Generator().manual_seed(3)
    shapes = {"p3": (12, 16), "p4": (6, 8), "p5": (3, 4), "p6": (2, 2), "p7": (1, 1)}
    student = {k: torch.randn(2, 32, *s, generator=g) for k, s in shapes.items()}
    teacher = {k: torch.randn(2, 48, *s, generator=g) for k, s in shapes.items()}
    got = model.imitation_loss(student, teacher, gt)

    anchors = model.anchor_generator([student[k] for k in model.levels])
    weight, bias = model.adapter.weight.detach().double(), model.adapter.bias.detach().double()
    squares, count = 0.0, 0
    for b in range(2):
        levels = [(*shapes[k], level_cells(boxes, *shapes[k])) for k, boxes in zip(model.levels, anchors)]
        masks = oracle_masks(levels, gt[b].tensor.double().tolist(), 0.5)
        for k, kept in zip(model.levels, masks):
            adapted = F.conv2d(student[k][b:b + 1].double(), weight, bias, padding=1)[0]
            for r, c in kept:
                squares += float(((adapted[:, r, c] - teacher[k][b, :, r, c].double()) ** 2).sum())
            count += len(kept)
    assert count > 0
    torch.testing.assert_close(got.double(), torch.tensor(0.3 * squares / (2 * count), dtype=torch.float64),
                               rtol=1e-5, atol=0)

    no_objects = [Boxes(torch.zeros(0, 4)), Boxes(torch.zeros(0, 4))]
    zero = model.imitation_loss(student, teacher, no_objects)
    assert zero.item() == 0.0 and zero.requires_grad


def test_gradients_reach_student_and_adapter_not_teacher(tmp_path):
    _, model = make_model(tmp_path)
    losses = train_losses(model, make_batch())
    losses["loss_imitation"].backward()
    student_bottom_up = list(model.detector.backbone.bottom_up.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student_bottom_up)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapter.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert all(p.grad is None for p in model.detector.head.parameters())  # the imitation reads the FPN only


def test_teacher_stays_in_eval_mode_and_unchanged(tmp_path):
    _, model = make_model(tmp_path)
    model.train()
    assert model.training and model.detector.training and model.adapter.training
    assert not any(m.training for m in model.teacher.modules())
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}  # BN running stats included
    train_losses(model, make_batch())
    after = model.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.eval()
    assert not model.detector.training


def test_eval_forward_is_the_students(tmp_path):
    _, model = make_model(tmp_path)
    model.eval()
    batch = [{"image": x["image"]} for x in make_batch()]
    with torch.no_grad():
        got, expected = model(batch), model.detector(batch)
    assert torch.equal(got[0]["instances"].pred_boxes.tensor, expected[0]["instances"].pred_boxes.tensor)


# ----------------------------------------------------------------------------------------------
# the method: settings, stages, build
# ----------------------------------------------------------------------------------------------

def test_stages_with_and_without_teacher_checkpoint():
    assert build_method(make_config(teacher_checkpoint="/some/teacher.pth")).stages() == []
    run_cfg = make_config()
    (stage,) = build_method(run_cfg).stages()
    assert stage.name == "teacher"
    assert stage.cfg.lgd.method == "baseline"
    assert stage.cfg.model.backbone.bottom_up.stages.depth == 34 and stage.cfg.model.backbone.out_channels == 48
    assert run_cfg.model.backbone.bottom_up.stages.depth == 18 and run_cfg.lgd.method == "fgfi"  # not touched
    assert stage.cfg.train.max_iter == run_cfg.train.max_iter


def test_settings_are_checked():
    with pytest.raises(ValueError, match=r"lgd.fgfi: unknown settings \['psy'\]"):
        build_method(make_config(psy=0.5))
    with pytest.raises(ValueError, match="lgd.fgfi.psi"):
        build_method(make_config(psi=1.0))
    with pytest.raises(ValueError, match="lgd.fgfi.loss_weight"):
        build_method(make_config(loss_weight=-1.0))
    cfg = make_config()
    cfg.lgd.fgfi.teacher_overrides = "model.backbone.out_channels=48"
    with pytest.raises(ValueError, match="lgd.fgfi.teacher_overrides must be a list"):
        build_method(cfg)
    cfg.lgd.fgfi.teacher_overrides = ["model.backbone.out_chanels=48"]
    with pytest.raises(UsageError, match="lgd.fgfi.teacher_overrides: .*out_chanels"):
        build_method(cfg).stages()
    assert FGFI.DEFAULTS["psi"] == 0.5 and FGFI.DEFAULTS["teacher_overrides"] == []


@pytest.mark.parametrize("prefix", ["", "detector."], ids=["detector", "lgd_wrapper"])
def test_build_loads_the_teacher_checkpoint(tmp_path, prefix):
    """A plain detector's checkpoint, and an lgd-style wrapper's (student under "detector.", other parts
    beside it), handed over as the teacher stage's checkpoint."""
    method = build_method(make_config())
    path = str(tmp_path / "teacher.pth")
    saved = save_teacher(method, path, prefix=prefix)
    if prefix:
        state = torch.load(path)
        state["model"]["teacher.some_encoder.weight"] = torch.zeros(3)
        torch.save(state, path)
    model = method.build(instantiate(method.cfg.model), {"teacher": path})
    assert isinstance(model, FGFIDistiller) and model.levels == LEVELS["retinanet"]
    loaded = model.teacher.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.state_dict().items())
    assert (model.adapter.in_channels, model.adapter.out_channels, model.adapter.kernel_size) == (32, 48, (3, 3))


def test_build_refuses_a_wrong_or_missing_teacher(tmp_path):
    method = build_method(make_config())
    with pytest.raises(ValueError, match="no teacher weights"):
        method.build(instantiate(method.cfg.model), {})
    student_path = str(tmp_path / "student.pth")  # the student's architecture, not the teacher's
    torch.save({"model": instantiate(method.cfg.model).state_dict()}, student_path)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        method.build(instantiate(method.cfg.model), {"teacher": student_path})


@pytest.mark.parametrize("detector", ["retinanet", "fcos", "faster_rcnn"])
def test_training_step(tmp_path, detector):
    method, model = make_model(tmp_path, detector)
    assert model.levels == LEVELS[detector]
    batch = make_batch()
    losses = train_losses(model, batch)
    assert set(losses) == DETECTOR_LOSSES[detector] | {"loss_imitation"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert losses["loss_imitation"] > 0
    optimizer = method.build_optimizer(model, lr=0.01)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in trained for p in model.teacher.parameters())
    assert all(id(p) in trained for p in model.adapter.parameters())
    teacher_before = [p.clone() for p in model.teacher.parameters()]
    adapter_before = model.adapter.weight.clone()
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, model.teacher.parameters()))
    assert not torch.equal(adapter_before, model.adapter.weight)
    assert all(torch.isfinite(v) for v in train_losses(model, batch).values())


# ----------------------------------------------------------------------------------------------
# lgd-train end to end
# ----------------------------------------------------------------------------------------------

FGFI_CONFIG = """
from detectron2.config import LazyConfig

_cfg = LazyConfig.load({tiny!r})
dataloader, model, optimizer, train, lgd = _cfg.dataloader, _cfg.model, _cfg.optimizer, _cfg.train, _cfg.lgd
lgd.method = "fgfi"
lgd.fgfi = dict(teacher_checkpoint="", teacher_overrides=["model.backbone.bottom_up.stages.depth=34"])
"""


def test_lgd_train_runs_fgfi_with_its_teacher_stage(tmp_path):
    """lgd-train with lgd.method=fgfi (test_lgd_train_net's tiny RetinaNet and synthetic COCO data, 2
    iterations): the teacher stage (a ResNet-34 baseline) is trained into OUTPUT/teacher first, then the
    student with loss_imitation; the final checkpoint holds the teacher stage's weights unchanged."""
    from test_lgd_train_net import argv, make_setup, read_metrics

    from lgd.tools.train_net import run

    root, tiny_cfg, ann, images = make_setup(tmp_path)
    cfg_file = root / "tiny_fgfi.py"
    cfg_file.write_text(FGFI_CONFIG.format(tiny=tiny_cfg))
    out = str(root / "run")
    results = run(argv(str(cfg_file), ann, images, out, max_iter=2))

    teacher = torch.load(os.path.join(out, "teacher", "model_final.pth"))["model"]
    assert any(k.startswith("backbone.bottom_up.res4.5.") for k in teacher)  # ResNet-34: 6 res4 blocks
    assert not any(k.startswith(("detector.", "teacher.")) for k in teacher)  # a baseline run: a plain detector
    final = torch.load(os.path.join(out, "model_final.pth"))["model"]
    assert all(torch.equal(final["teacher." + k], v) for k, v in teacher.items())
    assert "adapter.weight" in final and "detector.backbone.bottom_up.res4.1.conv1.weight" in final
    assert "detector.backbone.bottom_up.res4.2.conv1.weight" not in final  # the student stays ResNet-18
    rows = [r for r in read_metrics(out) if "loss_imitation" in r]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(math.isfinite(r["loss_imitation"]) and r["loss_imitation"] > 0 and math.isfinite(r["loss_cls"])
               for r in rows)
    assert "AP" in results["bbox"]


@pytest.mark.parametrize("name, teacher_depth", [("retinanet_R_50_FPN_2x_ms_lgd.py", 101),
                                                 ("faster_rcnn_R_50_FPN_1x_lgd.py", 101),
                                                 ("fcos_R_101_FPN_2x_ms_lgd.py", 101)])
def test_coco_configs_give_the_papers_teacher(name, teacher_depth):
    """R-50 COCO configs: the R-101 of the same detector with the R-101 ImageNet weights (the paper's FGFI rows);
    the others keep the student's own architecture. The teacher stage is a baseline run of that config."""
    from lgd.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "lgd", "configs", name), ["lgd.method=fgfi"])
    (stage,) = build_method(cfg).stages()
    assert stage.cfg.model.backbone.bottom_up.stages.depth == teacher_depth
    assert stage.cfg.train.init_checkpoint.endswith("/R-101.pkl") and stage.cfg.lgd.method == "baseline"
    assert cfg.model.backbone.bottom_up.stages.depth == int(name.split("_R_")[1].split("_")[0])
