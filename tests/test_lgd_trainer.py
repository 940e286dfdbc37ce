"""LGD training on detectron2's engine (lgd.engine, docs/method.md §8): schedule hooks, the one optimizer with
the student's and the teacher's parameter groups, clipping, LR, resume.

A tiny RetinaNet LGDDistiller (test_lgd_distiller's builder) trained for a few iterations on one synthetic batch
repeated forever; a recorder hook, registered after the LGD hooks, traces the state seen by each step.
"""
import itertools
import random

import numpy as np
import pytest

pytest.importorskip("detectron2")

import torch
from detectron2.engine import HookBase, SimpleTrainer
from detectron2.utils.events import EventStorage

from lgd.data.samplers import ResumableTrainingSampler
from lgd.engine.hooks import (BackboneFreezeSchedule, DistillationSchedule, IterationSeed, LRScheduler,
                              build_lgd_hooks, build_lr_hook)
from lgd.engine.optim import GROUP_KEY, GradientClip, build_lgd_optimizer, build_sgd
from lgd.engine.schedule import PAPER_SCHEDULES, LGDSchedule
from lgd.engine.trainer import AMPTrainer
from test_lgd_distiller import make_batch, make_distiller, tiny_retinanet

# distillation from iteration 3, bottom-up frozen for 0-1, LR: warm-up 0.1 -> 1 over 2 iterations, /10 at 3, 5
SCHEDULE = LGDSchedule(max_iter=6, steps=(3, 5), distill_start_iter=3, backbone_freeze_iters=2,
                       warmup_iters=2, warmup_factor=0.1)
EXPECTED_MULTIPLIER = [0.1, 0.55, 1.0, 0.1, 0.1, 0.01]
LR_STUDENT, LR_TEACHER = 0.01, 0.02


def data_loader():
    return itertools.repeat(make_batch())


def groups(model):
    """name -> list of parameters: bottom-up backbone, FPN (rest of the backbone), teacher."""
    backbone = model.detector.backbone
    return {
        "bottom_up": list(backbone.bottom_up.parameters()),
        "fpn": [p for n, p in backbone.named_parameters() if not n.startswith("bottom_up.")],
        "head": list(model.detector.head.parameters()),
        "teacher": model.teacher_parameters(),
    }


class Recorder(HookBase):
    """Per step: the model's flags, both LRs, which parameter groups changed, and whether loss_distill's
    gradient reaches the FPN (wrapping the distillation loss' forward)."""

    def __init__(self, model):
        self.model = model
        self.trace = []
        original = model.distill_loss.forward
        fpn = groups(model)["fpn"]

        def forward(*args, **kwargs):
            loss = original(*args, **kwargs)
            grads = torch.autograd.grad(loss, fpn, retain_graph=True, allow_unused=True)
            self.current["distill_reaches_fpn"] = any(g is not None and g.abs().sum() > 0 for g in grads)
            return loss

        model.distill_loss.forward = forward

    def before_step(self):
        self.before = {k: [p.detach().clone() for p in ps] for k, ps in groups(self.model).items()}
        self.current = {
            "iter": self.trainer.iter,
            "distill_enabled": self.model.distill_enabled,
            "backbone_frozen": self.model.backbone_frozen,
            "lr": [part_lr(self.trainer.optimizer, part) for part in ("student", "teacher")],
        }

    def after_step(self):
        for name, params in groups(self.model).items():
            self.current[name + "_changed"] = any(
                not torch.equal(p, q) for p, q in zip(params, self.before[name]))
        storage = self.trainer.storage
        self.current["logged"] = {k: storage.history(k).latest() for k in
                                  ("lgd/distill_enabled", "lgd/backbone_frozen", "loss_distill", "loss_cls_tea")}
        self.trace.append(self.current)


def part_lr(optimizer, part):
    """The LR of a part's ("student" / "teacher") parameter groups (one value: they share it)."""
    (lr,) = {g["lr"] for g in optimizer.param_groups if g[GROUP_KEY] == part}
    return lr


def run(start_iter, max_iter, schedule=SCHEDULE, clip=None):
    model = make_distiller()
    optimizer = build_lgd_optimizer(model, lr=LR_STUDENT, teacher_lr=LR_TEACHER, clip=clip)
    trainer = SimpleTrainer(model, data_loader(), optimizer)
    recorder = Recorder(model)
    trainer.register_hooks(build_lgd_hooks(schedule) + [recorder])
    trainer.train(start_iter, max_iter)
    return trainer, recorder.trace


@pytest.fixture(scope="module")
def trace():
    return run(0, SCHEDULE.max_iter)[1]


def test_steps_run_in_order(trace):
    assert [t["iter"] for t in trace] == list(range(SCHEDULE.max_iter))


