"""lgd/ modules (docs/method.md §4-7): packing, descriptors, PointNet, appearance, relation, mapper, loss, teacher.

CPU, small sizes. Oracles: hand-worked descriptor values, conftest's float64 loop oracles for pooling and
filling, a per-image loop for the attention, and the spec's formulas written out for mapper and loss.
"""
import pytest

pytest.importorskip("detectron2")

import torch
import torch.nn.functional as F
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

import lgd
import lgd_ops
from conftest import oracle_box_fill, oracle_box_pool, oracle_normalized_mse
from lgd import (
    CONTEXT_CLASS,
    AppearanceEncoder,
    DistillationLoss,
    KnowledgeMapper,
    LabelEncoder,
    LGDTeacher,
    PackedLabels,
    RelationAdapter,
    SpatialTransformer,
    build_descriptors,
)

C = 256
IMAGE = (48, 64)  # padded input (H_in, W_in)
LEVELS = ((12, 16), (6, 8), (3, 4))


def random_lists(counts, num_classes=5, image_size=IMAGE, dtype=torch.float64, seed=0):
    """Per-image boxes (some past the image edge) and classes for images with `counts` objects."""
    g = torch.Generator().manual_seed(seed)
    in_h, in_w = image_size
    boxes, classes = [], []
    for n in counts:
        xy = torch.rand(n, 2, generator=g, dtype=dtype) * torch.tensor([in_w, in_h], dtype=dtype) - 4
        wh = torch.rand(n, 2, generator=g, dtype=dtype) * torch.tensor([in_w, in_h], dtype=dtype) / 2 + 2
        boxes.append(torch.cat([xy, xy + wh], dim=1))
        classes.append(torch.randint(0, num_classes, (n,), generator=g))
    return boxes, classes


def make_labels(counts, context=True, num_classes=5, seed=0, dtype=torch.float64):
    boxes, classes = random_lists(counts, num_classes, dtype=dtype, seed=seed)
    return PackedLabels.from_lists(boxes, classes, IMAGE, context=context)


def make_features(batch, dtype=torch.float64, seed=1, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, C, h, w, generator=g, dtype=dtype).requires_grad_(requires_grad) for h, w in LEVELS]


