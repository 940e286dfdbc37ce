"""One LGD training step measured: the synthetic batch, the step as lgd's trainer runs it, its time, peak memory
and a per-component breakdown under torch.profiler. Shared by the variants (lgd.benchmarks.train) and the
methods' cost table (lgd.benchmarks.methods)."""
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import lgd
from lgd_ops.benchmark import STEADY_MALLOC, proc_status_kib, reset_peak_rss, sync

__all__ = ["COMPONENTS", "DETECTORS", "MODES", "child", "held_bytes", "make_batch", "peak_step_bytes", "percentiles",
           "run_child", "run_config", "time_steps", "train_step"]

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(lgd.__file__)), "configs")
DETECTORS = {name: os.path.join(CONFIG_DIR, f"{name}_R_50_FPN_1x_lgd.py")
             for name in ("retinanet", "fcos", "faster_rcnn")}
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
# the variants of the step comparison: (lgd.method, lgd_ops backend)
VARIANTS = {"baseline": ("baseline", "auto"), "lgd_reference": ("lgd", "reference"), "lgd_fused": ("lgd", "auto")}
# precision x memory format: fp32 NCHW, or the fast path (train.amp.enabled: autocast bf16 and channels_last)
MODES = {"fp32": dict(amp_enabled=False), "fast": dict(amp_enabled=True, precision="bf16")}
COPY_OPS = ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone")
COMPONENTS = ("backbone", "label_encoder", "appearance_proj", "box_pool", "relation_attention", "box_fill",
              "mapper_convs", "student_head_loss", "instructive_head_loss", "distill_adapter", "normalized_mse",
              "forward_other", "backward", "optimizer")


def run_config(detector, method, mode, device, overrides=(), output_dir="bench_train"):
    """The detector's LGD config as lgd-train runs it with lgd.method=method (after lgd-train's key=value
    `overrides`) in `mode` on `device`, writing into output_dir (where its stages' checkpoints are looked for),
    with optimizer.lr 0: the optimizer does all its work but random weights cannot diverge mid-benchmark."""
    from lgd.config import load_config

    cfg = load_config(DETECTORS[detector], overrides)
    cfg.lgd.method = method
    cfg.train.device, cfg.train.output_dir, cfg.optimizer.lr = str(device), output_dir, 0.0
    cfg.train.amp.enabled = MODES[mode]["amp_enabled"]
    cfg.train.amp.precision = MODES[mode].get("precision", cfg.train.amp.get("precision", "bf16"))
    return cfg


def make_batch(batch, image_size, objects, num_classes, seed=0):
    """detectron2 training inputs: random images and `objects` random boxes (8 px to half the image) each."""
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    h, w = image_size
    inputs = []
    for _ in range(batch):
        size = torch.exp(torch.empty(objects, 2).uniform_(2.0, float(torch.tensor(min(h, w) / 2).log()), generator=g))
        corner = torch.rand(objects, 2, generator=g) * (torch.tensor([w, h]) - size)
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([corner, corner + size], 1))
        inst.gt_classes = torch.randint(0, num_classes, (objects,), generator=g)
        inputs.append({"image": torch.rand(3, h, w, generator=g) * 255, "instances": inst, "height": h, "width": w})
    return inputs


def _ranged(fn, name):
    """fn wrapped in a torch.profiler.record_function range called `name`."""
    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)
    return wrapped


def instrument(model):
    """Puts record_function ranges around the components (module docstring). Patches this process only."""
    import lgd_ops

    for op in ("box_pool", "box_fill", "normalized_mse"):
        setattr(lgd_ops, op, _ranged(getattr(lgd_ops, op), op))  # the lgd modules call lgd_ops.<op>(...)
    detector = getattr(model, "detector", model)
    modules = {"backbone": detector.backbone}
    if hasattr(model, "teacher"):
        t = model.teacher
        modules.update(label_encoder=t.label_encoder, appearance_proj=t.appearance_encoder.proj,
                       relation_attention=t.relation_adapter, distill_adapter=model.distill_loss.adapter)
        for name in ("spatial", "refine"):
            getattr(t.knowledge_mapper, name).forward = _ranged(getattr(t.knowledge_mapper, name).forward,
                                                                "mapper_convs")
        driver, losses, calls = model.detector_driver, model.detector_driver.losses, []

        def counted(*args, **kwargs):  # first call: the student's features, second: the instructive ones
            calls.append(None)
            name = "student_head_loss" if len(calls) % 2 else "instructive_head_loss"
            with torch.profiler.record_function(name):
                return losses(*args, **kwargs)
        driver.losses = counted
    for name, module in modules.items():
        module.forward = _ranged(module.forward, name)
    model.forward = _ranged(model.forward, "forward_total")


