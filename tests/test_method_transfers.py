"""DML, BAN and tf-KD_reg as training methods (lgd.methods.dml / ban / tfkd; docs/methods/): the losses of a
training step, which parts the gradients reach, BAN's generations as stages, the tf-KD term against a float64
computation, and the settings' errors. CPU, tiny detectors (conftest.shrink_detector_config), 3 classes; then
lgd-train end to end with lgd.method=dml and ban (2 generations) on test_lgd_train_net's synthetic dataset."""
import copy
import functools
import math
import os

import pytest

pytest.importorskip("detectron2")

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.utils.events import EventStorage

from conftest import detectron2_input, shrink_detector_config
from lgd.methods import build_method, stage_checkpoint
from lgd.methods.ban import BornAgain
from lgd.methods.dml import PEER_SUFFIX
from lgd.methods.tfkd import tfkd_reg_loss

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lgd", "configs")
NUM_CLASSES = 3
IMAGE = (64, 96)
RETINANET_LOSSES = {"loss_cls", "loss_box_reg"}
RCNN_LOSSES = {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}


@functools.lru_cache(maxsize=None)
def _base_config(detector):
    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, f"{detector}_R_50_FPN_1x_lgd.py"))
    shrink_detector_config(cfg.model, NUM_CLASSES)
    cfg.lgd.backend = "reference"
    cfg.train.device = "cpu"
    return cfg


def method_config(method, detector="retinanet", output_dir="/tmp/lgd-run", **settings):
    cfg = copy.deepcopy(_base_config(detector))
    cfg.lgd.method = method
    cfg.train.output_dir = output_dir
    if settings:
        cfg.lgd[method] = settings
    return cfg


def build(cfg, checkpoints=None, seed=0):
    torch.manual_seed(seed)
    method = build_method(cfg)
    return method.build(instantiate(cfg.model), checkpoints or {}).train()


def make_input(boxes, classes, seed):
    return detectron2_input(boxes, classes, seed, IMAGE)


def make_batch():
    return [make_input([[4, 6, 40, 50], [50, 8, 90, 40]], [0, 2], seed=1), make_input([[20, 10, 70, 60]], [1], seed=2)]


def train_losses(model, batch=None):
    with EventStorage(0):
        return model(batch or make_batch())


def grads_of(module):
    """Names of module's parameters that got a gradient, and of those that did not."""
    got = {n for n, p in module.named_parameters() if p.grad is not None}
    return got, {n for n, _ in module.named_parameters()} - got


def assert_finite(losses):
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name


# --------------------------------------------------------------------------------------------------------
# DML
# --------------------------------------------------------------------------------------------------------

def test_dml_losses_and_gradients():
    model = build(method_config("dml"))
    losses = train_losses(model)
    assert set(losses) == (RETINANET_LOSSES | {k + PEER_SUFFIX for k in RETINANET_LOSSES}
                           | {"loss_distill", "loss_distill" + PEER_SUFFIX})
    assert_finite(losses)
    assert model.distill_loss.backend == model.peer_distill_loss.backend == "reference"  # the run's lgd.backend
    assert all(p.requires_grad for p in model.parameters())
    sum(losses.values()).backward()
    for part in (model.detector, model.peer, model.distill_loss, model.peer_distill_loss):
        assert grads_of(part)[1] == set()  # both students and both adapters train


@pytest.mark.parametrize("which", ["", PEER_SUFFIX])
def test_dml_mimicry_target_is_detached(which):
    model = build(method_config("dml"))
    train_losses(model)["loss_distill" + which].backward()
    student, target = (model.detector, model.peer) if not which else (model.peer, model.detector)
    adapter, other_adapter = ((model.distill_loss, model.peer_distill_loss) if not which
                              else (model.peer_distill_loss, model.distill_loss))
    assert grads_of(adapter)[1] == set()
    assert grads_of(student.backbone)[0]  # the mimicking student's features get the gradient
    assert grads_of(target)[0] == set() and grads_of(other_adapter)[0] == set()


