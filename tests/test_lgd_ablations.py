"""The paper's ablations as lgd.* switches (docs/method.md §5-8): lgd.label_encoder, lgd.interaction,
lgd.use_objects and lgd.instructive_head. Each variant builds from a shipped config and trains a step on CPU for
RetinaNet, FCOS and Faster R-CNN; each switch changes what it names and nothing at inference; the defaults are
the method (tests/test_lgd_golden.py pins its numbers); a wrong value is one line listing the valid ones.
"""
import copy
import functools
import os

import pytest

pytest.importorskip("detectron2")

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.utils.events import EventStorage

from conftest import detectron2_input, shrink_detector_config
from lgd import LGDTeacher
from lgd.config import load_config
from lgd.engine.optim import build_lgd_optimizer
from lgd.methods import build_method
from lgd.methods.builtin import LGD
from lgd.modeling.knowledge_mapper import KnowledgeMapper
from lgd.modeling.label_encoder import MLPLabelEncoder, TransformerLabelEncoder, build_label_encoder
from lgd.modeling.labels import PackedLabels
from lgd.modeling.relation_adapter import per_image

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lgd", "configs")
NUM_CLASSES = 3
IMAGE = (128, 160)
DETECTORS = ("retinanet", "fcos", "faster_rcnn")
# every non-default value of every switch (the defaults: test_defaults_are_the_method)
VARIANTS = [dict(label_encoder="mlp"), dict(label_encoder="transformer"), dict(interaction="label_guided"),
            dict(interaction="student_fill"), dict(interaction="teacher_fill"),
            dict(use_objects=False, use_context=True),  # the FCOS R50 config turns the context off
            dict(instructive_head="unshared")]


def variant_id(v):
    return ",".join(f"{k}={x}" for k, x in v.items()) or "defaults"


@functools.lru_cache(maxsize=None)
def _config(detector, overrides=()):
    cfg = load_config(os.path.join(CONFIG_DIR, f"{detector}_R_50_FPN_1x_lgd.py"), list(overrides))
    shrink_detector_config(cfg.model, NUM_CLASSES)
    return cfg


def build(detector="retinanet", seed=0, **settings):
    """The LGD model of a shipped config with lgd.* overrides `settings`, shrunk for CPU, in train mode."""
    cfg = copy.deepcopy(_config(detector, tuple(f"lgd.{k}={v}" for k, v in sorted(settings.items()))))
    method = build_method(cfg)
    torch.manual_seed(seed)
    return method.build(instantiate(cfg.model), {}).train()


def make_batch():
    return [detectron2_input([[10, 20, 60, 90], [80, 10, 150, 70]], [0, 2], 1, IMAGE),
            detectron2_input([[30, 30, 120, 110]], [1], 2, IMAGE)]


def train_losses(model, batch=None):
    torch.manual_seed(0)  # R-CNN's proposal sampling
    with EventStorage(0):
        return model(batch or make_batch())


def packed(counts=(3, 2), num_classes=5, seed=0, context=True):
    g = torch.Generator().manual_seed(seed)
    boxes, classes = [], []
    for n in counts:
        xy = torch.rand(n, 2, generator=g) * 60
        boxes.append(torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 60], 1))
        classes.append(torch.randint(0, num_classes, (n,), generator=g))
    return PackedLabels.from_lists(boxes, classes, (128, 160), context=context)


def feats(seed=0, channels=256, sizes=((16, 20), (8, 10))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, channels, *s, generator=g) for s in sizes]


@pytest.mark.parametrize("detector", DETECTORS)
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_variant_trains_a_step(detector, variant):
    """Built from the shipped config with the lgd.* override; every teacher parameter gets a finite gradient
    (a part the variant does not use is not built), and an SGD step changes them."""
    model = build(detector, **variant)
    losses = train_losses(model)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    params = model.teacher_parameters()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    before = [p.detach().clone() for p in params]
    optimizer = build_lgd_optimizer(model, lr=0.01)
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