def build(detector, variant, device, mode="fp32"):
    """(model, optimizer, number of classes, fast path) of one variant, built by lgd.runner as lgd-train builds
    it; raises with the reason when it cannot be built."""
    from lgd.methods import build_method
    from lgd.modeling.detector_drivers import build_detector_driver
    from lgd.engine.checkpoint import student_module
    from lgd.runner import build_model, build_optimizer, fast_path

    name, backend = VARIANTS[variant]
    cfg = run_config(detector, name, mode, device)
    method = build_method(cfg, backend=backend)
    torch.manual_seed(0)
    model = build_model(cfg, method).train()
    optimizer = build_optimizer(cfg, model, method)
    return model, optimizer, build_detector_driver(student_module(model)).num_classes, fast_path(cfg, device)


def peak_step_bytes(step, device):
    """Peak memory one step() allocates beyond what is held between steps (module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_THRESHOLD, 65536)
    libc.mallopt(M_TRIM_THRESHOLD, 0)
    libc.malloc_trim(0)
    reset_peak_rss()
    base = proc_status_kib("VmRSS")
    step()
    return (proc_status_kib("VmHWM") - base) * 1024


def teacher_copies(prof):
    """(count, CPU ms) of the layout/dtype copies (COPY_OPS, outermost only) the profiled step ran inside the
    teacher's forward (the `teacher` range)."""
    count, us = 0, 0.0
    for event in prof.events():
        if event.name not in COPY_OPS:
            continue
        parents, parent = [], event.cpu_parent
        while parent is not None:
            parents.append(parent.name)
            parent = parent.cpu_parent
        if "teacher" in parents and not any(name in COPY_OPS for name in parents):
            count += 1
            us += event.cpu_time_total
    return count, us / 1e3


def train_step(model, optimizer, fast, inputs, device):
    """One training step of lgd.engine.trainer.AMPTrainer.run_step's order (a GradScaler only for fp16)."""
    from detectron2.utils.events import EventStorage

    def step():
        optimizer.zero_grad(set_to_none=True)
        with EventStorage(0), torch.autocast(device.type, dtype=fast.dtype, enabled=fast.dtype is not None):
            losses = model(inputs)
        with torch.profiler.record_function("backward"):
            total = sum(v.float() for v in losses.values())
            (total * 1024.0 if fast.grad_scaler else total).backward()
        with torch.profiler.record_function("optimizer"):
            optimizer.step()
    return step


def time_steps(step, iters, device):
    """One warm-up step (lazy init, gradients and optimizer state allocated), then `iters` timed steps (ms)."""
    step()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def percentiles(times):
    """(p20, median, p80) of the step times."""
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return q[0], statistics.median(times), q[3]


def held_bytes(model, optimizer):
    """Bytes held between steps: parameters, buffers, gradients and optimizer state (what peak_mb leaves out)."""
    tensors = [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters() if p.grad is not None),
               *(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def child(detector, variant, device, batch, image, objects, iters, mode="fp32"):
    """Runs one (detector, variant, mode) and returns its result dict (or {"skipped": reason})."""
    device = torch.device(device)
    try:
        model, optimizer, num_classes, fast = build(detector, variant, device, mode)
    except Exception as exc:  # a missing config, a build failure or an unsupported detector: skip, say why
        return {"skipped": f"{type(exc).__name__}: {exc}"}
    step = train_step(model, optimizer, fast, make_batch(batch, image, objects, num_classes), device)
    times = time_steps(step, iters, device)
    instrument(model)
    if hasattr(model, "teacher"):
        model.teacher.forward = _ranged(model.teacher.forward, "teacher")
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        step()
        sync(device)
    totals, forward_total_ms = {}, 0.0
    for event in prof.key_averages():
        if event.key == "forward_total":
            forward_total_ms = event.cpu_time_total / 1e3
        if event.key in COMPONENTS:
            us = event.cpu_time_total if device.type == "cpu" else max(event.cpu_time_total,
                                                                       getattr(event, "device_time_total", 0))
            totals[event.key] = us / 1e3
    forward = [c for c in COMPONENTS if c not in ("backward", "optimizer", "forward_other")]
    totals["forward_other"] = max(forward_total_ms - sum(totals.get(c, 0.0) for c in forward), 0.0)
    copies, copy_ms = teacher_copies(prof)
    peak = peak_step_bytes(step, device)  # last: on CPU it leaves glibc in its mmap-everything mode
    return {"step_ms": percentiles(times), "peak_mb": max(peak, 0) / 2**20, "breakdown": totals,
            "precision": fast.describe(), "teacher_copies": copies, "teacher_copy_ms": copy_ms}


def run_child(child_args, args):
    """Runs lgd.benchmarks.train with child_args (["--child", detector, variant, mode] or ["--child-method", detector,
    method, mode, run]) and the run's settings in a fresh process; returns its result dict."""
    env = dict(os.environ, **(STEADY_MALLOC if args.device == "cpu" else {}))
    cmd = [sys.executable, "-m", "lgd.benchmarks.train", *child_args, "--device", args.device,
           "--batch", str(args.batch), "--image", *map(str, args.image), "--objects", str(args.objects),
           "--iters", str(args.iters), "--threads", str(args.threads)]
    if args.overrides:
        cmd += ["--overrides", *args.overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"skipped": f"child failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])
