"""LGDDistiller around a stock detectron2 RetinaNet (docs/method.md §8), CPU, tiny.

The detector is the model-zoo LazyConfig COCO-Detection/retinanet_R_50_FPN_1x.py shrunk to ResNet-18 with BN
(no weights, so no FrozenBN), 32 FPN channels, 3 classes, images 128 x 160.
"""
import copy

import pytest

pytest.importorskip("detectron2")

import torch
from detectron2 import model_zoo
from detectron2.config import instantiate
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage

import lgd_ops
from conftest import detectron2_input, sgd_loss_totals, shrink_retinanet_config, tiny_yacs_config
from lgd import LGDDistiller, LGDTeacher
from lgd.modeling.distiller import TEACHER_SUFFIX

NUM_CLASSES = 3
IMAGE = (128, 160)
DET_KEYS = {"loss_cls", "loss_box_reg"}
ALL_KEYS = DET_KEYS | {k + TEACHER_SUFFIX for k in DET_KEYS} | {"loss_distill"}


def tiny_retinanet(seed=0):
    cfg = shrink_retinanet_config(model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.py").model, NUM_CLASSES)
    torch.manual_seed(seed)
    return instantiate(cfg)


def make_distiller(backend="reference", seed=0, **kwargs):
    model = LGDDistiller(tiny_retinanet(seed), backend=backend, **kwargs)
    return model.train()


def make_input(boxes, classes, seed):
    return detectron2_input(boxes, classes, seed, IMAGE)


def make_batch():
    return [make_input([[10, 20, 60, 90], [80, 10, 150, 70]], [0, 2], seed=1),
            make_input([[30, 30, 120, 110]], [1], seed=2)]


def train_losses(model, batch):
    with EventStorage(0):
        return model(batch)


def test_losses_finite_with_expected_keys():
    losses = train_losses(make_distiller(), make_batch())
    assert set(losses) == ALL_KEYS
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name


def test_teacher_options_and_parameter_groups():
    model = make_distiller()
    assert isinstance(model.teacher, LGDTeacher)
    assert model.teacher.use_context and not model.teacher.appearance_encoder.detach_input
    student = {id(p) for p in model.student_parameters()}
    teacher = {id(p) for p in model.teacher_parameters()}
    assert not student & teacher
    assert student | teacher == {id(p) for p in model.parameters()}
    assert {id(p) for p in model.distill_loss.adapter.parameters()} <= student


def test_sgd_steps_lower_the_total_loss():
    model, batch = make_distiller(), make_batch()
    totals = sgd_loss_totals(model, lambda: train_losses(model, batch), steps=6)
    assert totals[-1] < totals[0], totals


@pytest.mark.parametrize("enabled", [False, True])
def test_distill_enabled_controls_student_gradient(enabled):
    model = make_distiller(distill_enabled=enabled)
    assert model.distill_enabled is enabled
    loss = train_losses(model, make_batch())["loss_distill"]
    backbone = list(model.detector.backbone.parameters())
    adapter = list(model.distill_loss.adapter.parameters())
    grads = torch.autograd.grad(loss, backbone + adapter + model.teacher_parameters(), allow_unused=True)
    backbone_grads = grads[: len(backbone)]
    adapter_grads = grads[len(backbone): len(backbone) + len(adapter)]
    assert all(g is not None and torch.isfinite(g).all() for g in adapter_grads)
    assert any(g.abs().sum() > 0 for g in adapter_grads)
    assert all(g is None for g in grads[len(backbone) + len(adapter):])  # X^I is detached
    if enabled:
        assert any(g is not None and g.abs().sum() > 0 for g in backbone_grads)
    else:
        assert all(g is None for g in backbone_grads)


def test_distill_enabled_setter():
    model = make_distiller()
    model.distill_enabled = False
    assert model.distill_enabled is False
    model.distill_enabled = 1
    assert model.distill_enabled is True


def test_frozen_backbone_keeps_bottom_up_and_trains_fpn():
    model, batch = make_distiller(), make_batch()
    opt = torch.optim.SGD(model.student_parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    total = sum(train_losses(model, batch).values())
    total.backward()  # stale gradients on the bottom-up part, which freezing must clear
    model.set_backbone_frozen(True)
    assert model.backbone_frozen
    backbone = model.detector.backbone
    bottom_up = copy.deepcopy(backbone.bottom_up.state_dict(keep_vars=False))
    fpn = {k: v.clone() for k, v in backbone.named_parameters() if not k.startswith("bottom_up.")}
    opt.zero_grad()
    sum(train_losses(model, batch).values()).backward()
    opt.step()
    for name, p in backbone.bottom_up.named_parameters():
        assert torch.equal(p, bottom_up[name]), name
    assert any(not torch.equal(p, fpn[k]) for k, p in backbone.named_parameters() if k in fpn)
    model.set_backbone_frozen(False)
    assert all(p.requires_grad for p in backbone.bottom_up.parameters())


@pytest.mark.skipif("cpu" not in lgd_ops.available_backends(), reason="lgd_ops CPU kernels not built")
def test_reference_and_cpu_backends_agree():
    ref = make_distiller("reference").double()
    cpu = LGDDistiller(copy.deepcopy(ref.detector), backend="cpu").double().train()
    cpu.load_state_dict(ref.state_dict())
    batch = make_batch()
    out = [train_losses(model, batch) for model in (ref, cpu)]
    assert set(out[0]) == set(out[1]) == ALL_KEYS
    for name in ALL_KEYS:
        torch.testing.assert_close(out[0][name], out[1][name], rtol=1e-9, atol=1e-10)


def test_inference_is_the_student_only():
    model, batch = make_distiller(), make_batch()
    calls = []
    for module in list(model.teacher.modules()) + list(model.distill_loss.modules()):
        module.register_forward_hook(lambda *args: calls.append(1))
    model.eval()
    with torch.no_grad():
        results = model(batch)
        expected = model.detector(batch)
    assert not calls
    assert len(results) == len(batch)
    for got, want in zip(results, expected):
        assert isinstance(got["instances"], Instances)
        assert got["instances"].image_size == IMAGE
        torch.testing.assert_close(got["instances"].pred_boxes.tensor, want["instances"].pred_boxes.tensor)
        torch.testing.assert_close(got["instances"].scores, want["instances"].scores)


@pytest.mark.parametrize("all_empty", [False, True])
def test_images_without_boxes_train(all_empty):
    batch = make_batch()
    batch[1] = make_input([], [], seed=3)
    if all_empty:
        batch[0] = make_input([], [], seed=4)
    model = make_distiller()
    losses = train_losses(model, batch)
    assert set(losses) == ALL_KEYS
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_training_needs_instances_and_unsupported_detectors_fail():
    model = make_distiller()
    with pytest.raises(ValueError, match="instances"):
        train_losses(model, [{"image": torch.zeros(3, *IMAGE)}])
    with pytest.raises(ValueError, match="unsupported detector"):
        LGDDistiller(torch.nn.Linear(2, 2))


def test_instructive_branch_uses_the_same_head_targets_and_normalizer(monkeypatch):
    """With X^I replaced by the student features, the "_tea" losses equal the student's exactly."""
    model, batch = make_distiller(), make_batch()
    monkeypatch.setattr(model.teacher, "forward", lambda features, targets, image_size: dict(features))
    for _ in range(2):  # the second iteration starts from an existing EMA normalizer
        losses = train_losses(model, batch)
        for name in DET_KEYS:
            torch.testing.assert_close(losses[name + TEACHER_SUFFIX], losses[name], rtol=0, atol=0)


def test_loss_normalizer_updated_once_per_iteration():
    model, batch = make_distiller(), make_batch()
    expected = 100.0  # RetinaNet's initial EMA value
    for it in range(2):
        with EventStorage(it) as storage:
            model(batch)
            num_pos = storage.history("num_pos_anchors").latest() * len(batch)
        expected = 0.9 * expected + 0.1 * max(num_pos, 1)
        assert model.detector.loss_normalizer == pytest.approx(expected)


def test_wraps_a_yacs_built_retinanet():
    from detectron2.modeling import build_model

    cfg = tiny_yacs_config("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    cfg.MODEL.RETINANET.NUM_CONVS, cfg.MODEL.RETINANET.NUM_CLASSES = 2, NUM_CLASSES
    torch.manual_seed(0)
    model = LGDDistiller(build_model(cfg), backend="reference").train()
    losses = train_losses(model, make_batch())
    assert set(losses) == ALL_KEYS and all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("autocast", [False, True])
def test_recompute_teacher_gives_the_same_losses_and_gradients(autocast):
    """lgd.recompute_teacher re-runs the teacher's forward in backward: same numbers, teacher activations freed."""
    grads = []
    for recompute in (False, True):
        model = make_distiller(recompute_teacher=recompute)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            losses = train_losses(model, make_batch())
        sum(losses.values()).backward()
        grads.append(({k: v.detach() for k, v in losses.items()},
                      {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grad_a), (loss_b, grad_b) = grads
    assert loss_a == loss_b
    assert grad_a.keys() == grad_b.keys() and any(n.startswith("teacher.") for n in grad_a)
    for name in grad_a:  # the same terms; only the order the FPN gradients accumulate in differs
        scale = float(grad_a[name].abs().max())
        torch.testing.assert_close(grad_b[name], grad_a[name], rtol=1e-3, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")


def test_recompute_teacher_keeps_no_teacher_activations():
    saved = []
    for recompute in (False, True):
        model = make_distiller(recompute_teacher=recompute)
        count = [0]

        def pack(x):
            count[0] += x.numel()
            return x
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            train_losses(model, make_batch())
        saved.append(count[0])
    assert saved[1] < saved[0]