def test_distillation_switches_on_at_start_iter(trace):
    for t in trace:
        on = t["iter"] >= SCHEDULE.distill_start_iter
        assert t["distill_enabled"] is on, t["iter"]
        assert t["distill_reaches_fpn"] is on, t["iter"]  # warm-up: student features detached
        assert t["logged"]["lgd/distill_enabled"] == float(on)
        assert torch.isfinite(torch.tensor(t["logged"]["loss_distill"]))


def test_backbone_frozen_then_trained_fpn_always(trace):
    for t in trace:
        frozen = t["iter"] < SCHEDULE.backbone_freeze_iters
        assert t["backbone_frozen"] is frozen, t["iter"]
        assert t["logged"]["lgd/backbone_frozen"] == float(frozen)
        assert t["bottom_up_changed"] is not frozen, t["iter"]
        assert t["fpn_changed"] and t["head_changed"], t["iter"]


def test_student_and_teacher_step(trace):
    assert all(t["teacher_changed"] for t in trace)
    assert all(t["head_changed"] for t in trace)
    assert "loss_cls_tea" in trace[0]["logged"]


def test_lr_schedule_applies_to_both_parts(trace):
    for t, m in zip(trace, EXPECTED_MULTIPLIER):
        assert t["lr"] == pytest.approx([LR_STUDENT * m, LR_TEACHER * m], rel=1e-6), t["iter"]


@pytest.mark.parametrize("start_iter", [1, 4])
def test_resume_state_at_first_step(start_iter):
    """train(start_iter, ...) on a fresh model (distill on, backbone trainable by default): the hooks set the
    state of iteration start_iter before its step, and the LRs continue the schedule."""
    _, trace = run(start_iter, start_iter + 1)
    (t,) = trace
    assert t["iter"] == start_iter
    assert t["distill_enabled"] is (start_iter >= SCHEDULE.distill_start_iter)
    assert t["backbone_frozen"] is (start_iter < SCHEDULE.backbone_freeze_iters)
    assert t["bottom_up_changed"] is not t["backbone_frozen"]
    m = EXPECTED_MULTIPLIER[start_iter]
    assert t["lr"] == pytest.approx([LR_STUDENT * m, LR_TEACHER * m], rel=1e-6)


def _part_grads(optimizer):
    """part -> its gradients."""
    out = {}
    for g in optimizer.param_groups:
        out.setdefault(g[GROUP_KEY], []).extend(p.grad for p in g["params"] if p.grad is not None)
    assert set(out) == {"student", "teacher"} and all(out.values())
    return out


def test_gradient_value_clipping_is_per_element():
    """The authors' clipping (detectron2 CLIP_TYPE "value"): every gradient element in [-v, v], student and
    teacher, and some elements sit at the bound (the clip acted)."""
    value = 1e-4
    trainer, _ = run(2, 3, clip=GradientClip("value", value))
    for part, grads in _part_grads(trainer.optimizer).items():
        grads = torch.cat([g.flatten() for g in grads])
        assert grads.abs().max() <= value and (grads.abs() == value).any(), part


def test_gradient_clip_rejects_bad_settings():
    with pytest.raises(ValueError, match="kind"):
        GradientClip("l2", 1.0)
    with pytest.raises(ValueError, match="value"):
        GradientClip("value", 0.0)


def test_gradient_norm_clipping_per_part_and_state_dict():
    max_norm = 1e-3
    trainer, _ = run(2, 3, clip=GradientClip("norm", max_norm))
    for part, grads in _part_grads(trainer.optimizer).items():
        assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) <= max_norm * (1 + 1e-4), part
    state = trainer.state_dict()
    assert state["iteration"] == 3
    model = make_distiller()
    fresh = SimpleTrainer(model, data_loader(), build_lgd_optimizer(model, lr=0.5))
    fresh.load_state_dict(state)
    assert fresh.iter == 3
    for part, want in (("student", LR_STUDENT), ("teacher", LR_TEACHER)):
        assert {g["initial_lr"] for g in fresh.optimizer.param_groups if g[GROUP_KEY] == part} == {want}
    assert fresh.optimizer.state_dict()["state"]  # momentum buffers restored