@pytest.mark.parametrize("variant", [{}] + VARIANTS, ids=variant_id)
def test_inference_is_the_student_alone(variant):
    """No switch changes inference: the same detections as the bare detector, the teacher and any unshared
    head never run."""
    model = build(**variant).eval()
    ran = []
    parts = [model.teacher] + ([model.instructive_head] if model.instructive_head is not None else [])
    handles = [m.register_forward_hook(lambda *a: ran.append(1)) for p in parts for m in p.modules()]
    batch = [{"image": x["image"]} for x in make_batch()]
    with torch.no_grad():
        ours, plain = model(batch), model.detector(batch)
    for h in handles:
        h.remove()
    assert not ran
    assert all(torch.equal(a["instances"].scores, b["instances"].scores) for a, b in zip(ours, plain))


def test_defaults_are_the_method():
    """LGD.DEFAULTS are the authors' settings and build the same model, with the same losses, as a config
    that spells them out."""
    d = LGD.DEFAULTS
    assert (d["label_encoder"], d["interaction"], d["use_objects"], d["instructive_head"]) == (
        "pointnet", "student_guided", True, "shared")
    plain, spelled = build(), build(label_encoder="pointnet", interaction="student_guided", use_objects=True,
                                    instructive_head="shared")
    assert plain.instructive_head is None and plain.teacher.relation_adapter.query == "student"
    assert plain.state_dict().keys() == spelled.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), spelled.state_dict().values()))
    a, b = train_losses(plain), train_losses(spelled)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("key, value, valid", [
    ("label_encoder", "pointnett", "['pointnet', 'mlp', 'transformer']"),
    ("interaction", "stuGuided", "['student_guided', 'label_guided', 'student_fill', 'teacher_fill']"),
    ("instructive_head", "separate", "['shared', 'unshared']"),
])
def test_unknown_value_is_one_line_listing_the_valid_ones(key, value, valid):
    cfg = copy.deepcopy(_config("retinanet"))
    cfg.lgd[key] = value
    with pytest.raises(ValueError) as info:
        build_method(cfg)
    assert str(info.value) == f"lgd.{key} must be one of {valid}, got {value!r}"


def test_use_objects_off_needs_the_context():
    cfg = copy.deepcopy(_config("retinanet", ("lgd.use_objects=False", "lgd.use_context=False")))
    with pytest.raises(ValueError, match=r"^lgd.use_objects=False paints only the context object: it needs "
                                         r"lgd.use_context True or None, got False$"):
        build_method(cfg)
    with pytest.raises(ValueError, match="use_objects=False needs use_context=True"):
        KnowledgeMapper(32, use_context=False, use_objects=False)
    # Faster R-CNN's context is off by default: only-the-context turns it on
    assert build("faster_rcnn", use_objects=False).teacher.use_context


# -- lgd.label_encoder (Table 4) --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["pointnet", "mlp", "transformer"])
def test_label_encoder_kinds(kind):
    """Each kind gives [N, channels]; the MLP encodes each object alone, the PointNet and the transformer see
    the other objects of the image only."""
    torch.manual_seed(0)
    encoder = build_label_encoder(kind, 5, channels=32).double()
    labels = packed()
    out = encoder(labels)
    assert out.shape == (labels.num_objects, 32) and torch.isfinite(out).all()
    moved = packed()
    moved.boxes[0] += 5  # image 0's first object; image 1 starts at object 4 (3 objects + its context)
    changed = (encoder(moved) - out).abs().amax(1) > 1e-9
    assert not changed[4:].any()  # never the other image
    assert changed[1:4].any() == (kind != "mlp")  # the same image's other objects: all but the MLP


def test_transformer_label_encoder_has_six_heads_and_masks_by_image():
    encoder = TransformerLabelEncoder(5, channels=32)
    layers = encoder.encoder.layers
    assert len(layers) == 2 and all(layer.self_attn.num_heads == 6 and layer.self_attn.embed_dim == 384
                                    for layer in layers)
    assert isinstance(build_label_encoder("mlp", 5), MLPLabelEncoder)
    empty = PackedLabels.from_lists([torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.long)] * 2, (64, 64),
                                    context=False)
    assert encoder(empty).shape == (0, 32)


# -- lgd.interaction (Table 5 and the authors' fill variants) ----------------------------------------------------