def test_dml_students_differ_at_init_and_peer_ema_is_checkpointed():
    model = build(method_config("dml"))
    first, second = model.detector.state_dict(), model.peer.state_dict()
    assert first.keys() == second.keys()
    differ = [k for k in first if first[k].is_floating_point() and not torch.equal(first[k], second[k])]
    assert any(k.startswith("backbone.bottom_up") for k in differ) and any(k.startswith("head.") for k in differ)

    train_losses(model)  # sets both EMA loss normalizers
    model.peer.loss_normalizer = 123.5
    restored = build(method_config("dml"), seed=1)
    assert not hasattr(restored.peer, "loss_normalizer")
    restored.load_state_dict(model.state_dict())
    assert restored.peer.loss_normalizer == 123.5
    assert torch.equal(restored.peer.head.cls_score.weight, model.peer.head.cls_score.weight)


def test_dml_name_matched_init_weights_load_into_both_students(tmp_path):
    """An ImageNet-style .pkl (detectron2's matching heuristics) initialises both students, nothing else."""
    import pickle

    from lgd.engine.checkpoint import AtomicCheckpointer

    model = build(method_config("dml"))
    source = build(method_config("dml"), seed=5).detector.backbone.bottom_up.state_dict()
    adapters = {k: v.clone() for k, v in model.distill_loss.state_dict().items()}
    with open(tmp_path / "init.pkl", "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in source.items()}, "__author__": "test",
                     "matching_heuristics": True}, f)
    AtomicCheckpointer(model).load(str(tmp_path / "init.pkl"))
    for student in (model.detector, model.peer):
        loaded = student.backbone.bottom_up.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in source.items())
    assert all(torch.equal(model.distill_loss.state_dict()[k], v) for k, v in adapters.items())


def test_dml_eval_is_the_first_student():
    model = build(method_config("dml")).eval()
    batch = [{"image": make_batch()[0]["image"]}]
    with torch.no_grad():
        got, expected = model(batch)[0]["instances"], model.detector(batch)[0]["instances"]
    assert torch.equal(got.scores, expected.scores) and torch.equal(got.pred_boxes.tensor, expected.pred_boxes.tensor)


# --------------------------------------------------------------------------------------------------------
# BAN
# --------------------------------------------------------------------------------------------------------

def save_checkpoint(model, path):
    torch.save({"model": model.state_dict(), "iteration": 9}, path)
    return str(path)


def test_ban_generations_as_stages(tmp_path):
    out = str(tmp_path / "run")
    method = build_method(method_config("ban", output_dir=out, generations=3))
    assert method.generation == 3
    stages = method.stages()
    assert [s.name for s in stages] == ["ban_gen1", "ban_gen2"]
    for k, stage in enumerate(stages, start=1):
        assert stage.cfg.lgd.method == "ban"
        assert stage.cfg.lgd.ban.generation == k and stage.cfg.lgd.ban.generations == 3
        expected = None if k == 1 else stage_checkpoint(out, f"ban_gen{k - 1}")
        assert stage.cfg.lgd.ban.teacher_checkpoint == expected
        assert stage.cfg.model == method.cfg.model and stage.cfg.train == method.cfg.train
        inner = build_method(stage.cfg)
        assert inner.generation == k and inner.stages() == []  # a stage declares no stages of its own
    assert method.cfg.lgd.ban.get("generation") is None  # the run's own config is left as it was
    assert [s.name for s in build_method(method_config("ban", output_dir=out)).stages()] == ["ban_gen1"]  # default n=2
    assert build_method(method_config("ban", generations=1)).stages() == []


def test_ban_generation_one_is_the_baseline():
    model = build(method_config("ban", generations=1))
    assert type(model).__name__ == "RetinaNet"  # the detector itself, as the baseline method gives it
    losses = train_losses(model)
    assert set(losses) == RETINANET_LOSSES
    assert_finite(losses)


