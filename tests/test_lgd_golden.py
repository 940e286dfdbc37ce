"""Golden test of the whole LGD teacher + distillation loss against a float64 transcription of docs/method.md §1-7.

The transcription below shares no code with lgd/ or lgd_ops/: it reads the raw per-image boxes and classes,
clamps them, builds every box mask with Python loops over the level grid (§1), and runs the method one image
and one object at a time with plain tensor math (F.conv2d / matmuls): descriptors and the PointNet label
encoder with a per-object STN (each object its own d x d matrix, applied as row vector x times T, nothing
added, §5), LayerNorm / GroupNorm / InstanceNorm written out, the appearance mean over the box (§2), the
multi-head attention written from its q/k/v projections with the softmax spelled out, per image, no residual
(§6), the knowledge mapper's plain-sum fill, G, context term, ReLU and F_ref (§3, §7), the student adapter
and the normalized MSE over all levels at once (§4).
Only the weights are shared: our modules get random weights (std 1.2/sqrt(fan_in), biases std 0.2; the
STNs' last layers too, so no transform is the identity), and the transcription reads clones of them by name.
Compared: X^I per level, the loss, and gradients (of sum_l <X^I_l, R_l> w.r.t. the student features, every
teacher parameter and the label / appearance / relation embeddings; of the loss w.r.t. the student features
and the adapter), all in float64, with backend "reference" and the default "auto" (the compiled kernels).
test_golden_detects_mutations shows the comparison can fail: each spec deviation planted in the transcription
(image-level STN, T x instead of x T, no context term, ...) moves X^I or the loss by >= 1e-3.
"""
import inspect
import math

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

from lgd.modeling.distillation_loss import DistillationLoss  # noqa: E402
from lgd.modeling.labels import PackedLabels  # noqa: E402
from lgd.modeling.teacher import LGDTeacher  # noqa: E402

EPS = 1e-5  # LayerNorm, GroupNorm and InstanceNorm eps (PyTorch's default; docs/method.md §4 for the loss)
TOL = 1e-6  # on O(1) values; a gradient is compared relative to its largest entry
K = 5

# (H_in, W_in) and levels (strides 8..128; 2 x 3 and 1 x 2 are the ceil'd odd ones)
IMAGE = (128, 160)
LEVELS = ((16, 20), (8, 10), (4, 5), (2, 3), (1, 2))
# image 0: the hard boxes; image 1: a single object
BOXES = [
    [
        (0.0, 0.0, 40.0, 30.0),  # on the top-left image edges
        (120.0, 100.0, 160.0, 128.0),  # on the bottom-right edges: x2, y2 clamp to W_in-1, H_in-1
        (-20.0, 50.0, 60.0, 200.0),  # past the image: clamped
        (32.0, 32.0, 96.0, 96.0),  # exactly on grid lines of the stride 8/16/32/64 levels
        (16.0, 24.0, 96.0, 64.0),  # on grid lines of the finest levels, overlapping the two above
        (47.0, 63.0, 50.0, 66.0),  # tiny: one cell on strides 8 and 16, none on coarser levels
        (70.0, 20.0, 70.0, 50.0),  # degenerate: x2 == x1
        (90.0, 60.0, 80.0, 90.0),  # degenerate: x2 < x1
        (170.0, 10.0, 200.0, 40.0),  # wholly past the right edge: clamps to x1 == x2, covers nothing
    ],
    [(10.5, 20.25, 150.75, 100.5)],
]
CLASSES = [[0, 3, 1, 4, 0, 2, 1, 3, 2], [3]]
# the real width: 256 channels, 8 heads, small maps
IMAGE_FULL = (64, 80)
LEVELS_FULL = ((8, 10), (4, 5), (2, 3))
BOXES_FULL = [
    [(0.0, 0.0, 20.0, 15.0), (60.0, 50.0, 80.0, 64.0), (-10.0, 25.0, 30.0, 100.0), (16.0, 16.0, 48.0, 48.0),
     (23.0, 31.0, 25.0, 33.0), (35.0, 10.0, 35.0, 25.0)],
    [(5.25, 10.5, 75.5, 50.25)],
]
CLASSES_FULL = [[0, 3, 1, 4, 2, 1], [3]]