def _teacher_run(interaction, **kwargs):
    """X^I of a double teacher with hooks capturing the attention's inputs and the knowledge mapper's."""
    torch.manual_seed(0)
    teacher = LGDTeacher(5, channels=32, num_heads=4, interaction=interaction, **kwargs).double()
    seen = {}
    hooks = [teacher.knowledge_mapper.register_forward_pre_hook(lambda m, a: seen.__setitem__("mapped", a[0]))]
    for name in ("label_encoder", "appearance_encoder"):
        if getattr(teacher, name) is not None:
            hooks.append(getattr(teacher, name).register_forward_hook(
                lambda m, a, out, name=name: seen.__setitem__(name, out)))
    if teacher.relation_adapter is not None:
        hooks.append(teacher.relation_adapter.attention.register_forward_pre_hook(
            lambda m, a, k: seen.__setitem__("qkv", a), with_kwargs=True))
    labels = packed()
    levels = [f.double() for f in feats(channels=32)]
    out = teacher(levels, labels)
    return teacher, seen, labels, out


@pytest.mark.parametrize("interaction", ["student_guided", "label_guided"])
def test_guided_interactions_swap_the_query(interaction):
    """student_guided: the query is the level's appearance embeddings, key = value the label embeddings;
    label_guided: the reverse."""
    teacher, seen, labels, _ = _teacher_run(interaction)
    query, key, value = seen["qkv"]
    levels = len(seen["appearance_encoder"])
    appearance = torch.cat([per_image(a, labels) for a in seen["appearance_encoder"]])  # [L * B, N_max, C]
    label = per_image(seen["label_encoder"], labels).repeat(levels, 1, 1)
    want_query, want_key = (appearance, label) if interaction == "student_guided" else (label, appearance)
    assert torch.equal(query, want_query) and torch.equal(key, want_key) and torch.equal(value, want_key)


def test_fill_interactions_paint_one_embedding_without_attention():
    """student_fill paints the appearance embeddings (no label encoder, no attention); teacher_fill the label
    embeddings on every level (no appearance encoder, no attention)."""
    teacher, seen, _, out = _teacher_run("student_fill")
    assert teacher.label_encoder is None and teacher.relation_adapter is None
    assert all(torch.equal(a, b) for a, b in zip(seen["mapped"], seen["appearance_encoder"]))
    teacher, seen, _, out = _teacher_run("teacher_fill")
    assert teacher.appearance_encoder is None and teacher.relation_adapter is None
    assert len(seen["mapped"]) == 2 and all(torch.equal(e, seen["label_encoder"]) for e in seen["mapped"])
    assert [tuple(x.shape) for x in out] == [(2, 32, 16, 20), (2, 32, 8, 10)]


def test_teacher_fill_ignores_the_student_features():
    teacher, _, labels, out = _teacher_run("teacher_fill")
    other = teacher([f.double() for f in feats(seed=1, channels=32)], labels)
    assert all(torch.equal(a, b) for a, b in zip(out, other))


# -- lgd.use_objects (Table 6a) ------------------------------------------------------------------------------------

def test_use_objects_off_paints_only_the_context():
    """The refinement's input is F_ctx(e_context) after ReLU, the same on every cell of an image, and the
    objects' relation embeddings do not reach X^I; F_inst and G are not built."""
    torch.manual_seed(0)
    mapper = KnowledgeMapper(32, use_objects=False).double()
    assert mapper.instance_proj is None and mapper.spatial is None
    labels = packed()
    e = [torch.randn(labels.num_objects, 32, dtype=torch.float64) for _ in range(2)]
    seen = []
    mapper.refine.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    out = mapper(e, labels, [(16, 20), (8, 10)])
    ctx = labels.object_index(context=True)
    for x, e_l in zip(seen, e):
        want = torch.relu(mapper.context_proj(e_l[ctx]))[:, :, None, None].expand_as(x)
        assert torch.equal(x, want)
    objects = labels.object_index(context=False)
    e_other = [x.clone().index_fill_(0, objects, 7.0) for x in e]
    assert all(torch.equal(a, b) for a, b in zip(out, mapper(e_other, labels, [(16, 20), (8, 10)])))


# -- lgd.instructive_head (Table 6b) -------------------------------------------------------------------------------

