"""OpReport: a training hook that measures LGD's three fused ops on the run's own shapes, every `period` iterations.

Why: a benchmark's shapes are guesses; the hook times the ops on the real feature levels and boxes of a batch,
with the run's backend and with the reference, and says how much of the step LGD's forward and saved
activations take, so a run shows whether the ops matter for it. The logged keys are listed in
benchmarks/README.md ("Op report").
"""
import logging
import time
from typing import Dict, List, Optional

import torch
from detectron2.engine import HookBase

import lgd_ops
from lgd_ops import benchmark

from .hooks import unwrap_model

__all__ = ["OpReport", "time_lgd_ops"]

# a child of "detectron2": the logger default_setup gives console and log-file handlers
logger = logging.getLogger("detectron2.lgd.engine.op_report")
OPS = ("box_pool", "box_fill", "normalized_mse")


def _sync(device: torch.device):
    benchmark.sync(device)


def _cases(levels: List[torch.Tensor], boxes: torch.Tensor, batch_idx: torch.Tensor, image_size):
    """op name -> lgd_ops.benchmark case: the op over the captured levels' shapes and dtype, on the captured boxes."""
    x = levels[0]
    fmt = torch.channels_last if (not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)) \
        else torch.contiguous_format
    return {op: benchmark.make_case(op, [tuple(l.shape) for l in levels], boxes, batch_idx, image_size, x.dtype,
                                    x.device, fmt) for op in OPS}


def time_lgd_ops(levels: List[torch.Tensor], boxes: torch.Tensor, batch_idx: torch.Tensor, image_size,
                 backend: str = "auto", repeats: int = 3, memory: bool = False) -> Dict[str, Dict[str, float]]:
    """Median forward + backward ms of each op with `backend` (for "auto", the backend auto chose for the levels'
    device, dtype and layout) and with the reference (lgd_ops.benchmark.time_ms):
    {op: {"backend": name, "ms": t, "ref_ms": t_ref, "speedup": t_ref / t}};
    memory=True adds "peak_mb" and "ref_peak_mb" (lgd_ops.benchmark.peak_memories)."""
    if not levels:
        raise ValueError("time_lgd_ops: levels must hold at least one [B, C, H, W] tensor")
    if repeats < 1:
        raise ValueError(f"time_lgd_ops: repeats must be >= 1, got {repeats}")
    device = levels[0].device
    cases = _cases(levels, boxes, batch_idx, image_size)
    channels_last = cases["box_pool"].memory_format == torch.channels_last
    report = {}
    with torch.enable_grad():
        for op, case in cases.items():
            active = lgd_ops.current_choice(op, backend, levels[0], channels_last)
            ms = benchmark.time_ms(benchmark.mode_fn(case, "full", active), device, repeats)[1]
            ref_ms = ms if active == "reference" else benchmark.time_ms(
                benchmark.mode_fn(case, "full", "reference"), device, repeats)[1]
            report[op] = {"backend": active, "ms": ms, "ref_ms": ref_ms, "speedup": ref_ms / ms if ms else float("nan")}
        if memory:
            for active in sorted({r["backend"] for r in report.values()}):
                backends = [active] if active == "reference" else [active, "reference"]
                ops = [op for op in cases if report[op]["backend"] == active]
                peaks = benchmark.peak_memories([cases[op] for op in ops], "full", backends)
                for op, row in zip(ops, peaks):
                    report[op]["peak_mb"] = row[0] / 2**20
                    report[op]["ref_peak_mb"] = row[-1] / 2**20
    return report


class _SavedBytes:
    """saved_tensors_hooks that count the bytes autograd saves for the backward (each storage once, parameters
    excluded), split into those saved while `inside` is set (LGD's modules) and all of them. Identity hooks: the
    graph keeps exactly the tensors it would keep anyway."""

    def __init__(self, parameters):
        self.skip = {p.untyped_storage().data_ptr() for p in parameters}
        self.seen = set()
        self.inside = False
        self.lgd = self.total = 0
        self._context = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        try:
            storage = t.untyped_storage()
            key = storage.data_ptr()
        except (RuntimeError, NotImplementedError):  # no storage (e.g. a fake or nested tensor)
            return t
        if key and key not in self.skip and key not in self.seen:
            self.seen.add(key)
            self.total += storage.nbytes()
            if self.inside:
                self.lgd += storage.nbytes()
        return t

    def __enter__(self):
        self._context.__enter__()
        return self

    def __exit__(self, *exc):
        self._context.__exit__(*exc)
        self.seen.clear()