# ----------------------------------------------------------------------------------------------
# The transcription (float64, from docs/method.md §1-7)
# ----------------------------------------------------------------------------------------------

def clamp_box(box, image_size, mutation=None):
    """§1: clamp to [0, W_in-1] x [0, H_in-1]."""
    in_h, in_w = image_size
    if mutation == "clamp_to_size":
        in_h, in_w = in_h + 1, in_w + 1
    x1, y1, x2, y2 = (float(v) for v in box)
    return (min(max(x1, 0.0), in_w - 1.0), min(max(y1, 0.0), in_h - 1.0),
            min(max(x2, 0.0), in_w - 1.0), min(max(y2, 0.0), in_h - 1.0))


def box_mask(box, image_size, height, width, mutation=None):
    """§1: [H_l, W_l] 0/1 mask of a clamped box, one comparison per row and per column of the grid."""
    in_h, in_w = image_size
    x1, y1, x2, y2 = box
    mask = torch.zeros(height, width, dtype=torch.float64)
    if x2 <= x1 or y2 <= y1:
        return mask
    rx, ry = width / in_w, height / in_h
    off = 0.5 if mutation == "half_pixel_offset" else 0.0
    for j in range(height):
        for i in range(width):
            if mutation == "exclusive_upper":
                inside = x1 * rx <= i < x2 * rx and y1 * ry <= j < y2 * ry
            else:
                inside = x1 * rx <= i + off <= x2 * rx and y1 * ry <= j + off <= y2 * ry
            if inside:
                mask[j, i] = 1.0
    return mask


def layer_norm(x):
    """LayerNorm over the last axis, no affine."""
    mean = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / x.shape[-1]
    return (x - mean) / torch.sqrt(var + EPS)


def plane_norm(x, dims):
    """(x - mean) / sqrt(biased var + eps) over `dims` (GroupNorm(1): (C, H, W); InstanceNorm: (H, W))."""
    count = 1
    for d in dims:
        count *= x.shape[d]
    mean = x.sum(dim=dims, keepdim=True) / count
    var = ((x - mean) ** 2).sum(dim=dims, keepdim=True) / count
    return (x - mean) / torch.sqrt(var + EPS)


def linear(x, p, name):
    return x @ p[name + ".weight"].t() + p[name + ".bias"]


def lin_ln_relu(x, p, name):
    return torch.relu(layer_norm(linear(x, p, name)))


def conv3(x, p, name):
    return F.conv2d(x, p[name + ".weight"], p[name + ".bias"], padding=1)


def descriptors(boxes, classes, image_size, num_classes, context, mutation=None):
    """§5: [clamped box / (W_in, H_in, W_in, H_in), one-hot class] -> 2x - 1; the context object last."""
    in_h, in_w = image_size
    rows = []
    for box, cls in zip(boxes, classes):
        x1, y1, x2, y2 = clamp_box(box, image_size, mutation)
        one_hot = [1.0 if k == cls else 0.0 for k in range(num_classes)]
        rows.append([x1 / in_w, y1 / in_h, x2 / in_w, y2 / in_h] + one_hot)
    if context:
        x1, y1, x2, y2 = clamp_box((0.0, 0.0, in_w, in_h), image_size, mutation)
        rows.append([x1 / in_w, y1 / in_h, x2 / in_w, y2 / in_h] + [0.0] * num_classes)
    return torch.tensor(rows, dtype=torch.float64) * 2 - 1


