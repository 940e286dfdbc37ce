"""lgd_ops.box_index and PackedLabels.box_index (docs/method.md §1): the level index a training step builds once per
batch and level on the host. The ops' use of it (same bits, refusal, trust) is in box_index_tests.py."""
import pytest
import torch

import lgd_ops
from conftest import random_batch_idx, random_boxes
from lgd_ops._boxes import index_size, level_index

pytest.importorskip("detectron2")

from lgd.modeling.labels import PackedLabels  # noqa: E402


def test_box_index_holds_the_level_index_and_what_it_was_built_for():
    boxes, batch_idx = random_boxes(9, (40, 56), (5, 7)), random_batch_idx(9, 3)
    index = lgd_ops.box_index(boxes, batch_idx, (40, 56), 3, (5, 7))
    assert torch.equal(index.tensor, level_index(boxes, batch_idx, 3, 40, 56, 5, 7))
    assert index.tensor.dtype == torch.int32 and index.tensor.numel() == index_size(9, 3)
    assert (index.num_boxes, index.num_images, index.image_size, index.level_size) == (9, 3, (40, 56), (5, 7))
    assert index.to("cpu") is index and index.device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_box_index_moves_to_the_gpu_without_waiting():
    index = lgd_ops.box_index(random_boxes(5, (32, 32)), random_batch_idx(5, 2), (32, 32), 2, (4, 4))
    moved = index.to("cuda", non_blocking=True)
    assert moved.device.type == "cuda" and moved.level_size == index.level_size
    assert torch.equal(moved.tensor.cpu(), index.tensor)


def labels(context=True):
    boxes = [random_boxes(3, (48, 64), (6, 8), kinds=("normal", "outside", "degenerate")), torch.zeros(0, 4),
             random_boxes(2, (48, 64), (6, 8))]
    classes = [torch.tensor([0, 2, 1]), torch.zeros(0, dtype=torch.int64), torch.tensor([3, 3])]
    return PackedLabels.from_lists(boxes, classes, (48, 64), context=context)


@pytest.mark.parametrize("context", [True, False])
def test_packed_labels_index_every_object_or_the_non_context_ones(context):
    """PackedLabels.box_index gives the index lgd_ops.box_index builds from the same boxes (all objects, or the
    knowledge mapper's non-context ones), built once per level and kept on the labels."""
    packed = labels(context)
    for level in ((6, 8), (3, 4)):
        every = packed.box_index(level)
        assert every is packed.box_index(level)
        expected = lgd_ops.box_index(packed.boxes, packed.batch_idx, (48, 64), 3, level)
        assert torch.equal(every.tensor, expected.tensor) and every.level_size == level
        inst = packed.object_index(context=False)
        others = packed.box_index(level, context_objects=False)
        assert others is packed.box_index(level, context_objects=False)
        expected = lgd_ops.box_index(packed.boxes[inst], packed.batch_idx[inst], (48, 64), 3, level)
        assert torch.equal(others.tensor, expected.tensor) and others.num_boxes == len(inst)
        assert (others is every) == (not context)


def test_packed_labels_build_their_indices_from_the_host_boxes(monkeypatch):
    """Labels moved to a device (here the meta device, which holds no values) keep the packed CPU boxes, build their
    indices from those on the host and move each index to the device."""
    packed = labels()
    moved = packed.to("meta")
    built = []
    monkeypatch.setattr("lgd.modeling.labels.index_of_checked",
                        lambda boxes, *args: built.append(boxes) or lgd_ops.box_index(boxes, *args))
    index = moved.box_index((6, 8))
    assert len(built) == 1 and built[0] is packed.boxes
    assert index.device == torch.device("meta") and index.tensor.shape == packed.box_index((6, 8)).tensor.shape
