"""BoxIndex: the boxes' level index (cells and row events on one level) that box_pool and box_fill take.

Without one, each op call builds the same index itself from the boxes on their device. A training step instead
builds it once per batch and level on the host, from the data loader's CPU boxes, where checking the boxes reads
no device value, and moves it with one non-blocking copy (lgd.modeling.labels.PackedLabels.box_index): the ops
then trust the boxes (the index carries the check made when it was built) and only compare the index's sizes with
the call's, so no op waits for the device and none keeps a cache keyed on tensor identity.
"""
import dataclasses
from typing import Tuple

import torch

from ._boxes import level_index
from ._checks import check_boxes, check_size


@dataclasses.dataclass(frozen=True, eq=False)
class BoxIndex:
    """A level index (lgd_ops._boxes.level_index: int32 [8 N + num_images + 1]) with what it was built for.

    tensor       the index, on the device the op runs on
    num_boxes    N, the boxes it indexes
    num_images   B, the images batch_idx refers to (box_pool: the features' batch; box_fill: output_size[0])
    image_size   (H_in, W_in), the padded input size the boxes are in
    level_size   (H, W), the map the op reads (box_pool) or writes (box_fill)
    Build it with lgd_ops.box_index.
    """

    tensor: torch.Tensor
    num_boxes: int
    num_images: int
    image_size: Tuple[int, int]
    level_size: Tuple[int, int]

    @property
    def device(self):
        return self.tensor.device

    def to(self, device, non_blocking=False):
        """The index on `device` (from pinned host memory when a CPU index goes to a GPU, so that a non_blocking
        copy does not wait)."""
        device = torch.device(device)
        if self.tensor.device == device:
            return self
        tensor = self.tensor
        if device.type == "cuda" and tensor.device.type == "cpu":
            tensor = tensor.pin_memory()
        return dataclasses.replace(self, tensor=tensor.to(device, non_blocking=non_blocking))


def box_index(boxes, batch_idx, image_size, num_images, level_size):
    """The BoxIndex of boxes [N, 4] (x1, y1, x2, y2, padded-input pixels) and batch_idx [N] int64 in images of
    image_size (H_in, W_in), num_images of them, on a level_size (H, W) map, on the boxes' device.

    Checks the boxes where they are (finite, batch_idx in [0, num_images): a ValueError naming the argument;
    CPU boxes need no device sync), once, for every op call that takes the index. Move it with
    .to(device, non_blocking=True)."""
    op = "box_index"
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
        raise ValueError(f"{op}: num_images must be an int >= 0, got {num_images!r}")
    image_size = check_boxes(op, boxes, batch_idx, image_size, num_images, boxes, "boxes")
    return index_of_checked(boxes, batch_idx, image_size, num_images, check_size(op, "level_size", level_size, 2, 0))


def index_of_checked(boxes, batch_idx, image_size, num_images, level_size):
    """box_index of boxes whose values were checked already (PackedLabels checks them when it packs them), so
    that building it reads no value."""
    (in_h, in_w), (height, width) = image_size, level_size
    tensor = level_index(boxes, batch_idx, num_images, in_h, in_w, height, width)
    return BoxIndex(tensor, boxes.shape[0], num_images, (in_h, in_w), (height, width))


def check_index(op, index, boxes, num_images, image_size, level_size):
    """The index's tensor for an op call on boxes over num_images images of image_size, on a level_size map:
    a ValueError naming `index` and what differs when it was built for another call or lives elsewhere."""
    if not isinstance(index, BoxIndex):
        raise ValueError(f"{op}: index must be an lgd_ops.BoxIndex (lgd_ops.box_index), got {type(index).__name__}")
    call = {"num_boxes": boxes.shape[0], "num_images": num_images, "image_size": tuple(image_size),
            "level_size": tuple(level_size), "device": boxes.device}
    built = {"num_boxes": index.num_boxes, "num_images": index.num_images, "image_size": index.image_size,
             "level_size": index.level_size, "device": index.device}
    differ = [f"{name} {built[name]} (this call: {call[name]})" for name in call if built[name] != call[name]]
    if differ:
        raise ValueError(f"{op}: index was built for another call: {', '.join(differ)}")
    return index.tensor