class OpReport(HookBase):
    """Every `period`-th iteration (counted like detectron2's periodic hooks; period=0 disables it):
    1. during the step, capture the teacher's inputs (the student's FPN levels and the packed boxes) and time the
       LGD forward work (LGDTeacher + DistillationLoss; synchronized on CUDA on this iteration only) and the step;
    2. after it, time forward + backward of box_pool (captured levels and boxes), box_fill (random embeddings, same
       boxes and level sizes) and normalized_mse (captured levels vs random teachers) with the model's backend and
       with "reference", `repeats` times after a warm-up, and log the medians to EventStorage (for the JSON and
       TensorBoard writers; detectron2's console printer shows only losses and times) plus a short table;
    3. memory=True: each op's peak memory beyond its inputs with both backends (lgd_ops.benchmark.peak_memories:
       a child process on CPU, so the run keeps nothing), on the first report and when the level shapes change;
       and the bytes autograd saves during the step inside LGD's modules vs in the whole step.
    lgd_fwd_share counts forwards only (not the instructive head pass, no backward): a lower bound of LGD's share.
    The Mask R-CNN variant (reference-only mask ops) gets the box ops timed on its objects' boxes, as a stand-in.
    Only report iterations pay: about (1 + repeats) x the ops' time with both backends."""

    def __init__(self, period: int = 1000, repeats: int = 3, memory: bool = True):
        if period < 0:
            raise ValueError(f"OpReport: period must be >= 0 (0 disables), got {period}")
        if repeats < 1:
            raise ValueError(f"OpReport: repeats must be >= 1, got {repeats}")
        self.period, self.repeats, self.memory = int(period), int(repeats), bool(memory)
        self._peaks: Dict[str, Dict[str, float]] = {}
        self._peak_shapes = None
        self._saved: Optional[_SavedBytes] = None
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

        def capture(_module, args):  # the teacher's (features, labels, image_size), as LGDDistiller calls it
            features, labels = args[:2]
            levels = features.values() if isinstance(features, dict) else features
            self._captured = ([x.detach() for x in levels], labels.boxes.detach(), labels.batch_idx,
                              labels.image_size)

        def start(_module, _args):
            _sync(device)
            self._lgd_start = time.perf_counter()
            self._saved.inside = True

        def stop(_module, _args, _output):
            _sync(device)
            self._lgd_ms += (time.perf_counter() - self._lgd_start) * 1e3
            self._saved.inside = False

        self._handles = [model.teacher.register_forward_pre_hook(capture)]
        for module in (model.teacher, model.distill_loss):
            self._handles += [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]
        self._saved = _SavedBytes(model.parameters()).__enter__()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self._step_base = torch.cuda.memory_allocated(device)
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
        saved, self._saved = self._saved, None
        saved.__exit__(None, None, None)
        if self._captured is None:  # the teacher did not run (e.g. an evaluation-only step)
            return
        storage = self.trainer.storage
        if model.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(model.device) - self._step_base
            storage.put_scalar("op_report/step_peak_mb", peak / 2**20, smoothing_hint=False)
        storage.put_scalar("op_report/lgd_saved_mb", saved.lgd / 2**20, smoothing_hint=False)
        storage.put_scalar("op_report/step_saved_mb", saved.total / 2**20, smoothing_hint=False)
        storage.put_scalar("op_report/lgd_mem_share", saved.lgd / saved.total if saved.total else 0.0,
                           smoothing_hint=False)
        levels, boxes, batch_idx, image_size = self._captured
        self._captured = None
        shapes = [tuple(x.shape) for x in levels]
        measure = self.memory and shapes != self._peak_shapes
        report = time_lgd_ops(levels, boxes, batch_idx, image_size, model.teacher.backend,
                              self.repeats, memory=measure)
        if measure:
            self._peaks = {op: {k: r[k] for k in ("peak_mb", "ref_peak_mb")} for op, r in report.items()}
            self._peak_shapes = shapes
        for op, r in report.items():
            r.update(self._peaks.get(op, {}))
            for key in ("ms", "ref_ms", "speedup", "peak_mb", "ref_peak_mb"):
                if key in r:
                    storage.put_scalar(f"op_report/{op}_{key}", r[key], smoothing_hint=False)
        storage.put_scalar("op_report/lgd_fwd_ms", self._lgd_ms, smoothing_hint=False)
        storage.put_scalar("op_report/step_ms", step_ms, smoothing_hint=False)
        storage.put_scalar("op_report/lgd_fwd_share", self._lgd_ms / step_ms if step_ms else 0.0,
                           smoothing_hint=False)
        shapes = " ".join(f"{h}x{w}" for _, _, h, w in shapes)
        lines = [f"LGD op report, iter {self.trainer.iter}: B={levels[0].shape[0]} C={levels[0].shape[1]} "
                 f"levels {shapes}, {boxes.shape[0]} objects (context included), fwd+bwd medians of {self.repeats}",
                 f"{'op':16s}{'backend':>10s}{'ms':>10s}{'ref ms':>10s}{'speedup':>9s}{'peak MB':>10s}{'ref MB':>10s}"]
        lines += [f"{op:16s}{r['backend']:>10s}{r['ms']:10.2f}{r['ref_ms']:10.2f}{r['speedup']:8.2f}x"
                  f"{r.get('peak_mb', float('nan')):10.1f}{r.get('ref_peak_mb', float('nan')):10.1f}"
                  for op, r in report.items()]
        lines.append(f"LGD forward {self._lgd_ms:.1f} ms of a {step_ms:.1f} ms step "
                     f"({100 * self._lgd_ms / max(step_ms, 1e-9):.1f} %, forwards only); LGD saved "
                     f"{saved.lgd / 2**20:.1f} MB of the step's {saved.total / 2**20:.1f} MB of activations "
                     f"({100 * saved.lgd / max(saved.total, 1):.1f} %)")
        logger.info("\n".join(lines))
