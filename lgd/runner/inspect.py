"""LGD at work on one annotated image (lgd-inspect): the numbers behind the page lgd.runner.inspect_page draws.

One training forward of a run's LGDDistiller (no gradient) on the image, mapped as the test loader maps it but
with its ground truth kept, and the model's own modules read through forward hooks, so nothing of the method is
computed a second time here: the teacher's output X^I and its PackedLabels, the student adapter's F_adapt(X_l),
and the relation adapter's attention weights. For these its nn.MultiheadAttention is called with
need_weights=True and average_attn_weights=True (a forward pre-hook sets them: the same attention, which then
also returns its weights averaged over the heads). The per-cell error is the summand of normalized_mse
(docs/method.md §4): Σ_c (IN(F_adapt(X_l)) − IN(X^I_l))², whose sum over every level, divided by Σ_l C·H_l·W_l
and times the loss weight, is the step's loss_distill (kept beside it to check).
"""
import copy
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import convert_image_to_rgb
from detectron2.utils.events import EventStorage

import lgd_ops
from lgd_ops.normalized_mse import _instance_norm as instance_norm  # the op's own IN (1x1 maps included)

from ..engine.checkpoint import AtomicCheckpointer, atomic_write, read_checkpoint
from ..errors import CommandError, UsageError
from ..methods import build_method
from ..modeling.labels import CONTEXT_CLASS
from .build import build_model

__all__ = ["inspect_image", "save_inspection"]

INSTRUCTIVE_PREFIX = "teacher."


def _check_checkpoint(path: str):
    if "://" in path:
        return
    state = read_checkpoint(path).get("model")
    if isinstance(state, dict) and not any(k.startswith(INSTRUCTIVE_PREFIX) for k in state):
        raise CommandError(f"checkpoint {path} holds no instructive modules (a student only: lgd-export's file or "
                           "a plain detectron2 checkpoint); lgd-inspect needs a run's checkpoint with them",
                           hint="pass OUTPUT/model_final.pth (or another model_*.pth) of an lgd.method=lgd run")


def _record(dataset: str, image_id):
    if dataset not in DatasetCatalog.list():
        raise CommandError(f"dataset {dataset!r} is not registered",
                           hint="name one of the config's, a detectron2 builtin, or register a COCO json with "
                                "--dataset NAME=ann.json:images/")
    dicts = DatasetCatalog.get(dataset)
    found = [d for d in dicts if str(d.get("image_id")) == str(image_id)]
    if not found:
        ids = [d.get("image_id") for d in dicts]
        raise CommandError(f"image id {image_id} is not in dataset {dataset} ({len(ids)} images, ids "
                           f"{ids[0]}..{ids[-1]})" if ids else f"dataset {dataset} has no images")
    if not found[0].get("annotations"):
        raise CommandError(f"image {image_id} of {dataset} has no ground-truth objects: LGD has nothing to encode")
    return found[0]


def _mapper(cfg, use_masks: bool):
    """The test loader's mapper (its resizing, its image format), keeping the ground truth."""
    mapper = copy.deepcopy(cfg.dataloader.test.mapper)
    mapper.is_train = True
    if use_masks:
        mapper.use_instance_mask = True
    return instantiate(mapper)


class _Recorder:
    """Forward hooks on an LGDDistiller's teacher, student adapter and relation attention."""

    def __init__(self, model):
        self.adapted, self.attention, self.handles = [], None, []
        self.handles += [
            model.teacher.register_forward_hook(self._teacher),
            model.distill_loss.adapter.register_forward_hook(lambda m, args, out: self.adapted.append(out)),
        ]
        adapter = model.teacher.relation_adapter  # None for the fill interactions: no attention to record
        if adapter is not None:
            self.handles += [adapter.attention.register_forward_pre_hook(self._want_weights, with_kwargs=True),
                             adapter.attention.register_forward_hook(self._weights)]

    def _teacher(self, module, args, out):
        self.features, self.labels, self.instructive = args[0], args[1], out

    @staticmethod
    def _want_weights(module, args, kwargs):
        return args, dict(kwargs, need_weights=True, average_attn_weights=True)

    def _weights(self, module, args, out):
        self.attention = out[1]

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _covered_cells(labels, size) -> int:
    """Cells of a level of `size` covered by at least one (non-context) object box (docs/method.md §1)."""
    inst = labels.object_index(context=False)
    ones = labels.boxes.new_ones(len(inst), 1)
    painted = lgd_ops.box_fill(ones, labels.boxes[inst], labels.batch_idx[inst], labels.image_size, (1, *size))
    return int((painted > 0).sum())


