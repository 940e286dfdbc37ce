"""lgd.tools.train_net.train, CPU, tiny (test_lgd_train_net's dataset and config): exact resume and a 2-process DDP run.

Exact resume: 4 iterations uninterrupted vs. a run killed before iteration 2 (after the iteration-1 checkpoint)
then resumed to 4. Bitwise equality is expected, not a tolerance: every input of a step is restored or
recomputed exactly (weights, BN statistics and momentum buffers from the checkpoint, LRs and the schedule
flags from the iteration, the batches from ResumableTrainingSampler, augmentation randomness from
IterationSeed, RetinaNet's EMA loss normalizer from the distiller's extra state, or in baseline mode
(lgd.method=baseline) from DetectorEMAState), one process with a fixed
thread count runs the same kernels in the same order, and train() runs TorchScript unoptimized (otherwise
detectron2's scripted focal loss switches to a differently rounded graph after its first calls in a process,
and the first resumed steps differ from the uninterrupted ones in the last bits).
"""
import os

import pytest

pytest.importorskip("detectron2")

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

pytest.importorskip("pycocotools")

from lgd.data import register_coco_once  # noqa: E402
from lgd.config import load_config  # noqa: E402
from lgd.methods import build_method  # noqa: E402
from lgd.runner import launch_cpu, train  # noqa: E402
from test_lgd_train_net import DATASET, make_setup, overrides  # noqa: E402

LOSSES = ("loss_cls", "loss_box_reg", "loss_cls_tea", "loss_box_reg_tea", "loss_distill")


class Killed(Exception):
    """Stands for the process dying."""


class LossRecorder(HookBase):
    """Each iteration's raw losses (EventStorage's latest values, not the smoothed ones metrics.json has)."""

    def __init__(self, keys):
        self.keys = keys
        self.losses = {}

    def after_step(self):
        storage = self.trainer.storage
        self.losses[self.trainer.iter] = {k: storage.history(k).latest() for k in self.keys}


class KillAt(HookBase):
    def __init__(self, iteration):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter == self.iteration:
            raise Killed(self.iteration)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root, cfg_file, ann, images = make_setup(tmp_path_factory.mktemp("lgd_resume"))
    register_coco_once(DATASET, ann, images)
    return root, cfg_file, ann, images


def tiny_config(cfg_file, out, max_iter=4):
    cfg = load_config(cfg_file, overrides(out, max_iter))
    cfg.dataloader.evaluator = None  # no evaluation: it does not change training and costs time here
    return cfg


def run(cfg_file, out, method, *hooks, resume=False):
    cfg = tiny_config(cfg_file, out)
    torch.manual_seed(0)  # same initial weights in every run
    train(cfg, method=build_method(cfg, method, backend="reference"), resume=resume, extra_hooks=hooks)


@pytest.mark.parametrize("method", ["lgd", "baseline"])
def test_killed_and_resumed_run_matches_uninterrupted(setup, method):
    root, cfg_file, _, _ = setup
    whole, split = str(root / f"whole_{method}"), str(root / f"split_{method}")
    full = LossRecorder(LOSSES if method == "lgd" else LOSSES[:2])
    run(cfg_file, whole, method, full)
    first = LossRecorder(full.keys)
    with pytest.raises(Killed):
        run(cfg_file, split, method, first, KillAt(2))
    assert not os.path.exists(os.path.join(split, "model_final.pth"))
    second = LossRecorder(full.keys)
    run(cfg_file, split, method, second, resume=True)

    assert sorted(full.losses) == [0, 1, 2, 3]
    assert sorted(first.losses) == [0, 1] and sorted(second.losses) == [2, 3]
    assert {**first.losses, **second.losses} == full.losses
    want = torch.load(os.path.join(whole, "model_final.pth"))
    got = torch.load(os.path.join(split, "model_final.pth"))
    assert want["model"].keys() == got["model"].keys()
    for name, value in want["model"].items():
        assert torch.equal(got["model"][name], value), name
    assert got["trainer"]["iteration"] == want["trainer"]["iteration"] == 3


class DumpParameters(HookBase):
    """Saves this rank's parameters after training (the checkpoint only holds rank 0's)."""

    def __init__(self, out):
        self.out = out

    def after_train(self):
        params = {n: p.detach().clone() for n, p in self.trainer.model.named_parameters()}
        torch.save(params, os.path.join(self.out, f"rank{comm.get_rank()}.pt"))


def ddp_worker(cfg_file, ann, images, out):
    torch.set_num_threads(1)
    register_coco_once(DATASET, ann, images)
    cfg = tiny_config(cfg_file, out, max_iter=3)
    train(cfg, backend="reference", extra_hooks=[DumpParameters(out)])


def test_two_process_ddp_on_cpu_keeps_ranks_identical(setup):
    root, cfg_file, ann, images = setup
    out = root / "ddp"
    out.mkdir()
    launch_cpu(ddp_worker, 2, args=(cfg_file, ann, images, str(out)))
    rank0, rank1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert rank0.keys() == rank1.keys() and all(k.startswith("module.") for k in rank0)
    for name, value in rank0.items():
        assert torch.equal(rank1[name], value), name
    final = torch.load(out / "model_final.pth")
    assert final["trainer"]["iteration"] == 2
    for name, value in final["model"].items():  # rank 0 saved the unwrapped model: the same weights
        if "module." + name in rank0:
            assert torch.equal(rank0["module." + name], value), name


def agree_worker(out):
    """Each rank starts from its own auto choices; after agree() every rank holds rank 0's."""
    import json

    import lgd_ops
    from lgd.engine.checkpoint import BackendChoices

    rank = comm.get_rank()
    lgd_ops.set_auto_choices({"box_pool/cpu/float32/contiguous": "cpu" if rank == 0 else "reference"})
    BackendChoices().agree()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(lgd_ops.auto_choices(), f)


def test_ranks_agree_on_auto_choices(tmp_path):
    """A run's processes measure auto's choices separately; after the first step all take the main process's
    (train() calls BackendChoices.agree), so the checkpoint's choices are the ones every rank ran."""
    import json

    launch_cpu(agree_worker, 2, args=(str(tmp_path),))
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1] == {"box_pool/cpu/float32/contiguous": "cpu"}
