"""OpReport: a training hook that times LGD's three fused ops on the run's own shapes, every `period` iterations.

On a report iteration (every `period`-th, counted like detectron2's periodic hooks) the hook
  1. records, during the step, the teacher's inputs (the student's FPN levels and the packed boxes: the real
     shapes, object counts and box sizes of that batch) and the wall time of the LGD forward work
     (LGDTeacher + DistillationLoss forwards; synchronized on CUDA on this iteration only), and of the step;
  2. after the step, runs forward + backward of box_pool (on the captured levels and boxes), box_fill (random
     embeddings on the same boxes and level sizes) and normalized_mse (the captured levels against random
     teachers), with the model's active backend and with "reference", `repeats` times each after one warm-up,
     and logs the medians to EventStorage:
        op_report/<op>_ms, op_report/<op>_ref_ms, op_report/<op>_speedup   (op = box_pool, box_fill, normalized_mse)
        op_report/lgd_fwd_ms, op_report/step_ms, op_report/lgd_fwd_share     (LGD forward time / step time)
     for the JSON and TensorBoard writers registered after it (detectron2's console printer shows only losses
     and times), and logs a short table to the console.

lgd_fwd_share covers forwards only (teacher modules, adapter, normalized MSE; the instructive detection-head
pass and all backward work are not in it): a lower bound of LGD's share of the step. The Mask R-CNN variant
(mask ops, reference-only) gets the box ops timed on its objects' boxes, as a stand-in.

Overhead: only report iterations pay, about (1 + repeats) x (the ops' time with both backends) plus one
device sync per hooked module. At the RetinaNet COCO shape (B=2, 800 x 1216, 7 objects/image) the three ops
take 0.27 s forward + backward with the reference and 0.05 s fused on one CPU core (benchmarks/README.md), so
a report costs ~1.3 s there: with the default period 1000 that is ~0.002 % of a CPU run whose LGD step takes
about a minute, and less on a GPU. period=0 disables the hook.
"""
import logging
import statistics
import time
from typing import Dict, List, Optional

import torch
from detectron2.engine import HookBase

import lgd_ops
from lgd_ops._backend import resolve

from .hooks import unwrap_model

__all__ = ["OpReport", "time_lgd_ops"]

# a child of "detectron2": the logger default_setup gives console and log-file handlers
logger = logging.getLogger("detectron2.lgd.engine.op_report")
OPS = ("box_pool", "box_fill", "normalized_mse")


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: lazy initialization, allocator growth
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _op_cases(levels: List[torch.Tensor], boxes: torch.Tensor, batch_idx: torch.Tensor, image_size):
    """op name -> function(backend) running that op's forward + backward over all levels once."""
    feats = [x.detach().clone().requires_grad_() for x in levels]
    teachers = [torch.randn_like(x) for x in feats]
    num_images, channels = feats[0].shape[:2]
    emb = torch.randn(boxes.shape[0], channels, device=feats[0].device, dtype=feats[0].dtype, requires_grad=True)

    def run(outputs, inputs):
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
        for x in inputs:
            x.grad = None

    return {
        "box_pool": lambda b: run([lgd_ops.box_pool(f, boxes, batch_idx, image_size, backend=b) for f in feats],
                                  feats),
        "box_fill": lambda b: run([lgd_ops.box_fill(emb, boxes, batch_idx, image_size,
                                                    (num_images, *f.shape[-2:]), backend=b) for f in feats], [emb]),
        "normalized_mse": lambda b: run([lgd_ops.normalized_mse(feats, teachers, backend=b)], feats),
    }


def time_lgd_ops(levels: List[torch.Tensor], boxes: torch.Tensor, batch_idx: torch.Tensor, image_size,
                 backend: str = "auto", repeats: int = 3) -> Dict[str, Dict[str, float]]:
    """Median forward + backward ms of each op with `backend` (resolved for the levels' device) and with the
    reference: {op: {"backend": name, "ms": t, "ref_ms": t_ref, "speedup": t_ref / t}}."""
    if not levels:
        raise ValueError("time_lgd_ops: levels must hold at least one [B, C, H, W] tensor")
    if repeats < 1:
        raise ValueError(f"time_lgd_ops: repeats must be >= 1, got {repeats}")
    device = levels[0].device
    active = resolve(backend, device)
    report = {}
    with torch.enable_grad():
        for op, fn in _op_cases(levels, boxes, batch_idx, image_size).items():
            ms = _median_ms(lambda: fn(active), device, repeats)
            ref_ms = ms if active == "reference" else _median_ms(lambda: fn("reference"), device, repeats)
            report[op] = {"backend": active, "ms": ms, "ref_ms": ref_ms, "speedup": ref_ms / ms if ms else float("nan")}
    return report