def stn(points, p, prefix, mutation=None):
    """STN(d) on one image's points [n, d]: each object alone (a one-point set, so the max is over one point)
    predicts its own d x d matrix T; the point becomes the row vector x times T."""
    d = points.shape[1]

    def matrix(pooled):
        h = lin_ln_relu(lin_ln_relu(pooled, p, prefix + ".head.0.0"), p, prefix + ".head.1.0")
        t = linear(h, p, prefix + ".matrix").reshape(d, d)  # row-major, as .view(d, d)
        return t + torch.eye(d, dtype=t.dtype) if mutation == "stn_identity_added" else t

    def point_feats(x):  # [m, d] -> [m, 1024]
        for layer in range(3):
            x = lin_ln_relu(x, p, f"{prefix}.points.{layer}.0")
        return x

    if mutation == "stn_image_pool":
        shared = matrix(point_feats(points).max(dim=0).values)
        transforms = [shared] * len(points)
    else:
        transforms = [matrix(point_feats(points[o:o + 1]).max(dim=0).values) for o in range(len(points))]
    out = []
    for x, t in zip(points, transforms):
        if mutation == "stn_T_times_x":
            out.append((t * x[None, :]).sum(1))
        else:
            out.append((x[:, None] * t).sum(0))  # out[j] = sum_i x[i] T[i, j]
    return torch.stack(out)


def label_encoder(descs, p, mutation=None):
    """§5: per-image descriptors [n_b, k] -> label embeddings [N, C], image after image."""
    pre = "label_encoder"
    locals_, lifted = [], []
    for desc in descs:
        x = stn(desc, p, pre + ".input_transform", mutation)
        x = lin_ln_relu(x, p, pre + ".embed.0")
        locals_.append(stn(x, p, pre + ".feature_transform", mutation))
        lifted.append(lin_ln_relu(lin_ln_relu(locals_[-1], p, pre + ".lift.0.0"), p, pre + ".lift.1.0"))
    out = []
    for local, lift in zip(locals_, lifted):
        global_ = lift.max(dim=0).values  # over the objects of this image
        if mutation == "global_max_over_batch":
            global_ = torch.cat(lifted).max(dim=0).values
        fused = torch.cat([local, global_[None].expand(len(local), -1)], dim=1)
        out.append(lin_ln_relu(lin_ln_relu(fused, p, pre + ".fuse.0.0"), p, pre + ".fuse.1.0"))
    return torch.cat(out)


def attention(query, key, p, num_heads, mutation=None):
    """§6: multi-head attention of one image, query = appearance [n, C], key = value = label embeddings."""
    c = query.shape[1]
    w, b = p["relation_adapter.attention.in_proj_weight"], p["relation_adapter.attention.in_proj_bias"]
    q = query @ w[:c].t() + b[:c]
    k = key @ w[c:2 * c].t() + b[c:2 * c]
    v = key @ w[2 * c:].t() + b[2 * c:]
    dh = c // num_heads
    heads = []
    for h in range(num_heads):
        s = slice(h * dh, (h + 1) * dh)
        scores = (q[:, s] @ k[:, s].t()) / math.sqrt(dh)
        e = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
        heads.append((e / e.sum(dim=1, keepdim=True)) @ v[:, s])
    out = linear(torch.cat(heads, dim=1), p, "relation_adapter.attention.out_proj")
    return out + query if mutation == "attention_residual" else out