def randomize_stn(module, scale=0.05):
    """Move every STN off its identity start, so the layers before its last Linear matter."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, SpatialTransformer):
                m.matrix.weight.normal_(0, scale)


def weighted_sum(maps, seed=2):
    """A loss whose gradient is not killed by the final GroupNorm (a plain sum of its output is constant)."""
    g = torch.Generator().manual_seed(seed)
    return sum((x * torch.randn(x.shape, generator=g, dtype=x.dtype)).sum() for x in maps)


# ----------------------------------------------------------------------------------------------
# PackedLabels
# ----------------------------------------------------------------------------------------------

def test_pack_layout_context_last_per_image():
    boxes, classes = random_lists([3, 0, 2])
    labels = PackedLabels.from_lists(boxes, classes, IMAGE, context=True)
    assert labels.batch_idx.tolist() == [0, 0, 0, 0, 1, 2, 2, 2]
    assert labels.classes.tolist() == classes[0].tolist() + [-1, -1] + classes[2].tolist() + [-1]
    assert labels.is_context.tolist() == [False] * 3 + [True, True] + [False] * 2 + [True]
    in_h, in_w = IMAGE
    torch.testing.assert_close(labels.boxes[labels.is_context],
                               torch.tensor([[0.0, 0.0, in_w - 1, in_h - 1]] * 3, dtype=torch.float64))
    assert (labels.boxes[:, 0::2] >= 0).all() and (labels.boxes[:, 0::2] <= in_w - 1).all()
    assert (labels.boxes[:, 1::2] >= 0).all() and (labels.boxes[:, 1::2] <= in_h - 1).all()

    plain = PackedLabels.from_lists(boxes, classes, IMAGE, context=False)
    assert plain.batch_idx.tolist() == [0, 0, 0, 2, 2] and not plain.is_context.any()


def test_pack_from_instances_and_from_packed_agree_with_lists():
    boxes, classes = random_lists([2, 0, 3], dtype=torch.float32)
    expected = PackedLabels.from_lists(boxes, classes, IMAGE, context=True)
    instances = []
    for b, c in zip(boxes, classes):
        inst = Instances(IMAGE)
        inst.gt_boxes, inst.gt_classes = Boxes(b), c
        instances.append(inst)
    got = PackedLabels.from_instances(instances, IMAGE, context=True)
    assert got.batch_idx.equal(expected.batch_idx) and got.classes.equal(expected.classes) and got.num_images == 3
    torch.testing.assert_close(got.boxes, expected.boxes)

    # flat objects 0, 1 (image 0) and 2, 3, 4 (image 2), shuffled: regrouped per image, input order kept inside
    order = torch.tensor([4, 0, 3, 1, 2])
    flat_idx = torch.tensor([0, 0, 2, 2, 2])
    got = PackedLabels.from_packed(torch.cat(boxes)[order], torch.cat(classes)[order], flat_idx[order], 3, IMAGE,
                                   context=True)
    perm = [0, 1, 2, 3, 6, 5, 4, 7]  # image 2 arrives as objects 4, 3, 2; contexts stay last
    assert got.batch_idx.equal(expected.batch_idx) and got.classes.equal(expected.classes[perm])
    torch.testing.assert_close(got.boxes, expected.boxes[perm])


def test_pack_masks_padded_and_context_mask_full():
    masks = [torch.zeros(1, 40, 50, dtype=torch.bool), torch.zeros(0, 30, 30, dtype=torch.bool)]
    masks[0][0, 5:20, 10:30] = True
    boxes = [torch.tensor([[10.0, 5.0, 30.0, 20.0]]), torch.zeros(0, 4)]
    classes = [torch.tensor([1]), torch.zeros(0, dtype=torch.int64)]
    labels = PackedLabels.from_lists(boxes, classes, IMAGE, context=True, masks=masks)
    assert labels.masks.shape == (3, *IMAGE) and labels.mask_crops.shape == (3, 49)
    assert labels.masks[0, :40, :50].equal(masks[0][0]) and not labels.masks[0, 40:].any()
    assert labels.masks[1].all() and labels.masks[2].all()  # both context objects cover the padded input
    assert (labels.mask_crops[0] == 1).all()  # the mask fills its box
    assert (labels.mask_crops[1:] == 1).all()


# ----------------------------------------------------------------------------------------------
# Descriptors and the label encoder
# ----------------------------------------------------------------------------------------------

def test_descriptors_hand_worked():
    # H_in = 100, W_in = 200, K = 3; image 1 has no objects, only its context object
    boxes = [torch.tensor([[20.0, 10.0, 220.0, 50.0], [-5.0, 30.0, 100.0, 120.0]]), torch.zeros(0, 4)]
    classes = [torch.tensor([2, 0]), torch.zeros(0, dtype=torch.int64)]
    labels = PackedLabels.from_lists(boxes, classes, (100, 200), context=True)
    got = build_descriptors(labels, 3)
    # clamped (20, 10, 199, 50) / (200, 100) = (.1, .1, .995, .5); one-hot (0, 0, 1); then 2x - 1
    # clamped (0, 30, 100, 99) -> (0, .3, .5, .99); one-hot (1, 0, 0)
    # context (0, 0, 199, 99) -> (0, 0, .995, .99); no class
    expected = torch.tensor([
        [-0.8, -0.8, 0.99, 0.0, -1.0, -1.0, 1.0],
        [-1.0, -0.4, 0.0, 0.98, 1.0, -1.0, -1.0],
        [-1.0, -1.0, 0.99, 0.98, -1.0, -1.0, -1.0],
        [-1.0, -1.0, 0.99, 0.98, -1.0, -1.0, -1.0],
    ])
    torch.testing.assert_close(got, expected)
    assert labels.batch_idx.tolist() == [0, 0, 0, 1]


def test_descriptors_mask_crop_hand_worked():
    # box (0, 0, 14, 14) over a 14 x 14 mask whose columns 0..6 are set: 7 x 7 ROIAlign bins of 2 x 2 pixels;
    # column bins 0-2 are full, bin 3 (columns 6, 7) is half -> >= 0.5 -> set, bins 4-6 empty
    mask = torch.zeros(1, 14, 14, dtype=torch.bool)
    mask[0, :, :7] = True
    labels = PackedLabels.from_lists([torch.tensor([[0.0, 0.0, 14.0, 14.0]])], [torch.tensor([0])], (14, 14),
                                     context=True, masks=[mask])
    got = build_descriptors(labels, 2, use_masks=True)
    assert got.shape == (2, 4 + 2 + 49)
    row = torch.tensor([1.0, 1, 1, 1, -1, -1, -1])
    torch.testing.assert_close(got[0, 6:], row.repeat(7))
    torch.testing.assert_close(got[1, 6:], torch.ones(49))  # context object: all-ones crop


@pytest.mark.parametrize("num_classes", [1, 7, 80])
@pytest.mark.parametrize("stn_pool", ["image", "object"])
def test_label_encoder_shapes_any_num_classes(num_classes, stn_pool):
    labels = make_labels([4, 0, 2], num_classes=num_classes, dtype=torch.float32)
    encoder = LabelEncoder(num_classes, stn_pool=stn_pool)
    assert encoder.descriptor_dim == 4 + num_classes
    out = encoder(labels)
    assert out.shape == (labels.num_objects, C) and torch.isfinite(out).all()


@pytest.mark.parametrize("pool", ["image", "object"])
@pytest.mark.parametrize("dim", [9, 64])
def test_spatial_transformer_starts_at_identity(pool, dim):
    stn = SpatialTransformer(dim, pool)
    x = torch.randn(6, dim)
    torch.testing.assert_close(stn(x, torch.tensor([0, 0, 0, 1, 1, 2]), 3), x)
    randomize_stn(stn)
    assert not torch.allclose(stn(x, torch.tensor([0, 0, 0, 1, 1, 2]), 3), x)


def test_spatial_transformer_pooling_scope():
    """pool="image": one matrix per image (the transform is linear in x within an image); "object": its own."""
    x = torch.randn(4, 5, dtype=torch.float64)
    idx = torch.tensor([0, 0, 1, 1])
    for pool in ("image", "object"):
        stn = SpatialTransformer(5, pool).double()
        randomize_stn(stn, 0.5)
        out = stn(x, idx, 2)
        changed = stn(torch.cat([x[:1], 2 * x[1:2], x[2:]]), idx, 2)  # changes object 1 only
        torch.testing.assert_close(changed[2:], out[2:])  # the other image never sees it
        assert torch.allclose(changed[0], out[0]) == (pool == "object")


def test_label_encoder_max_is_per_image():
    encoder = LabelEncoder(5).double()
    randomize_stn(encoder)
    labels = make_labels([3, 2])
    boxes, classes = random_lists([3, 2])
    boxes[1] = boxes[1] * 0.5 + 3
    classes[1] = (classes[1] + 1) % 5
    other = PackedLabels.from_lists(boxes, classes, IMAGE, context=True)
    a, b = encoder(labels), encoder(other)
    torch.testing.assert_close(a[:4], b[:4], rtol=0, atol=0)
    assert not torch.allclose(a[4:], b[4:])


# ----------------------------------------------------------------------------------------------
# Appearance encoder, relation adapter, knowledge mapper
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("detach_input", [False, True])
def test_appearance_encoder_pools_projection(detach_input):
    labels = make_labels([3, 0, 2])
    features = make_features(3, requires_grad=True)
    encoder = AppearanceEncoder(detach_input=detach_input, backend="reference").double()
    out = encoder(features, labels)
    assert [a.shape for a in out] == [(labels.num_objects, C)] * len(LEVELS)
    for a, x in zip(out, features):
        expected = oracle_box_pool(encoder.proj(x), labels.boxes, labels.batch_idx, IMAGE)
        torch.testing.assert_close(a, expected, rtol=1e-9, atol=1e-10)
        context_mean = encoder.proj(x).mean(dim=(2, 3))  # the context box covers the whole level
        torch.testing.assert_close(a[labels.is_context], context_mean, rtol=1e-9, atol=1e-10)
    weighted_sum(out).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
    assert all((x.grad is None) == detach_input for x in features)


def test_relation_adapter_matches_per_image_attention():
    labels = make_labels([3, 1, 0, 4], context=False)
    g = torch.Generator().manual_seed(3)
    n = labels.num_objects
    appearance = [torch.randn(n, C, generator=g, dtype=torch.float64) for _ in range(2)]
    label_emb = torch.randn(n, C, generator=g, dtype=torch.float64)
    adapter = RelationAdapter().double()
    out = adapter(appearance, label_emb, labels)
    for level, a in enumerate(appearance):
        for b in range(labels.num_images):
            rows = labels.batch_idx == b
            if not rows.any():
                continue
            kv = label_emb[rows][None]
            expected = adapter.attention(a[rows][None], kv, kv)[0][0]  # no residual, no FFN
            torch.testing.assert_close(out[level][rows], expected, rtol=1e-9, atol=1e-10)


def test_relation_adapter_context_is_key_and_query():
    labels = make_labels([2, 3], context=True)
    g = torch.Generator().manual_seed(4)
    n = labels.num_objects
    appearance = [torch.randn(n, C, generator=g, dtype=torch.float64)]
    label_emb = torch.randn(n, C, generator=g, dtype=torch.float64)
    adapter = RelationAdapter().double()
    base = adapter(appearance, label_emb, labels)[0]
    changed_emb = label_emb.clone()
    changed_emb[2] += 1  # image 0's context object (objects 0, 1, then context)
    changed = adapter(appearance, changed_emb, labels)[0]
    assert not torch.allclose(changed[:2], base[:2])  # its label embedding is a key/value for its image
    torch.testing.assert_close(changed[3:], base[3:], rtol=0, atol=0)  # image 1 never sees it
    assert labels.is_context[2] and labels.is_context[6]


@pytest.mark.parametrize("use_context", [True, False])
def test_knowledge_mapper_formula(use_context):
    labels = make_labels([3, 0, 2], context=use_context)
    g = torch.Generator().manual_seed(5)
    e = [torch.randn(labels.num_objects, C, generator=g, dtype=torch.float64) for _ in LEVELS]
    mapper = KnowledgeMapper(use_context=use_context, backend="reference").double()
    out = mapper(e, labels, LEVELS)
    inst = ~labels.is_context
    for x, e_l, (h, w) in zip(out, e, LEVELS):
        painted = oracle_box_fill(mapper.instance_proj(e_l[inst]), labels.boxes[inst], labels.batch_idx[inst],
                                  IMAGE, (3, h, w))
        pre = mapper.spatial(painted)
        if use_context:
            pre = pre + mapper.context_proj(e_l[labels.is_context])[:, :, None, None]
        torch.testing.assert_close(x, mapper.refine(F.relu(pre)), rtol=1e-9, atol=1e-9)
    assert (mapper.context_proj is None) == (not use_context)


# ----------------------------------------------------------------------------------------------
# The teacher
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_context", [True, False])
def test_teacher_shapes_dict_and_list(use_context):
    teacher = LGDTeacher(5, use_context=use_context)
    features = make_features(2, dtype=torch.float32)
    instances = []
    for b, c in zip(*random_lists([3, 1], dtype=torch.float32)):
        inst = Instances((40, 60))
        inst.gt_boxes, inst.gt_classes = Boxes(b), c
        instances.append(inst)
    as_list = teacher(features, instances, torch.Size(IMAGE))  # images.tensor.shape[-2:] works as is
    as_dict = teacher(dict(zip(["p3", "p4", "p5"], features)), instances, IMAGE)
    assert [x.shape for x in as_list] == [x.shape for x in features]
    assert list(as_dict) == ["p3", "p4", "p5"]
    for a, b in zip(as_list, as_dict.values()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("use_context", [True, False])
def test_teacher_image_without_objects(use_context):
    teacher = LGDTeacher(5, use_context=use_context).double()
    randomize_stn(teacher)
    for counts in ([2, 0, 3], [0, 0]):
        if use_context is False or counts != [0, 0]:
            features = make_features(len(counts), requires_grad=True)
            labels = make_labels(counts, context=use_context)
            out = teacher(features, labels)
            assert all(torch.isfinite(x).all() for x in out)
            teacher.zero_grad()
            weighted_sum(out).backward()
            assert all(torch.isfinite(p.grad).all() for p in teacher.parameters() if p.grad is not None)
            # no object anywhere (context off): X^I does not depend on the features at all
            assert all(torch.isfinite(x.grad).all() if sum(counts) else x.grad is None for x in features)
    if use_context:  # every image empty: each holds only its context object
        labels = make_labels([0, 0], context=True)
        assert labels.num_objects == 2 and labels.is_context.all()
        out = teacher(make_features(2), labels)
        assert all(torch.isfinite(x).all() for x in out)


@pytest.mark.parametrize("use_context", [True, False])
def test_teacher_attention_stays_inside_each_image(use_context):
    teacher = LGDTeacher(5, use_context=use_context).double()
    randomize_stn(teacher)
    features = make_features(2)
    base = teacher(features, make_labels([3, 2], context=use_context))
    boxes, classes = random_lists([3, 2])
    for counts, seed in (([3, 2], 7), ([3, 5], 8)):  # same object count in image 1, then more objects
        other_boxes, other_classes = random_lists(counts, seed=seed)
        labels = PackedLabels.from_lists([boxes[0], other_boxes[1]], [classes[0], other_classes[1]], IMAGE,
                                         context=use_context)
        other_features = [x.clone() for x in features]
        for x in other_features:
            x[1] += 1.0
        out = teacher(other_features, labels)
        for a, b in zip(base, out):
            torch.testing.assert_close(b[0], a[0], rtol=1e-10, atol=1e-12)
            assert not torch.allclose(b[1], a[1])


@pytest.mark.parametrize("use_context", [True, False])
def test_teacher_reference_equals_cpu(use_context):
    if "cpu" not in lgd_ops.available_backends():
        pytest.skip("lgd_ops CPU kernels not built")
    outputs, grads = [], []
    state = None
    for backend in ("reference", "cpu"):
        teacher = LGDTeacher(5, use_context=use_context, backend=backend).double()
        if state is None:
            randomize_stn(teacher)
            state = teacher.state_dict()
        teacher.load_state_dict(state)
        features = make_features(3, requires_grad=True)
        out = teacher(features, make_labels([4, 0, 3], context=use_context))
        weighted_sum(out).backward()
        outputs.append(out)
        grads.append([x.grad for x in features] + [p.grad for p in teacher.parameters()])
    for a, b in zip(*outputs):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("detach_appearance", [False, True])
def test_teacher_gradients_reach_every_parameter(detach_appearance):
    teacher = LGDTeacher(5, detach_appearance=detach_appearance).double()
    features = make_features(2, requires_grad=True)
    labels = make_labels([3, 2])
    weighted_sum(teacher(features, labels)).backward()
    # identity start: the last Linear of each STN has weight 0, so the layers before it get no gradient yet
    before_matrix = {n for n, _ in teacher.named_parameters() if "transform." in n and ".matrix." not in n}
    for name, p in teacher.named_parameters():
        assert p.grad is not None, name
        assert (p.grad.abs().sum() > 0) == (name not in before_matrix), name
    assert all((x.grad is None) == detach_appearance for x in features)
    teacher.zero_grad()
    randomize_stn(teacher)
    weighted_sum(teacher(make_features(2), labels)).backward()
    assert all(p.grad.abs().sum() > 0 for p in teacher.parameters())


def test_teacher_mask_variant():
    teacher = LGDTeacher(4, use_context=False, detach_appearance=True, use_masks=True).double()
    assert teacher.label_encoder.descriptor_dim == 4 + 4 + 49
    instances = []
    polygon = PolygonMasks([[[2.0, 2.0, 30.0, 2.0, 30.0, 20.0, 2.0, 20.0]], [[10.0, 5.0, 40.0, 5.0, 25.0, 35.0]]])
    inst = Instances((40, 60))
    inst.gt_boxes = Boxes(torch.tensor([[2.0, 2.0, 30.0, 20.0], [10.0, 5.0, 40.0, 35.0]], dtype=torch.float64))
    inst.gt_classes, inst.gt_masks = torch.tensor([0, 3]), polygon
    instances.append(inst)
    inst = Instances((48, 64))
    bits = torch.zeros(1, 48, 64, dtype=torch.bool)
    bits[0, 10:30, 20:50] = True
    inst.gt_boxes = Boxes(torch.tensor([[20.0, 10.0, 50.0, 30.0]], dtype=torch.float64))
    inst.gt_classes, inst.gt_masks = torch.tensor([1]), BitMasks(bits)
    instances.append(inst)
    features = make_features(2, requires_grad=True)
    out = teacher(features, instances, IMAGE)
    assert [x.shape for x in out] == [x.shape for x in features]
    assert all(torch.isfinite(x).all() for x in out)
    labels = teacher.pack(instances, IMAGE)
    assert labels.masks[2].equal(bits[0]) and labels.masks[0, 3:19, 3:29].all() and not labels.masks[0, 22:].any()
    teacher_ctx = LGDTeacher(4, use_masks=True).double()
    out = teacher_ctx(features, instances, IMAGE)
    weighted_sum(out).backward()
    assert all(p.grad is not None for p in teacher_ctx.parameters())


# ----------------------------------------------------------------------------------------------
# Distillation loss
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("warmup", [False, True])
def test_distillation_loss_value_and_gradients(warmup):
    loss_fn = DistillationLoss(loss_weight=2.0, backend="reference").double()
    student = {k: x for k, x in zip(["p3", "p4"], make_features(2, requires_grad=True)[:2])}
    instructive = {k: x for k, x in zip(["p4", "p3"], make_features(2, seed=9, requires_grad=True)[1::-1])}
    loss = loss_fn(student, instructive, warmup=warmup)
    adapted = [loss_fn.adapter(student[k]) for k in ("p3", "p4")]
    expected = 2.0 * oracle_normalized_mse(adapted, [instructive[k] for k in ("p3", "p4")])
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss_fn.adapter.parameters())
    assert all(x.grad is None for x in instructive.values())
    assert all((x.grad is None) == warmup for x in student.values())


def test_distillation_loss_backends_agree():
    if "cpu" not in lgd_ops.available_backends():
        pytest.skip("lgd_ops CPU kernels not built")
    student, instructive = make_features(2), make_features(2, seed=9)
    ref = DistillationLoss(backend="reference").double()
    cpu = DistillationLoss(backend="cpu").double()
    cpu.load_state_dict(ref.state_dict())
    torch.testing.assert_close(cpu(student, instructive), ref(student, instructive), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

def _bad_cases():
    labels = make_labels([2, 1])
    plain = make_labels([2, 1], context=False)
    feats = make_features(2)
    teacher = LGDTeacher(5).double()
    boxes, classes = random_lists([2, 1])
    return {
        "wrong channels": (lambda: teacher([torch.zeros(2, 128, 4, 4, dtype=torch.float64)], labels),
                           "must have 256 channels"),
        "batch mismatch": (lambda: teacher(make_features(3), labels), "batch size 2"),
        "class out of range": (lambda: LGDTeacher(3).double()(feats, make_labels([2, 1], num_classes=5, seed=3)),
                               "classes must be in [0, 3)"),
        "negative class": (lambda: PackedLabels.from_lists(boxes, [classes[0], torch.tensor([-3])], IMAGE,
                                                           context=True), "classes must be >= 0"),
        "float classes": (lambda: PackedLabels.from_lists(boxes, [c.double() for c in classes], IMAGE,
                                                          context=True), "integer"),
        "nan box": (lambda: PackedLabels.from_lists([boxes[0] * float("nan"), boxes[1]], classes, IMAGE,
                                                    context=True), "NaN"),
        "bad image size": (lambda: PackedLabels.from_lists(boxes, classes, (0, 64), context=True), "image_size"),
        "list lengths": (lambda: PackedLabels.from_lists(boxes, classes[:1], IMAGE, context=True), "one entry"),
        "unsorted batch_idx": (lambda: PackedLabels(labels.boxes, labels.classes, labels.batch_idx.flip(0), 2,
                                                    IMAGE, True), "non-decreasing"),
        "context not last": (lambda: PackedLabels(labels.boxes, labels.classes.roll(1), labels.batch_idx, 2,
                                                  IMAGE, True), "context"),
        "context mismatch": (lambda: teacher(feats, plain), "context"),
        "masks missing": (lambda: LGDTeacher(5, use_masks=True).double()(feats, labels), "masks"),
        "instances need size": (lambda: teacher(feats, [Instances(IMAGE)] * 2), "image_size"),
        "loss keys": (lambda: DistillationLoss().double()({"p3": feats[0]}, {"p4": feats[0]}), "same keys"),
        "loss levels": (lambda: DistillationLoss().double()(feats, feats[:2]), "levels"),
        "not features": (lambda: teacher(feats[0], labels), "dict or list"),
        "heads": (lambda: RelationAdapter(250, 8), "divisible"),
        "zero classes": (lambda: LabelEncoder(0), "num_classes"),
        "stn pool": (lambda: LabelEncoder(5, stn_pool="cloud"), "pool"),
    }


BAD_CASES = ("wrong channels", "batch mismatch", "class out of range", "negative class", "float classes", "nan box",
             "bad image size", "list lengths", "unsorted batch_idx", "context not last", "context mismatch",
             "masks missing", "instances need size", "loss keys", "loss levels", "not features", "heads",
             "zero classes", "stn pool")


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_raises_value_error(case):
    cases = _bad_cases()
    assert set(cases) == set(BAD_CASES)
    fn, message = cases[case]
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        fn()


def test_public_api():
    assert CONTEXT_CLASS == -1
    assert set(lgd.__all__) >= {"LGDTeacher", "LabelEncoder", "AppearanceEncoder", "RelationAdapter",
                                "KnowledgeMapper", "StudentAdapter", "DistillationLoss", "PackedLabels"}