def test_one_optimizer_equals_the_authors_two():
    """One SGD with the two parts' groups makes the same update as the authors' two optimizers (and a
    two-optimizer trainer state converts to it, momentum buffers included)."""
    batch = make_batch()
    one, two = make_distiller(), make_distiller()
    optimizer = build_lgd_optimizer(one, lr=LR_STUDENT, teacher_lr=LR_TEACHER)
    student = torch.optim.SGD(
        [{"params": [p for p in two.student_parameters() if p.requires_grad], "weight_decay": 1e-4}],
        lr=LR_STUDENT, momentum=0.9)
    teacher = torch.optim.SGD([{"params": two.teacher_parameters(), "weight_decay": 1e-4}], lr=LR_TEACHER,
                              momentum=0.9)
    for _ in range(2):
        for model, optimizers in ((one, [optimizer]), (two, [student, teacher])):
            for opt in optimizers:
                opt.zero_grad()
            with EventStorage(0):
                sum(model(batch).values()).backward()
            for opt in optimizers:
                opt.step()
    for (name, a), b in zip(one.named_parameters(), two.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_paper_schedules_and_scaling():
    one_x, two_x = PAPER_SCHEDULES["1x"], PAPER_SCHEDULES["2x"]
    assert (one_x.steps, one_x.distill_start_iter, one_x.backbone_freeze_iters) == ((60000, 80000), 30000, 10000)
    assert (two_x.steps, two_x.distill_start_iter, two_x.backbone_freeze_iters) == ((120000, 160000), 30000, 20000)
    assert one_x.scaled(90000) is one_x
    short = one_x.scaled(900)
    assert (short.max_iter, short.steps, short.distill_start_iter, short.backbone_freeze_iters,
            short.warmup_iters) == (900, (600, 800), 300, 100, 10)
    mult = short.lr_multiplier()
    assert mult(700 / 900) == pytest.approx(0.1) and mult(850 / 900) == pytest.approx(0.01)
    assert mult(0.0) == pytest.approx(0.001)
    assert one_x.scaled(2).steps == (1,) and one_x.scaled(1).steps == ()


@pytest.mark.parametrize("kwargs, name", [
    (dict(max_iter=0), "max_iter"), (dict(steps=(5, 3)), "steps"), (dict(steps=(10,)), "steps"),
    (dict(distill_start_iter=-1), "distill_start_iter"), (dict(warmup_iters=1.5), "warmup_iters"),
])
def test_schedule_rejects_bad_counts(kwargs, name):
    base = dict(max_iter=10, steps=(6, 8), distill_start_iter=3, backbone_freeze_iters=1)
    with pytest.raises(ValueError, match=name):
        LGDSchedule(**dict(base, **kwargs))


def test_hooks_state_comes_from_iteration_not_toggles():
    class Fake:
        def __init__(self, it):
            self.iter, self.model = it, make_distiller()
            self.storage = type("S", (), {"put_scalar": lambda *a, **k: None})()

    for it in (5, 0, 7, 1):  # arbitrary order, as after a resume
        trainer = Fake(it)
        for hook in (DistillationSchedule(3), BackboneFreezeSchedule(2)):
            hook.trainer = trainer
            hook.before_step()
        assert trainer.model.distill_enabled is (it >= 3)
        assert trainer.model.backbone_frozen is (it < 2)


@pytest.mark.parametrize("device,dtype", [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
])
def test_amp_trainer_steps_student_and_teacher(device, dtype):
    model = make_distiller().to(device)
    trainer = AMPTrainer(model, data_loader(), build_lgd_optimizer(model, lr=0.01, clip=GradientClip("norm", 1.0)),
                         device_type=device, dtype=dtype)
    before = {k: [p.detach().clone() for p in ps] for k, ps in groups(model).items()}
    trainer.train(0, 2)
    for name, params in groups(model).items():
        assert any(not torch.equal(p, q) for p, q in zip(params, before[name])), name
    state = trainer.state_dict()
    assert "optimizer" in state and "grad_scaler" in state


def test_detection_checkpointer_saves_and_resumes_the_optimizer(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer

    trainer, _ = run(1, 3)
    DetectionCheckpointer(trainer.model, str(tmp_path), trainer=trainer).save("model_0000002")
    model = make_distiller(seed=1)
    fresh = SimpleTrainer(model, data_loader(), build_lgd_optimizer(model, lr=0.5))
    DetectionCheckpointer(model, str(tmp_path), trainer=fresh).resume_or_load(
        str(tmp_path / "model_0000002.pth"), resume=True)
    assert fresh.iter == trainer.iter
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    got, want = fresh.optimizer, trainer.optimizer
    assert [g["lr"] for g in got.param_groups] == [g["lr"] for g in want.param_groups]
    buffers = [got.state[p]["momentum_buffer"] for g in got.param_groups for p in g["params"] if p in got.state]
    expected = [want.state[p]["momentum_buffer"] for g in want.param_groups for p in g["params"] if p in want.state]
    assert len(buffers) == len(expected) > 0
    assert all(torch.equal(a, b) for a, b in zip(buffers, expected))


@pytest.mark.parametrize("norm_decay", [None, 0.0])
def test_optimizer_covers_every_parameter_once_with_the_norm_decay(norm_decay):
    """Default (the authors'): 1e-4 on every parameter, norm layers included; 0 on norms is the option."""
    model = make_distiller()
    optimizer = build_lgd_optimizer(model, lr=0.01, weight_decay=1e-4, weight_decay_norm=norm_decay)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert sorted(decay) == sorted(id(p) for p in model.parameters())  # each parameter in exactly one group
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(decay)
    assert {id(p) for g in optimizer.param_groups if g[GROUP_KEY] == "teacher" for p in g["params"]} == {
        id(p) for p in model.teacher.parameters()}
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm))]
    norm_params = {id(p) for m in norms for p in m.parameters(recurse=False)}
    assert norm_params and all(decay[i] == (1e-4 if norm_decay is None else 0.0) for i in norm_params)
    assert all(decay[id(p)] == 1e-4 for p in model.parameters() if id(p) not in norm_params)