def test_ban_later_generation_distills_from_the_frozen_predecessor(tmp_path):
    previous = build(method_config("ban", generation=1), seed=3)
    path = save_checkpoint(previous, tmp_path / "gen1.pth")
    # the main run of 2 generations: its teacher is stage ban_gen1's checkpoint
    model = build(method_config("ban", generations=2), {"ban_gen1": path})
    assert isinstance(model, BornAgain)
    for name, value in previous.state_dict().items():
        assert torch.equal(model.teacher.state_dict()[name], value), name
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert not model.teacher.training and model.detector.training

    losses = train_losses(model)
    assert set(losses) == RETINANET_LOSSES | {"loss_distill"}
    assert_finite(losses)
    assert losses["loss_distill"] > 0
    sum(losses.values()).backward()
    assert grads_of(model.detector)[1] == set() and grads_of(model.distill_loss)[1] == set()
    assert grads_of(model.teacher)[0] == set()

    # generation 3 by hand from generation 2's checkpoint (a wrapper's: the student under detector.)
    third = build(method_config("ban", generations=3, generation=3,
                                teacher_checkpoint=save_checkpoint(model, tmp_path / "gen2.pth")), seed=4)
    for name, value in model.detector.state_dict().items():
        assert torch.equal(third.teacher.state_dict()[name], value), name


def test_ban_bad_settings_and_checkpoints(tmp_path):
    for settings, match in [({"generations": 0}, "generations"), ({"generations": 2.0}, "generations"),
                            ({"generation": 3}, "generation"), ({"generation": 2}, "teacher_checkpoint"),
                            ({"teacher_checkpoint": "x.pth"}, "teacher_checkpoint"),
                            ({"generation": 1, "teacher_checkpoint": "x.pth"}, "teacher_checkpoint"),
                            ({"teachers": 1}, "unknown settings")]:
        with pytest.raises(ValueError, match=match):
            build_method(method_config("ban", **settings))
    with pytest.raises(ValueError, match="ban_gen1"):
        build(method_config("ban"), {})
    missing = str(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="missing.pth"):
        build(method_config("ban", generation=2, teacher_checkpoint=missing))
    wrong = save_checkpoint(build(method_config("ban", "faster_rcnn", generation=1)), tmp_path / "rcnn.pth")
    with pytest.raises(ValueError, match="rcnn.pth does not fit"):
        build(method_config("ban", generation=2, teacher_checkpoint=wrong))


# --------------------------------------------------------------------------------------------------------
# tf-KD_reg
# --------------------------------------------------------------------------------------------------------

def direct_tfkd(logits, labels, a, temperature):
    """The KL term in float64 with Python loops: virtual teacher q_k = exp(p_k / T) / sum_j exp(p_j / T),
    p = a on the label and (1 - a) / (K - 1) elsewhere; sum_k q_k (log q_k - log softmax(z)_k), row mean."""
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        k = len(row)
        p = [a if j == label else (1 - a) / (k - 1) for j in range(k)]
        zq = sum(math.exp(v / temperature) for v in p)
        q = [math.exp(v / temperature) / zq for v in p]
        log_z = math.log(sum(math.exp(v) for v in row))
        total += sum(qk * (math.log(qk) - (zk - log_z)) for qk, zk in zip(q, row))
    return total / len(logits)


def test_tfkd_term_against_a_direct_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 0.3, -3.0], [-1.0, 4.0, 1.0, 1.0]],
                          dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, 1])
    for a, temperature in [(0.99, 20.0), (0.9, 1.0), (0.5, 0.5)]:
        logits.grad = None
        got = tfkd_reg_loss(logits, labels, a, temperature)
        assert got.item() == pytest.approx(direct_tfkd(logits.detach(), labels, a, temperature), rel=1e-6, abs=1e-9)
        got.backward()
        # d/dz of KL(q || softmax(z)) averaged over N rows: (softmax(z) - q) / N
        k = logits.shape[1]
        p = torch.full((3, k), (1 - a) / (k - 1), dtype=torch.float64)
        p[torch.arange(3), labels] = a
        q = torch.softmax(p / temperature, dim=1)
        expected = (torch.softmax(logits.detach(), dim=1) - q) / 3
        torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-7)
    empty = torch.zeros(0, 4, requires_grad=True)
    zero = tfkd_reg_loss(empty, torch.zeros(0, dtype=torch.int64))
    assert zero.item() == 0.0
    zero.backward()
    with pytest.raises(ValueError, match="labels"):
        tfkd_reg_loss(logits, labels[:2])