def transcription(features, boxes, classes, image_size, p, *, num_classes, num_heads, context, mutation=None):
    """X^I per level [B, C, H_l, W_l] and the packed intermediates (image after image, context last):
    label embeddings [N, C], appearance and relation embeddings per level [N, C]."""
    num_images = features[0].shape[0]
    clamped = [[clamp_box(box, image_size, mutation) for box in boxes[b]] for b in range(num_images)]
    if context:
        whole = clamp_box((0.0, 0.0, image_size[1], image_size[0]), image_size, mutation)
        clamped = [objs + [whole] for objs in clamped]
    # packed [N, C] tensors (image after image) that every later step slices, so their gradients can be compared
    labels = label_encoder([descriptors(boxes[b], classes[b], image_size, num_classes, context, mutation)
                            for b in range(num_images)], p, mutation)
    starts = [sum(len(objs) for objs in clamped[:b]) for b in range(num_images + 1)]
    appearance, relations, instructive = [], [], []
    for x in features:
        height, width = x.shape[-2:]
        projected = torch.relu(plane_norm(conv3(x, p, "appearance_encoder.proj.0"), (1, 2, 3)))
        masks = [[box_mask(box, image_size, height, width, mutation) for box in clamped[b]] for b in range(num_images)]
        a = torch.stack([(projected[b] * m).sum(dim=(1, 2)) / max(float(m.sum()), 1.0)
                         for b in range(num_images) for m in masks[b]])
        keys = [labels if mutation == "attention_across_images" else labels[starts[b]:starts[b + 1]]
                for b in range(num_images)]
        e = torch.cat([attention(a[starts[b]:starts[b + 1]], keys[b], p, num_heads, mutation)
                       for b in range(num_images)])
        maps = []
        for b in range(num_images):
            e_b = e[starts[b]:starts[b + 1]]
            real = len(boxes[b])  # objects before the context object
            filled = torch.zeros(x.shape[1], height, width, dtype=torch.float64)
            for o in range(len(masks[b]) if mutation == "context_filled" else real):
                weight = 1.0 / max(float(masks[b][o].sum()), 1.0) if mutation == "fill_mean" else 1.0
                value = linear(e_b[o], p, "knowledge_mapper.instance_proj")
                filled = filled + masks[b][o][None] * value[:, None, None] * weight
            y = conv3(filled[None], p, "knowledge_mapper.spatial")[0]
            if context and mutation != "no_context_term":
                y = y + linear(e_b[real], p, "knowledge_mapper.context_proj")[:, None, None]
            y = torch.relu(y)[None]
            y = torch.relu(plane_norm(conv3(y, p, "knowledge_mapper.refine.0"), (1, 2, 3)))
            y = torch.relu(plane_norm(conv3(y, p, "knowledge_mapper.refine.3"), (1, 2, 3)))
            y = plane_norm(conv3(y, p, "knowledge_mapper.refine.6"), (1, 2, 3))
            maps.append(y[0])
        appearance.append(a)
        relations.append(e)
        instructive.append(torch.stack(maps))
    return instructive, labels, appearance, relations


def distillation(students, instructive, p, mutation=None):
    """§4: IN(adapter(X_l)) vs IN(X^I_l) detached, squared differences summed over all levels / (B sum C H W)."""
    total, count = 0.0, 0
    per_level = []
    for x, t in zip(students, instructive):
        s = conv3(torch.relu(conv3(torch.relu(conv3(x, p, "adapter.layers.0")), p, "adapter.layers.2")), p,
                  "adapter.layers.4")
        if mutation == "unbiased_variance":
            n = s.shape[2] * s.shape[3]
            def norm(y):  # noqa: E306
                mean = y.mean(dim=(2, 3), keepdim=True)
                return (y - mean) / torch.sqrt(((y - mean) ** 2).sum(dim=(2, 3), keepdim=True) / max(n - 1, 1) + EPS)
        else:
            def norm(y):  # noqa: E306
                return plane_norm(y, (2, 3))
        sq = ((norm(s) - norm(t.detach())) ** 2).sum()
        per_level.append(sq / s.numel())
        total = total + sq
        count += s.numel()
    if mutation == "mean_of_level_means":
        return sum(per_level) / len(per_level)
    return total / count


# ----------------------------------------------------------------------------------------------
# Our modules, random weights, shared inputs
# ----------------------------------------------------------------------------------------------

def randomize(module, generator):
    """Every parameter random: weights std 1.2/sqrt(fan_in), biases std 0.2 (no identity STN, no zero bias)."""
    with torch.no_grad():
        for _, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            scale = 1.2 / math.sqrt(param[0].numel()) if param.dim() > 1 else 0.2
            param.copy_(noise * scale)