def _pca_rgb(student: torch.Tensor, instructive: torch.Tensor, rows: int, cols: int):
    """One PCA basis (3 components) of both [C, H, W] maps' cells inside the image (rows x cols), both maps
    projected on it and scaled to [0, 1] by the same 2nd-98th percentiles: ([H, W, 3] x 2, components, mean)."""
    inside = torch.cat([x[:, :rows, :cols].reshape(x.shape[0], -1).T for x in (student, instructive)]).double()
    mean = inside.mean(0)
    _, _, vh = torch.linalg.svd(inside - mean, full_matrices=False)
    basis = vh[:3]
    projected = [torch.einsum("kc,chw->hwk", basis, x.double() - mean[:, None, None]) for x in (student, instructive)]
    inner = torch.cat([p[:rows, :cols].reshape(-1, basis.shape[0]) for p in projected])
    low, high = torch.quantile(inner, 0.02, dim=0), torch.quantile(inner, 0.98, dim=0)
    rgb = [((p - low) / (high - low).clamp_min(1e-12)).clamp(0, 1) for p in projected]
    if basis.shape[0] < 3:  # fewer than 3 channels or cells: the missing colours stay dark
        rgb = [F.pad(x, (0, 3 - basis.shape[0])) for x in rgb]
    return [x.float().numpy() for x in rgb], basis.float().numpy(), mean.float().numpy()


def inspect_image(cfg, checkpoint: str, dataset: str, image_id, level: Optional[str] = None) -> Dict:
    """The numbers of lgd-inspect's page for image `image_id` of `dataset`, at pyramid `level` (default: the
    distilled level with the most cells inside object boxes): a dict of numpy arrays and scalars (see the keys;
    maps are [C, H_l, W_l] or [H_l, W_l] on the level's grid of the padded input, boxes in input pixels, the
    objects in PackedLabels order, the context object last where it is on)."""
    method = build_method(cfg)
    if method.name != "lgd":
        raise UsageError(f"lgd-inspect draws LGD's instructive knowledge; the config's lgd.method is {method.name}")
    _check_checkpoint(checkpoint)
    record = _record(dataset, image_id)  # before the model: a wrong id or dataset fails fast
    model = build_model(cfg, method)
    AtomicCheckpointer(model).load_checked(checkpoint)
    mapped = _mapper(cfg, model.teacher.use_masks)(record)
    recorder = _Recorder(model)
    try:
        with EventStorage(0), torch.no_grad():
            losses = model.train().training_losses([mapped])
    finally:
        recorder.remove()
        model.eval()
    keys, labels = list(recorder.instructive), recorder.labels.to("cpu")
    sizes = [tuple(recorder.instructive[k].shape[-2:]) for k in keys]
    covered = [_covered_cells(labels, s) for s in sizes]
    if level is None:
        level = keys[int(np.argmax(covered))]
    elif level not in keys:
        raise UsageError(f"--level {level}: the distilled levels are {', '.join(keys)}")
    index = keys.index(level)
    eps = model.distill_loss.eps
    errors = []
    for adapted, key in zip(recorder.adapted, keys):
        s, t = (instance_norm(x.float(), eps)[0] for x in (adapted, recorder.instructive[key]))
        errors.append(((s - t) ** 2).sum(0).cpu())
    student, instructive = recorder.adapted[index][0].float().cpu(), recorder.instructive[level][0].float().cpu()
    height, width = mapped["image"].shape[-2:]
    (in_h, in_w), (lh, lw) = labels.image_size, sizes[index]
    rows, cols = min(lh, -(-height * lh // in_h)), min(lw, -(-width * lw // in_w))  # cells over the image
    s_norm, t_norm = (instance_norm(x[None], eps)[0] for x in (student, instructive))
    (student_rgb, instructive_rgb), components, mean = _pca_rgb(s_norm, t_norm, rows, cols)
    if recorder.attention is None:  # lgd.interaction student_fill / teacher_fill
        attention, query = np.zeros((0, 0), dtype=np.float32), ""
    else:
        weights = recorder.attention.float().cpu().view(len(keys), labels.num_images, *recorder.attention.shape[1:])
        attention, query = weights[index, 0].numpy(), model.teacher.relation_adapter.query
    image_format = str(cfg.dataloader.test.mapper.get("image_format", "BGR"))
    classes = labels.classes.numpy()
    names = MetadataCatalog.get(dataset).get("thing_classes", None) or []
    return {
        "dataset": dataset, "image_id": str(image_id), "file_name": record["file_name"], "level": level,
        "levels": np.array(keys), "level_covered_cells": np.array(covered),
        "image": convert_image_to_rgb(mapped["image"].permute(1, 2, 0).numpy(), image_format),
        "image_size": np.array([height, width]), "padded_size": np.array([in_h, in_w]),
        "cells_over_image": np.array([rows, cols]),
        "boxes": labels.boxes.numpy(), "classes": classes,
        "class_names": np.array([names[c] if 0 <= c < len(names) else ("context" if c == CONTEXT_CLASS else str(c))
                                 for c in classes]),
        "student": student.numpy(), "instructive": instructive.numpy(), "error": errors[index].numpy(),
        "error_sums": np.array([float(e.sum()) for e in errors]),
        "error_sizes": np.array([recorder.instructive[k].shape[1] * h * w for k, (h, w) in zip(keys, sizes)]),
        "loss_weight": float(model.distill_loss.loss_weight), "loss_distill": float(losses["loss_distill"]),
        "student_rgb": student_rgb, "instructive_rgb": instructive_rgb, "pca_components": components,
        "pca_mean": mean, "attention": attention, "attention_query": query, "interaction": model.teacher.interaction,
    }


def save_inspection(data: Dict, path: str) -> None:
    """data (inspect_image's) as a .npz at `path`, written atomically."""
    atomic_write(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in data.items()}))