def test_baseline_hooks_train_plain_detector_with_lgd_schedule():
    """The baseline: only the LR hook ("lr"), one optimizer, a plain RetinaNet, same LR multipliers."""
    hooks = [build_lr_hook(SCHEDULE)]
    assert [type(h) for h in hooks] == [LRScheduler]
    detector = tiny_retinanet()
    trainer = SimpleTrainer(detector, data_loader(), build_sgd(detector, lr=LR_STUDENT))
    lrs = []

    class LR(HookBase):
        def after_step(self):
            lrs.append(self.trainer.storage.history("lr").latest())

    trainer.register_hooks(hooks + [LR()])
    trainer.train(0, 3)
    assert lrs == pytest.approx([LR_STUDENT * m for m in EXPECTED_MULTIPLIER[:3]], rel=1e-6)
    assert "loss_cls" in trainer.storage.histories() and "loss_distill" not in trainer.storage.histories()


def test_resumable_sampler_continues_training_sampler_stream():
    from detectron2.data.samplers import TrainingSampler

    stream = list(itertools.islice(iter(TrainingSampler(10, seed=3)), 25))
    assert list(itertools.islice(iter(ResumableTrainingSampler(10, seed=3)), 25)) == stream
    assert list(itertools.islice(iter(ResumableTrainingSampler(10, seed=3, start=12)), 13)) == stream[12:]
    with pytest.raises(ValueError, match="start"):
        ResumableTrainingSampler(10, start=-1)


def test_iteration_seed_depends_on_iteration_only():
    hook = IterationSeed(seed=7)

    def draws(iteration):
        hook.trainer = type("T", (), {"iter": iteration})()
        hook.before_step()
        return torch.rand(3), random.random(), np.random.rand()

    first = draws(5)
    draws(2), torch.rand(10)  # whatever ran before
    again = draws(5)
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
    assert not torch.equal(draws(6)[0], first[0])


def _stock_frozen_distiller():
    """The tiny RetinaNet with detectron2's FREEZE_AT=2: the stem and res2 are frozen by the detector itself."""
    from detectron2 import model_zoo
    from detectron2.config import instantiate

    from conftest import shrink_retinanet_config
    from lgd import LGDDistiller

    cfg = shrink_retinanet_config(model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.py").model, 3)
    cfg.backbone.bottom_up.freeze_at = 2
    torch.manual_seed(0)
    return LGDDistiller(instantiate(cfg), backend="reference").train()


class TrainableRecorder(HookBase):
    """The names of the parameters with requires_grad at each step (after the LGD hooks ran)."""

    def __init__(self, model):
        self.model, self.trainable = model, {}

    def before_step(self):
        self.trainable[self.trainer.iter] = frozenset(
            n for n, p in self.model.named_parameters() if p.requires_grad)


def _trainable_sets(start_iter):
    model = _stock_frozen_distiller()
    trainer = SimpleTrainer(model, data_loader(), build_lgd_optimizer(model, lr=LR_STUDENT))
    recorder = TrainableRecorder(model)
    trainer.register_hooks(build_lgd_hooks(SCHEDULE) + [recorder])
    trainer.train(start_iter, SCHEDULE.max_iter)
    return recorder.trainable


def test_freezing_keeps_what_the_stock_detector_freezes():
    """Stem and res2 (FREEZE_AT=2) stay frozen for the whole run; the rest of the bottom-up part trains
    from backbone_freeze_iters on; a run resumed at any iteration has the same trainable set at every step."""
    uninterrupted = _trainable_sets(0)
    stock = "detector.backbone.bottom_up."
    for it, names in uninterrupted.items():
        assert not any(n.startswith((stock + "stem.", stock + "res2.")) for n in names), it
        assert any(n.startswith(stock + "res3.") for n in names) == (it >= SCHEDULE.backbone_freeze_iters), it
        assert any(n.startswith("detector.backbone.fpn") for n in names), it
    for start in (1, 3):
        resumed = _trainable_sets(start)
        assert resumed == {it: uninterrupted[it] for it in range(start, SCHEDULE.max_iter)}, start