def build(channels, num_heads, context, backend, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = LGDTeacher(K, channels=channels, num_heads=num_heads, use_context=context, backend=backend).double()
    loss = DistillationLoss(channels, backend=backend).double()
    randomize(teacher, g)
    randomize(loss, g)
    return teacher, loss


def targets(boxes, classes, image_size, context, instances=False):
    """The labels as our teacher takes them: PackedLabels of float64 boxes or, with instances=True, detectron2
    Instances (whose Boxes are always float32, so our descriptors are then float32-rounded: ~1e-7 off)."""
    if not instances:
        return PackedLabels.from_lists([torch.tensor(bx, dtype=torch.float64).reshape(-1, 4) for bx in boxes],
                                       [torch.tensor(cl, dtype=torch.int64) for cl in classes], image_size,
                                       context=context)
    out = []
    for bx, cl in zip(boxes, classes):
        inst = Instances(image_size)
        inst.gt_boxes = Boxes(torch.tensor(bx, dtype=torch.float64).reshape(-1, 4))
        inst.gt_classes = torch.tensor(cl, dtype=torch.int64)
        out.append(inst)
    return out


def features(channels, levels, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(len(BOXES), channels, h, w, generator=g, dtype=torch.float64) for h, w in levels]


def cloned_params(teacher, loss):
    """name -> fresh float64 leaf: the teacher's names as they are, the adapter's as "adapter.*"."""
    named = dict(teacher.named_parameters())
    named.update(loss.named_parameters())  # adapter.layers.*
    return {k: v.detach().clone().requires_grad_(True) for k, v in named.items()}


def compare(name, got, expected, diffs):
    """Max abs difference, recorded; fails above TOL times the expected tensor's largest magnitude (at least 1
    for values, at least 1e-6 for gradients, which are compared relative to their own scale)."""
    assert got is not None, f"{name}: no gradient"
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(expected.shape)}"
    diff = float((got.detach() - expected.detach()).abs().max()) if got.numel() else 0.0
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    diffs[name] = (diff, scale)
    limit = TOL * max(scale, 1e-6) if name.startswith("grad") else TOL * max(scale, 1.0)
    assert diff <= limit, f"{name}: max abs diff {diff:.3e} > {limit:.3e} (largest expected {scale:.3e})"


def run_ours(teacher, loss, feats, tgts, image_size, reference_r):
    """Our X^I, loss, and the gradients (w.r.t. features, params, embeddings) of sum <X^I, R> and of the loss."""
    captured = {}
    hooks = [
        teacher.label_encoder.register_forward_hook(lambda m, i, o: captured.__setitem__("labels", o)),
        teacher.appearance_encoder.register_forward_hook(lambda m, i, o: captured.__setitem__("appearance", o)),
        teacher.relation_adapter.register_forward_hook(lambda m, i, o: captured.__setitem__("relations", o)),
    ]
    try:
        feats = [f.detach().clone().requires_grad_(True) for f in feats]
        xi = teacher(feats, tgts, image_size)
    finally:
        for h in hooks:
            h.remove()
    value = sum((x * r).sum() for x, r in zip(xi, reference_r))
    t_params = list(teacher.named_parameters())
    inter = [captured["labels"], *captured["appearance"], *captured["relations"]]
    grads = torch.autograd.grad(value, feats + [p for _, p in t_params] + inter)
    n_f, n_p = len(feats), len(t_params)
    out = {
        "xi": xi,
        "grad_teacher_feat": grads[:n_f],
        "grad_teacher_param": dict(zip([k for k, _ in t_params], grads[n_f:n_f + n_p])),
        "grad_labels": grads[n_f + n_p],
        "grad_appearance": grads[n_f + n_p + 1:n_f + n_p + 1 + len(feats)],
        "grad_relations": grads[n_f + n_p + 1 + len(feats):],
    }
    # the loss, with X^I as leaves: the loss must not reach them (teacher side detached, docs/method.md §4)
    xi_leaves = [x.detach().clone().requires_grad_(True) for x in xi]
    students = [f.detach().clone().requires_grad_(True) for f in feats]
    dl = loss(students, xi_leaves)
    a_params = list(loss.adapter.named_parameters())
    grads = torch.autograd.grad(dl, students + [p for _, p in a_params] + xi_leaves, allow_unused=True)
    out["loss"] = dl
    out["grad_loss_feat"] = grads[:len(students)]
    out["grad_loss_param"] = dict(zip(["adapter." + k for k, _ in a_params], grads[len(students):-len(xi)]))
    out["grad_loss_xi"] = grads[-len(xi):]
    return out