def test_tfkd_on_faster_rcnn(monkeypatch):
    model = build(method_config("tfkd", "faster_rcnn", alpha=0.25))
    predictor = model.detector.roi_heads.box_predictor
    seen = {}
    stock_losses = predictor.losses

    def recording_losses(predictions, proposals):
        seen["out"] = stock_losses(predictions, proposals)
        seen["scores"], seen["labels"] = predictions[0], torch.cat([p.gt_classes for p in proposals])
        return seen["out"]

    monkeypatch.setattr(predictor, "losses", recording_losses)
    losses = train_losses(model)
    assert set(losses) == RCNN_LOSSES | {"loss_tfkd"}
    assert_finite(losses)
    assert seen["scores"].shape[1] == NUM_CLASSES + 1 and (seen["labels"] == NUM_CLASSES).any()
    torch.testing.assert_close(losses["loss_cls"], 0.75 * seen["out"]["loss_cls"])
    expected = 0.25 * tfkd_reg_loss(seen["scores"], seen["labels"], 0.99, 20.0)
    torch.testing.assert_close(losses["loss_tfkd"], expected)
    losses["loss_tfkd"].backward()
    assert predictor.cls_score.weight.grad.abs().sum() > 0
    assert predictor.bbox_pred.weight.grad is None  # the term acts on the classifier only


def test_tfkd_refuses_sigmoid_detectors_and_bad_settings():
    with pytest.raises(ValueError, match="Faster R-CNN and Mask R-CNN"):
        build(method_config("tfkd"))
    for settings, match in [({"alpha": 1.5}, "alpha"), ({"correct_prob": 0.1}, "correct_prob"),
                            ({"temperature": 0.0}, "temperature"), ({"T": 4.0}, "unknown settings")]:
        with pytest.raises(ValueError, match=match):
            build(method_config("tfkd", "faster_rcnn", **settings))


def test_dml_unknown_setting():
    with pytest.raises(ValueError, match=r"lgd.dml: unknown settings \['distil_weight'\]"):
        build_method(method_config("dml", distil_weight=2.0))


# --------------------------------------------------------------------------------------------------------
# lgd-train end to end (test_lgd_train_net's tiny RetinaNet config and 4-image dataset, 2 iterations)
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    pytest.importorskip("pycocotools")
    from test_lgd_train_net import make_setup

    return make_setup(tmp_path_factory.mktemp("method_transfers"))


def metric_rows(out):
    from test_lgd_train_net import read_metrics

    return [r for r in read_metrics(out) if "total_loss" in r]


def lgd_train(train_setup, name, *extra):
    from lgd.tools.train_net import run
    from test_lgd_train_net import argv

    root, cfg_file, ann, images = train_setup
    out = str(root / name)
    results = run(argv(cfg_file, ann, images, out, *extra, max_iter=2))
    rows = metric_rows(out)
    assert [r["iteration"] for r in rows] == [0, 1]
    return out, results, rows


def test_lgd_train_dml(train_setup):
    out, results, rows = lgd_train(train_setup, "dml", "+lgd.method=dml")
    for row in rows:
        for key in ("loss_cls", "loss_cls_peer", "loss_box_reg_peer", "loss_distill", "loss_distill_peer"):
            assert math.isfinite(row[key]), (key, row)
    assert "AP" in results["bbox"]  # the first student, evaluated
    state = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)["model"]
    assert any(k.startswith("detector.") for k in state) and any(k.startswith("peer.") for k in state)


def test_lgd_train_ban_two_generations(train_setup):
    out, results, rows = lgd_train(train_setup, "ban", "+lgd.method=ban", "+lgd.ban.generations=2")
    assert all(math.isfinite(r["loss_distill"]) for r in rows) and "AP" in results["bbox"]
    first = torch.load(stage_checkpoint(out, "ban_gen1"), weights_only=True)["model"]
    gen1_rows = metric_rows(os.path.join(out, "ban_gen1"))
    assert len(gen1_rows) == 2 and not any("loss_distill" in r for r in gen1_rows)  # generation 1: the baseline
    final = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)["model"]
    teacher = {k[len("teacher."):]: v for k, v in final.items() if k.startswith("teacher.")}
    assert teacher.keys() == first.keys()
    assert all(torch.equal(teacher[k], first[k]) for k in first)  # the frozen generation 1

