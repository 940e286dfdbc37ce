"""The LGD training step never waits for the device: no host-sync-class aten op (reading a tensor's value on the
host, or an op whose output size depends on the data) is raised from lgd's or lgd_ops' own code during a whole
step, forward and backward, of RetinaNet, FCOS and Faster R-CNN with LGD. Everything that sets a shape or an index is
computed once per batch on the host, from the data loader's CPU boxes (PackedLabels.pack_on_host), which the
recording skips. detectron2's own syncs (its heads, matching and losses) are out of scope. Runs on CPU: the
recorder sees the aten ops whatever the device."""
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("detectron2")

from detectron2.utils.events import EventStorage  # noqa: E402

import lgd  # noqa: E402
import lgd_ops  # noqa: E402
import test_lgd_detectors as detectors  # noqa: E402
from test_lgd_distiller import make_batch, make_distiller  # noqa: E402

SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "nonzero_static", "masked_select",
            "masked_scatter", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim", "equal",
            "repeat_interleave", "bincount", "histc", "_assert_async", "allclose"}
ROOTS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (lgd, lgd_ops))
TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
HOST_SIDE = "pack_on_host"  # the once-per-batch host-side packing of the loader's CPU boxes


class SyncRecorder(TorchDispatchMode):
    """Records every sync-class op whose caller (the innermost frame outside torch and this file) is lgd or
    lgd_ops code, with that frame."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in SYNC_OPS or (name == "index" and _has_bool_index(args)):
            stack = traceback.extract_stack()[:-1]
            callers = [f for f in stack if not f.filename.startswith(TORCH) and f.filename != __file__]
            caller = callers[-1] if callers else None
            if caller and caller.filename.startswith(ROOTS) and not any(f.name == HOST_SIDE for f in stack):
                self.found.append(f"aten::{name} at {os.path.relpath(caller.filename)}:{caller.lineno} "
                                  f"({caller.name})")
        return func(*args, **(kwargs or {}))


def _has_bool_index(args):
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def recorded_step(model, batch):
    with EventStorage(0), SyncRecorder() as recorder:
        losses = model(batch)
        sum(losses.values()).backward()
    return recorder.found


needs_kernels = pytest.mark.skipif("cpu" not in lgd_ops.available_backends(), reason="lgd_ops CPU kernels not built")


@needs_kernels
@pytest.mark.parametrize("detector", ["retinanet", "faster_rcnn", "fcos"])
def test_lgd_step_has_no_host_sync(detector):
    """With the compiled kernels (the reference's masked matmul reads its result back to spot NaN; the Mask R-CNN
    variant's mask ops exist only as the reference)."""
    if detector == "retinanet":
        model, batch = make_distiller(backend="cpu"), make_batch()
    else:
        model, batch = detectors.make_model(detector, backend="cpu"), detectors.make_batch()
    assert recorded_step(model, batch) == []


@needs_kernels
def test_a_planted_item_is_found(monkeypatch):
    """The recorder is not blind: a .item() planted in the relation adapter is reported with its place."""
    model = make_distiller(backend="cpu")
    assert recorded_step(model, make_batch()) == []
    adapter = model.teacher.relation_adapter
    forward = adapter.forward

    def planted(appearance, label_embeddings, labels):
        appearance[0].sum().item()
        return forward(appearance, label_embeddings, labels)

    monkeypatch.setattr(adapter, "forward", planted)
    found = recorded_step(model, make_batch())  # the planted call is this file's, so its caller is the teacher
    assert any(f.startswith("aten::_local_scalar_dense at lgd/modeling/teacher.py") for f in found), found