def run_transcription(p, feats, boxes, classes, image_size, reference_r, *, num_heads, context, mutation=None):
    feats = [f.detach().clone().requires_grad_(True) for f in feats]
    xi, labels, appearance, relations = transcription(feats, boxes, classes, image_size, p, num_classes=K,
                                                      num_heads=num_heads, context=context, mutation=mutation)
    value = sum((x * r).sum() for x, r in zip(xi, reference_r))
    t_names = [k for k in p if not k.startswith("adapter.")]
    inter = [labels, *appearance, *relations]
    wrt = feats + [p[k] for k in t_names] + inter
    grads = [torch.zeros_like(x) if g is None else g  # unused: zero
             for x, g in zip(wrt, torch.autograd.grad(value, wrt, allow_unused=True))]
    n_f, n_p = len(feats), len(t_names)
    out = {
        "xi": xi,
        "grad_teacher_feat": grads[:n_f],
        "grad_teacher_param": dict(zip(t_names, grads[n_f:n_f + n_p])),
        "grad_labels": grads[n_f + n_p],
        "grad_appearance": grads[n_f + n_p + 1:n_f + n_p + 1 + len(feats)],
        "grad_relations": grads[n_f + n_p + 1 + len(feats):],
    }
    students = [f.detach().clone().requires_grad_(True) for f in feats]
    a_names = [k for k in p if k.startswith("adapter.")]
    dl = distillation(students, [x.detach() for x in xi], p, mutation)
    grads = torch.autograd.grad(dl, students + [p[k] for k in a_names])
    out["loss"] = dl
    out["grad_loss_feat"] = grads[:len(students)]
    out["grad_loss_param"] = dict(zip(a_names, grads[len(students):]))
    return out


def golden(channels, num_heads, context, backend, image_size, levels, boxes, classes, instances=False):
    teacher, loss = build(channels, num_heads, context, backend)
    feats = features(channels, levels)
    g = torch.Generator().manual_seed(2)
    reference_r = [torch.randn(len(boxes), channels, h, w, generator=g, dtype=torch.float64) for h, w in levels]
    ours = run_ours(teacher, loss, feats, targets(boxes, classes, image_size, context, instances), image_size,
                    reference_r)
    p = cloned_params(teacher, loss)
    assert set(p) == {k for k, _ in teacher.named_parameters()} | {"adapter." + k for k, _ in
                                                                   loss.adapter.named_parameters()}
    ref = run_transcription(p, feats, boxes, classes, image_size, reference_r, num_heads=num_heads, context=context)
    diffs = {}
    for key in ("xi", "grad_teacher_feat", "grad_appearance", "grad_relations", "grad_loss_feat"):
        assert len(ours[key]) == len(ref[key]) == len(levels), key
    for l, (a, b) in enumerate(zip(ours["xi"], ref["xi"])):
        compare(f"xi[{l}]", a, b, diffs)
    compare("loss", ours["loss"], ref["loss"], diffs)
    for key in ("grad_teacher_feat", "grad_appearance", "grad_relations", "grad_loss_feat"):
        for l, (a, b) in enumerate(zip(ours[key], ref[key])):
            compare(f"{key}[{l}]", a, b, diffs)
    compare("grad_labels", ours["grad_labels"], ref["grad_labels"], diffs)
    for key in ("grad_teacher_param", "grad_loss_param"):
        assert set(ours[key]) == set(ref[key])
        for name in ours[key]:
            compare(f"{key}[{name}]", ours[key][name], ref[key][name], diffs)
    assert all(g is None or not bool(g.any()) for g in ours["grad_loss_xi"]), "the loss reached X^I"
    assert float(ours["loss"].detach()) > 0.1  # not trivially matched
    worst = {}
    for name, (diff, scale) in diffs.items():
        group = name.split("[")[0]
        worst[group] = max(worst.get(group, (0.0, 0.0)), (diff, scale))
    print(f"\ngolden C={channels} heads={num_heads} context={context} backend={backend} instances={instances}: "
          + ", ".join(f"{k} {d:.1e} (of {s:.1e})" for k, (d, s) in worst.items()))


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("context", [True, False], ids=["context", "no_context"])
def test_golden_teacher_and_loss(context, backend):
    golden(32, 4, context, backend, IMAGE, LEVELS, BOXES, CLASSES)


