"""PackedLabels: the one representation of a batch's objects that every lgd module takes.

All objects of the batch sit in flat tensors, image after image (batch_idx non-decreasing), exactly the
(boxes, batch_idx) pair lgd_ops takes. Inside an image come its ground-truth objects in their given order,
then, when context is on, its context object LAST: box (0, 0, W_in, H_in) clamped like every box, class
CONTEXT_CLASS. An image without ground truth holds only its context object (nothing when context is off).
Packing rather than per-image lists lets every module run batched over the whole batch.

Everything that sets a shape or an index (objects per image, each object's place inside its image, which objects
are context objects) is known on the host when the labels are packed, so no module reads it back from the device:
a training step packs the loader's CPU boxes once (pack_on_host), checks them there, and moves the result to the
device without waiting for it (to). The box ops' per-level indices (box_index) are built from those CPU boxes too.
"""
import dataclasses
import itertools
from typing import Optional, Sequence, Tuple

import torch
from detectron2.structures import BitMasks, Instances, PolygonMasks

from lgd_ops.box_index import BoxIndex, index_of_checked

CONTEXT_CLASS = -1
MASK_CROP = 7  # the Mask R-CNN descriptor appends the object's mask cropped to its box at 7 x 7 (49 values)


@dataclasses.dataclass(frozen=True, eq=False)
class PackedLabels:
    """Ground truth of a batch plus its context objects (see the module docstring for the layout).

    boxes       [N, 4] float (x1, y1, x2, y2) in padded-input pixels, clamped to [0, W_in-1] x [0, H_in-1]
    classes     [N] int64: 0..K-1, CONTEXT_CLASS for context objects
    batch_idx   [N] int64: the object's image, non-decreasing
    num_images  B, images without objects included
    image_size  (H_in, W_in): the padded input size, detectron2's images.tensor.shape[-2:]
    context     whether every image ends with its context object
    masks       None, or [N, H_in, W_in] bool instance masks on the padded input (a context object's: all True)
    mask_crops  None, or [N, 49] 0/1 float: the mask inside its box resized to 7 x 7 (a context object's: all 1)
    counts      objects per image (context objects included), on the host; computed when not given
    num_classes None, or K when the classes were checked to be < K (pack_on_host)

    Build it with from_instances / from_lists / from_packed / pack_on_host; direct construction is validated too.
    """

    boxes: torch.Tensor
    classes: torch.Tensor
    batch_idx: torch.Tensor
    num_images: int
    image_size: Tuple[int, int]
    context: bool
    masks: Optional[torch.Tensor] = None
    mask_crops: Optional[torch.Tensor] = None
    counts: Optional[Tuple[int, ...]] = None
    num_classes: Optional[int] = None

    def __post_init__(self):
        in_h, in_w = _image_size(self.image_size)
        object.__setattr__(self, "image_size", (in_h, in_w))
        b = self.num_images
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise ValueError(f"PackedLabels: num_images must be an int >= 1, got {b!r}")
        _check(isinstance(self.boxes, torch.Tensor) and self.boxes.dim() == 2 and self.boxes.shape[1] == 4
               and self.boxes.is_floating_point(), "boxes must be a float [N, 4] tensor", self.boxes)
        n = self.boxes.shape[0]
        for name in ("classes", "batch_idx"):
            value = getattr(self, name)
            _check(isinstance(value, torch.Tensor) and value.dtype == torch.int64 and value.shape == (n,),
                   f"{name} must be an int64 [N] tensor with N = {n}", value)
        if self.masks is not None:
            _check(isinstance(self.masks, torch.Tensor) and self.masks.dtype == torch.bool
                   and self.masks.shape == (n, in_h, in_w),
                   f"masks must be a bool [N, H_in, W_in] = [{n}, {in_h}, {in_w}] tensor", self.masks)
            _check(isinstance(self.mask_crops, torch.Tensor) and self.mask_crops.shape == (n, MASK_CROP ** 2),
                   f"mask_crops must be a [N, {MASK_CROP ** 2}] tensor when masks are given", self.mask_crops)
        elif self.mask_crops is not None:
            raise ValueError("PackedLabels: mask_crops given without masks")
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        if len({t.device for t in tensors.values()}) > 1:
            raise ValueError(f"PackedLabels: tensors must be on one device, got "
                             f"{ {k: str(t.device) for k, t in tensors.items()} }")
        # the host copy of the boxes the box indices are built from, and the indices built so far (box_index)
        object.__setattr__(self, "_host_boxes", (self.boxes, self.batch_idx) if self.boxes.device.type == "cpu"
                           else None)
        object.__setattr__(self, "_box_indices", {})
        if self.counts is not None and (len(self.counts) != b or sum(self.counts) != n):
            raise ValueError(f"PackedLabels: counts must give the objects of each of the {b} images, {n} in all, "
                             f"got {self.counts}")
        if n == 0:
            if self.context:
                raise ValueError("PackedLabels: with context on, every image holds at least its context object")
            object.__setattr__(self, "counts", (0,) * b)
            return
        idx, cls = self.batch_idx, self.classes
        counts = torch.bincount(idx.clamp(0, b - 1), minlength=b)
        ends = counts.cumsum(0) - 1
        is_ctx = cls == CONTEXT_CLASS
        if self.context:
            layout_ok = (counts > 0).all() & (is_ctx.sum() == b) & is_ctx[ends.clamp(min=0)].all()
        else:
            layout_ok = ~is_ctx.any()
        ok = torch.stack([
            torch.isfinite(self.boxes).all(),
            ((idx >= 0) & (idx < b)).all(),
            (idx[1:] >= idx[:-1]).all(),
            ((cls >= 0) | is_ctx).all(),
            layout_ok,
            (counts == counts.new_tensor(self.counts)).all() if self.counts is not None else torch.tensor(True),
        ]).tolist()  # one host sync for all value checks
        messages = ("boxes contain NaN or Inf", f"batch_idx values must be in [0, {b})",
                    "batch_idx must be non-decreasing (objects grouped image after image)",
                    f"classes must be >= 0 (or CONTEXT_CLASS={CONTEXT_CLASS} for context objects)",
                    "with context on, each image must end with exactly one context object, and the context "
                    "class only there; with context off, no object may have the context class",
                    f"counts {self.counts} differ from the objects per image in batch_idx")
        for good, message in zip(ok, messages):
            if not good:
                raise ValueError(f"PackedLabels: {message}")
        if self.counts is None:
            object.__setattr__(self, "counts", tuple(counts.tolist()))

    @classmethod
    def pack_on_host(cls, instances: Sequence[Instances], image_size, *, context: bool, masks: bool = False,
                     num_classes: Optional[int] = None) -> "PackedLabels":
        """from_instances on the data loader's CPU Instances, checked there (classes < num_classes too, when
        given): the once-per-batch host-side step of a training step, so that no check or index waits for the
        device. Move the result with to(device)."""
        labels = cls.from_instances(instances, image_size, context=context, masks=masks)
        if num_classes is None:
            return labels
        if labels.num_objects and bool((labels.classes >= num_classes).any()):
            raise ValueError(f"PackedLabels: classes must be in [0, {num_classes}), got max "
                             f"{int(labels.classes.max())}")
        return dataclasses.replace(labels, num_classes=num_classes)

    def to(self, device) -> "PackedLabels":
        """The same labels on `device`, copied without waiting (pinned host memory for a GPU) and not checked
        again: the checks read values, which on a GPU would wait for it."""
        device = torch.device(device)
        if self.boxes.device == device:
            return self
        moved = object.__new__(PackedLabels)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            object.__setattr__(moved, field.name, _to_device(value, device) if isinstance(value, torch.Tensor)
                               else value)
        object.__setattr__(moved, "_host_boxes", self._host_boxes)
        object.__setattr__(moved, "_box_indices", {})
        return moved

    def box_index(self, level_size, *, context_objects: bool = True) -> BoxIndex:
        """The lgd_ops.BoxIndex of the objects' boxes on a level_size (H, W) map, on the labels' device: of every
        object, or with context_objects=False of the others only (object_index(context=False), the knowledge
        mapper's regions). Built on the host from the packed CPU boxes (checked when packed: nothing is read
        back) the first time it is asked for, moved with one non-blocking copy, and kept on these labels, which
        live one step, for every later call on that level."""
        key = (tuple(level_size), context_objects or not self.context)
        if key not in self._box_indices:
            boxes, batch_idx = self._host_boxes or (self.boxes, self.batch_idx)
            if not key[1]:
                rows = torch.tensor(self._object_rows(context=False), dtype=torch.int64, device=boxes.device)
                boxes, batch_idx = boxes[rows], batch_idx[rows]
            index = index_of_checked(boxes, batch_idx, self.image_size, self.num_images, key[0])
            self._box_indices[key] = index.to(self.boxes.device, non_blocking=True)
        return self._box_indices[key]

    def _index(self, values) -> torch.Tensor:
        """An int64 index built on the host from host values, on the labels' device."""
        return _to_device(torch.tensor(values, dtype=torch.int64), self.boxes.device)

    def slots(self) -> torch.Tensor:
        """[N] int64: each object's position inside its image."""
        return self._index([i for n in self.counts for i in range(n)])

    def max_count(self) -> int:
        """The most objects any image holds."""
        return max(self.counts, default=0)

    def counts_tensor(self) -> torch.Tensor:
        """[B] int64: objects per image, on the labels' device."""
        return self._index(list(self.counts))

    def object_index(self, context: bool) -> torch.Tensor:
        """Indices of the context objects (context=True; one per image, in image order) or of the others."""
        return self._index(self._object_rows(context))

    def _object_rows(self, context: bool):
        """object_index's indices, as a host list."""
        ends = set(itertools.accumulate(self.counts)) if self.context else set()
        return [i for i in range(self.num_objects) if ((i + 1) in ends) == context]

    @property
    def is_context(self):
        """[N] bool: which objects are context objects."""
        return self.classes == CONTEXT_CLASS

    @property
    def num_objects(self):
        return self.boxes.shape[0]

    @classmethod
    def from_instances(cls, instances: Sequence[Instances], image_size, *, context: bool, masks: bool = False):
        """From detectron2 Instances (gt_boxes, gt_classes and, with masks=True, gt_masks), one per image.

        Mask crops come from gt_masks.crop_and_resize(gt_boxes, 7) as in the authors' code (polygon
        rasterization for PolygonMasks); the dense masks are rasterized at each image's size and padded.
        """
        if isinstance(instances, Instances) or not isinstance(instances, (list, tuple)):
            raise ValueError("PackedLabels.from_instances: instances must be a list of Instances, one per image")
        boxes, classes, dense, crops = [], [], [], []
        for b, inst in enumerate(instances):
            if not isinstance(inst, Instances) or not (inst.has("gt_boxes") and inst.has("gt_classes")):
                raise ValueError(f"PackedLabels.from_instances: instances[{b}] must be an Instances with "
                                 "gt_boxes and gt_classes")
            box = inst.gt_boxes.tensor
            boxes.append(box)
            classes.append(inst.gt_classes)
            if masks:
                gt = inst.get("gt_masks") if inst.has("gt_masks") else None
                if isinstance(gt, PolygonMasks):
                    bits = BitMasks.from_polygon_masks(gt, *inst.image_size).tensor.to(box.device)
                elif isinstance(gt, BitMasks):
                    bits = gt.tensor
                else:
                    raise ValueError(f"PackedLabels.from_instances: masks=True needs instances[{b}].gt_masks as "
                                     f"PolygonMasks or BitMasks, got {type(gt).__name__}")
                dense.append(bits)
                crops.append(gt.crop_and_resize(box, MASK_CROP) if len(box) else None)
        return cls._pack(boxes, classes, image_size, context, dense if masks else None, crops if masks else None)

    @classmethod
    def from_lists(cls, boxes, classes, image_size, *, context: bool, masks=None):
        """From per-image lists: boxes[b] [N_b, 4] (x1, y1, x2, y2) in input pixels, classes[b] [N_b] ints,
        optional masks[b] [N_b, h_b, w_b] bool at the image's size (h_b <= H_in, w_b <= W_in; padded
        bottom/right like detectron2's ImageList). Mask crops: BitMasks.crop_and_resize(boxes, 7)."""
        return cls._pack(boxes, classes, image_size, context, masks, None)

    @classmethod
    def from_packed(cls, boxes, classes, batch_idx, num_images, image_size, *, context: bool, masks=None):
        """From flat tensors in any order: boxes [M, 4], classes [M], batch_idx [M] int64, optional masks
        [M, h, w] bool; objects are regrouped image by image, keeping their order within an image."""
        if not isinstance(batch_idx, torch.Tensor) or batch_idx.dim() != 1 or batch_idx.dtype != torch.int64:
            raise ValueError("PackedLabels.from_packed: batch_idx must be an int64 [M] tensor")
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"PackedLabels.from_packed: num_images must be an int >= 1, got {num_images!r}")
        for name, value in (("boxes", boxes), ("classes", classes), ("masks", masks)):
            if value is not None and (not isinstance(value, torch.Tensor) or value.shape[:1] != batch_idx.shape):
                raise ValueError(f"PackedLabels.from_packed: {name} must be a tensor with one row per batch_idx "
                                 f"entry ({batch_idx.shape[0]})")
        if batch_idx.numel() and not bool(((batch_idx >= 0) & (batch_idx < num_images)).all()):
            raise ValueError(f"PackedLabels.from_packed: batch_idx values must be in [0, {num_images})")
        rows = [torch.nonzero(batch_idx == b).flatten() for b in range(num_images)]
        per_image = None if masks is None else [masks[r] for r in rows]
        return cls._pack([boxes[r] for r in rows], [classes[r] for r in rows], image_size, context, per_image, None)

    @classmethod
    def _pack(cls, boxes, classes, image_size, context, masks, crops):
        """Concatenates per-image objects, appending each image's context object; crops=None: from masks."""
        in_h, in_w = _image_size(image_size)
        if not isinstance(boxes, (list, tuple)) or not boxes:
            raise ValueError("PackedLabels: boxes must be a non-empty list with one [N_b, 4] tensor per image")
        for name, value in (("classes", classes), ("masks", masks)):
            if value is not None and (not isinstance(value, (list, tuple)) or len(value) != len(boxes)):
                raise ValueError(f"PackedLabels: {name} must be a list with one entry per image ({len(boxes)})")
        out_boxes, out_classes, out_idx, out_masks, out_crops = [], [], [], [], []
        for b, (box, cls_b) in enumerate(zip(boxes, classes)):
            _check(isinstance(box, torch.Tensor) and box.dim() == 2 and box.shape[1] == 4
                   and box.is_floating_point(), f"boxes[{b}] must be a float [N_b, 4] tensor", box)
            n = box.shape[0]
            _check(isinstance(cls_b, torch.Tensor) and cls_b.shape == (n,) and not cls_b.is_floating_point()
                   and cls_b.dtype != torch.bool, f"classes[{b}] must be an integer [N_b] tensor with N_b = {n}",
                   cls_b)
            if box.device != boxes[0].device or cls_b.device != box.device:
                raise ValueError(f"PackedLabels: boxes and classes must all be on one device, got boxes[{b}] on "
                                 f"{box.device}, classes[{b}] on {cls_b.device}, boxes[0] on {boxes[0].device}")
            box = box.detach()
            out_boxes.append(box)
            out_classes.append(cls_b.to(torch.int64))
            if masks is not None:
                m = masks[b]
                _check(isinstance(m, torch.Tensor) and m.dim() == 3 and m.shape[0] == n and m.shape[1] <= in_h
                       and m.shape[2] <= in_w, f"masks[{b}] must be a [N_b, h, w] tensor with N_b = {n}, "
                       f"h <= {in_h}, w <= {in_w}", m)
                m = m.to(device=box.device, dtype=torch.bool)
                padded = torch.zeros(n, in_h, in_w, dtype=torch.bool, device=box.device)
                padded[:, : m.shape[1], : m.shape[2]] = m
                out_masks.append(padded)
                crop = crops[b] if crops is not None else (BitMasks(m).crop_and_resize(box, MASK_CROP) if n else None)
                out_crops.append(box.new_zeros(0, MASK_CROP ** 2) if crop is None
                                 else crop.reshape(n, -1).to(device=box.device, dtype=box.dtype))
            if context:
                out_boxes.append(box.new_tensor([[0.0, 0.0, in_w, in_h]]))
                out_classes.append(torch.full((1,), CONTEXT_CLASS, dtype=torch.int64, device=box.device))
                if masks is not None:
                    out_masks.append(torch.ones(1, in_h, in_w, dtype=torch.bool, device=box.device))
                    out_crops.append(box.new_ones(1, MASK_CROP ** 2))
            out_idx.append(torch.full((n + int(context),), b, dtype=torch.int64, device=box.device))
        packed = torch.cat(out_boxes)
        limit = packed.new_tensor([in_w - 1, in_h - 1, in_w - 1, in_h - 1])
        return cls(
            boxes=packed.clamp(min=0).minimum(limit),
            classes=torch.cat(out_classes),
            batch_idx=torch.cat(out_idx),
            num_images=len(boxes),
            image_size=(in_h, in_w),
            context=bool(context),
            masks=torch.cat(out_masks) if masks is not None else None,
            mask_crops=torch.cat(out_crops) if masks is not None else None,
            counts=tuple(int(idx.shape[0]) for idx in out_idx),
        )


def _to_device(tensor, device):
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _image_size(value):
    ok = isinstance(value, (tuple, list, torch.Size)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    if not ok:
        raise ValueError(f"PackedLabels: image_size must be (H_in, W_in), two ints >= 1, got {value!r}")
    return int(value[0]), int(value[1])


def _check(condition, message, value):
    if not condition:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        dtype = f" {value.dtype}" if isinstance(value, torch.Tensor) else ""
        raise ValueError(f"PackedLabels: {message}, got {got}{dtype}")