@pytest.mark.parametrize("detector, branch, parts", [
    ("retinanet", "detector", ["head"]), ("faster_rcnn", "detector", ["proposal_generator", "roi_heads"]),
    ("faster_rcnn", "shared_proposals", ["roi_heads"])])
def test_unshared_head_has_its_own_parameters_and_gradients(detector, branch, parts):
    """A copy of the detector's head (the same architecture and initial weights), in the teacher's optimizer
    group; the instructive losses train only it, the student's losses only the detector's own head."""
    model = build(detector, instructive_head="unshared", rcnn_branch=branch)
    assert sorted(model.instructive_head) == sorted(parts)
    own = {id(p) for p in model.instructive_head.parameters()}
    student_head = [p for name in parts for p in getattr(model.detector, name).parameters()]
    assert own and not own & {id(p) for p in model.detector.parameters()}
    assert own <= {id(p) for p in model.teacher_parameters()}
    groups = build_lgd_optimizer(model, lr=0.01).param_groups
    assert own <= {id(p) for g in groups if g["lgd_part"] == "teacher" for p in g["params"]}
    for name in parts:
        copy_state, state = model.instructive_head[name].state_dict(), getattr(model.detector, name).state_dict()
        assert all(torch.equal(copy_state[k], state[k]) for k in state)
    losses = train_losses(model)
    instructive = sum(v for k, v in losses.items() if k.endswith("_tea"))
    student = sum(v for k, v in losses.items() if not k.endswith("_tea") and k != "loss_distill")
    instructive.backward(retain_graph=True)
    assert all(p.grad is None for p in student_head)
    assert all(p.grad is not None for p in model.instructive_head.parameters())
    model.zero_grad(set_to_none=True)
    student.backward()
    assert all(p.grad is None for p in model.instructive_head.parameters())
    assert any(p.grad is not None for p in student_head)


def test_shared_head_gets_both_branches():
    model = build()
    losses = train_losses(model)
    sum(v for k, v in losses.items() if k.endswith("_tea")).backward()
    assert all(p.grad is not None for p in model.detector.head.parameters())


# -- parameter counts (docs/method.md §10's table) -------------------------------------------------------------------

TEACHER_PARAMETERS_K80 = {  # 256 channels, context on, no masks
    "defaults": 8_304_336, "label_encoder=mlp": 3_819_200, "label_encoder=transformer": 7_091_072,
    "interaction=label_guided": 8_304_336, "interaction=student_fill": 3_081_984,
    "interaction=teacher_fill": 7_451_088, "use_objects=False": 7_648_464,
}


@pytest.mark.parametrize("variant", list(TEACHER_PARAMETERS_K80))
def test_teacher_parameter_count_k80(variant):
    settings = dict(kv.split("=") for kv in variant.split(",")) if variant != "defaults" else {}
    settings = {k: v == "True" if v in ("True", "False") else v for k, v in settings.items()}
    teacher = LGDTeacher(80, **settings)
    assert sum(p.numel() for p in teacher.parameters()) == TEACHER_PARAMETERS_K80[variant]


# -- what a run records ----------------------------------------------------------------------------------------------

def test_config_and_checkpoint_record_the_variant(tmp_path):
    """The run's config.yaml holds every lgd.* switch; a checkpoint's keys differ by variant, so the
    unshared head's weights are saved and reload into the same variant."""
    cfg = copy.deepcopy(_config("retinanet", ("lgd.instructive_head=unshared", "lgd.label_encoder=mlp")))
    LazyConfig.save(cfg, str(tmp_path / "config.yaml"))
    saved = LazyConfig.load(str(tmp_path / "config.yaml")).lgd
    assert (saved.instructive_head, saved.label_encoder, saved.interaction, saved.use_objects) == (
        "unshared", "mlp", "student_guided", True)
    model = build(instructive_head="unshared", label_encoder="mlp")
    keys = set(model.state_dict())
    assert any(k.startswith("instructive_head.head.") for k in keys)
    assert any(k.startswith("teacher.label_encoder.layers.") for k in keys)
    assert not any(k.startswith("instructive_head.") for k in build().state_dict())
    again = build(seed=1, instructive_head="unshared", label_encoder="mlp")
    again.load_state_dict(model.state_dict())