class OpReport(HookBase):
    """Every `period` iterations: LGD op timings on the run's shapes and LGD's forward share of the step
    (module docstring). period=0 disables it; repeats: timed runs per op and backend (median)."""

    def __init__(self, period: int = 1000, repeats: int = 3):
        if period < 0:
            raise ValueError(f"OpReport: period must be >= 0 (0 disables), got {period}")
        if repeats < 1:
            raise ValueError(f"OpReport: repeats must be >= 1, got {repeats}")
        self.period, self.repeats = int(period), int(repeats)
        self._handles = []
        self._captured: Optional[tuple] = None
        self._lgd_ms = 0.0
        self._lgd_start = 0.0
        self._step_start = 0.0

    def _active(self) -> bool:
        return self.period > 0 and (self.trainer.iter + 1) % self.period == 0

    def before_step(self):
        if not self._active():
            return
        model = unwrap_model(self.trainer.model)
        self._captured, self._lgd_ms = None, 0.0
        device = model.device

        def capture(_module, args):
            features, labels = args
            self._captured = ([x.detach() for x in features], labels.boxes.detach(), labels.batch_idx,
                              labels.image_size)

        def start(_module, _args):
            _sync(device)
            self._lgd_start = time.perf_counter()

        def stop(_module, _args, _output):
            _sync(device)
            self._lgd_ms += (time.perf_counter() - self._lgd_start) * 1e3

        self._handles = [model.teacher.appearance_encoder.register_forward_pre_hook(capture)]
        for module in (model.teacher, model.distill_loss):
            self._handles += [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]
        _sync(device)
        self._step_start = time.perf_counter()

    def after_step(self):
        if not self._handles:
            return
        model = unwrap_model(self.trainer.model)
        _sync(model.device)
        step_ms = (time.perf_counter() - self._step_start) * 1e3
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._captured is None:  # the teacher did not run (e.g. an evaluation-only step)
            return
        levels, boxes, batch_idx, image_size = self._captured
        self._captured = None
        report = time_lgd_ops(levels, boxes, batch_idx, image_size, model.teacher.appearance_encoder.backend,
                              self.repeats)
        storage = self.trainer.storage
        for op, r in report.items():
            for key in ("ms", "ref_ms", "speedup"):
                storage.put_scalar(f"op_report/{op}_{key}", r[key], smoothing_hint=False)
        storage.put_scalar("op_report/lgd_fwd_ms", self._lgd_ms, smoothing_hint=False)
        storage.put_scalar("op_report/step_ms", step_ms, smoothing_hint=False)
        storage.put_scalar("op_report/lgd_fwd_share", self._lgd_ms / step_ms if step_ms else 0.0,
                           smoothing_hint=False)
        shapes = " ".join(f"{h}x{w}" for h, w in (x.shape[-2:] for x in levels))
        lines = [f"LGD op report, iter {self.trainer.iter}: B={levels[0].shape[0]} C={levels[0].shape[1]} "
                 f"levels {shapes}, {boxes.shape[0]} objects (context included), fwd+bwd medians of {self.repeats}",
                 f"{'op':16s}{'backend':>10s}{'ms':>10s}{'ref ms':>10s}{'speedup':>9s}"]
        lines += [f"{op:16s}{r['backend']:>10s}{r['ms']:10.2f}{r['ref_ms']:10.2f}{r['speedup']:8.2f}x"
                  for op, r in report.items()]
        lines.append(f"LGD forward {self._lgd_ms:.1f} ms of a {step_ms:.1f} ms step "
                     f"({100 * self._lgd_ms / max(step_ms, 1e-9):.1f} %, forwards only)")
        logger.info("\n".join(lines))