def test_golden_full_width():
    """The real width: 256 channels, 8 heads, on small maps."""
    golden(256, 8, True, "auto", IMAGE_FULL, LEVELS_FULL, BOXES_FULL, CLASSES_FULL)


def test_golden_from_instances():
    """The detectron2 path: Instances targets (float32 Boxes, so ~1e-7 from the float64 transcription)."""
    golden(32, 4, True, "auto", IMAGE, LEVELS, BOXES, CLASSES, instances=True)


def test_box_masks_of_the_cases():
    """The inputs hit what they claim: the tiny box covers cells only on strides 8 and 16, degenerate and
    outside boxes cover nothing, edge boxes reach the last row/column."""
    covered = [[int(box_mask(clamp_box(box, IMAGE), IMAGE, h, w).sum()) for h, w in LEVELS] for box in BOXES[0]]
    assert covered[5] == [1, 1, 0, 0, 0]
    assert covered[6] == covered[7] == covered[8] == [0] * 5
    assert box_mask(clamp_box(BOXES[0][1], IMAGE), IMAGE, 16, 20)[-1, -1] == 1


MUTATIONS = ["stn_image_pool", "stn_identity_added", "stn_T_times_x", "no_context_term", "attention_residual",
             "attention_across_images", "fill_mean", "half_pixel_offset", "unbiased_variance", "mean_of_level_means",
             "clamp_to_size", "context_filled", "global_max_over_batch", "exclusive_upper"]


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_golden_detects_mutations(mutation):
    """Each deliberate deviation from the spec in the transcription makes it disagree with our modules
    (X^I or the loss) far beyond the tolerance: the golden comparison can fail."""
    teacher, loss = build(32, 4, True, "reference")
    feats = features(32, LEVELS)
    with torch.no_grad():
        ours_xi = teacher(feats, targets(BOXES, CLASSES, IMAGE, True), IMAGE)
        ours_loss = loss(feats, ours_xi)
        p = cloned_params(teacher, loss)
        xi, _, _, _ = transcription(feats, BOXES, CLASSES, IMAGE, p, num_classes=K, num_heads=4, context=True,
                                    mutation=mutation)
        dl = distillation(feats, xi, p, mutation)
    diff = max([float((a - b).abs().max()) for a, b in zip(ours_xi, xi)] + [abs(float(ours_loss - dl))])
    assert diff > 1e3 * TOL, f"{mutation}: max diff {diff:.2e}"


def test_default_stn_pool_is_per_object():
    assert inspect.signature(LGDTeacher).parameters["stn_pool"].default == "object"
    teacher = LGDTeacher(K, channels=32, num_heads=4)
    assert teacher.label_encoder.input_transform.pool == "object"
    assert teacher.label_encoder.feature_transform.pool == "object"


def test_parameter_count_coco():
    """K=80, 256 channels, context on, no masks: teacher 8,304,336 + student adapter 1,770,240."""
    teacher = LGDTeacher(80)
    adapter = DistillationLoss(256).adapter
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_adapter = sum(p.numel() for p in adapter.parameters())
    assert (n_teacher, n_adapter, n_teacher + n_adapter) == (8_304_336, 1_770_240, 10_074_576)
