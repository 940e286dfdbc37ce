"""Training-step time, peak memory and a per-component breakdown: baseline vs LGD (reference ops) vs LGD (fused ops).

Variants, each built from the project's LGD config of the detector (lgd/configs/<detector>_R_50_FPN_1x_lgd.py,
its `model` instantiated, no weights loaded), trained with plain SGD steps (zero_grad, sum of losses, backward,
step) on one synthetic batch (random images, `--objects` random boxes and classes per image):
  baseline       the plain detector (LGDDistiller(...).detector trained alone; lgd.engine.optim.build_sgd)
  lgd_reference  LGDDistiller, lgd_ops backend "reference", student + teacher (lgd.engine.optim.build_lgd_optimizer)
  lgd_fused      LGDDistiller, lgd_ops backend "auto" (the compiled kernels for the device)
each in the modes (--modes) fp32 (fp32, NCHW) and fast (lgd-train --fast, lgd.engine.trainer's fast path: autocast
bf16, or fp16 with loss scaling on a GPU without bf16, or fp32 on a CPU without native bf16; model and images in
channels_last; the precision column says what ran). Ratios are to the fp32 baseline and to the baseline of the
same mode; the targets table checks the fast path's goals (LGD fast step <= 0.6x the fp32 baseline step and
<= 0.3x the fp32 LGD step; LGD's extra peak memory fast <= 0.6x fp32). "teacher copies" counts the dtype/layout
copies (aten::copy_/to/_to_copy/contiguous/clone, outermost) inside the teacher's forward, with their CPU time.
LGD runs with distillation on and the backbone unfrozen (the cost after the warm-up). The learning rate is 0:
the optimizer does all its work but the weights stay put, so random-weight models cannot diverge mid-benchmark.
The detector list is data-driven (DETECTORS); a detector whose config is missing, whose model fails to build, or
that LGDDistiller does not support yet is skipped with a message.

Each (detector, variant) runs in a fresh child process: one warm-up step, `--iters` timed steps (median,
20th/80th percentiles; on CPU with bench_ops' steady glibc settings), one step for peak memory, then one step
under torch.profiler for the breakdown. Peak memory = peak beyond the memory held between steps (weights,
gradients, optimizer state): the CUDA allocator's peak, or on CPU the growth of the resident high-water mark
(VmHWM) over one step after glibc is switched (mallopt) to mmap every block over 64 KiB and free memory is
trimmed, so the resident size follows the live allocations.
Breakdown (profiled step, torch.profiler.record_function ranges put around the components from outside, by
wrapping their forward methods): backbone, label encoder, appearance projection, box_pool, relation attention,
box_fill, mapper convs (G + F_ref), student head+loss, instructive head+loss (the second call of the distiller's
detector-family losses hook), distill adapter, normalized_mse, forward_other (the rest of the forward: the
baseline's head and losses, anchors, matching, preprocessing), backward (all of it), optimizer steps. Component
times are forward times (CPU time of the range; CUDA kernel time too on GPU); backward is one total.

Outputs under --out: train_<device>.csv (detector, variant, metric, p20, p50, p80, device, torch, commit, ...),
.json, .md (step table with ratios to the baseline, and breakdown table) and train_<device>.png.

--methods NAME ... (lgd.methods.method_names()) replaces the variants by training methods, for the cost table (the LGD
paper's Table 7): each method's runs are built as lgd-train builds them (lgd.tools.train_net.build_model on the
detector's LGD config with lgd.method=NAME and --overrides, train.device and train.amp.enabled of the mode;
build_optimizer with optimizer.lr 0): its stage runs (lgd.tools.train_net.method_stages, recursively: a stage's
own stages first), e.g. FGFI's teacher (a baseline run), LabelEnc's step 1, BAN's generations 1..n-1, and its
main run. Each run is timed in its own child process as above (warm-up, --iters steps, peak memory; no breakdown)
after random-weight checkpoints of the runs before it are written in lgd-train's format into a temporary OUTPUT
(method.build loads them; speed and memory do not depend on the weights). A method's total cost = sum over its
runs of the median step time x the run's train.max_iter (the config's 1x schedule; a stage's own count, e.g.
lgd.labelenc.step1_iters), and its ratio to the baseline's total (when 'baseline' is among the methods). Each run
also reports held MB (parameters, buffers, gradients, optimizer state: what peak memory leaves out). A method
that cannot be built for a detector (tf-KD on RetinaNet) is a row saying why. Steps run as the steady state:
every loss on (LGD's distillation, LabelEnc's loss window), the backbone unfrozen; the methods' hooks are not run.
Outputs: methods_<device>.csv (per run step_ms, peak_mb, held_mb, cost_h; per method run "total": total_h,
vs_baseline), .json, .md (cost table and runs table) and methods_<device>.png (total cost per method, stacked by
run).

  python benchmarks/bench_train.py                                  # RetinaNet/FCOS/Faster R-CNN R50, 2 x 256x320
  python benchmarks/bench_train.py --detectors retinanet --image 512 640 --objects 20 --iters 5
  lgd-bench train --detectors retinanet --image 384 512 --modes fp32 fast --threads 2 --out benchmarks/results/x
  lgd-bench train --detectors retinanet faster_rcnn --methods baseline lgd fgfi labelenc dml ban tfkd --modes fast
"""
import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import (STEADY_MALLOC, ArgumentParser, device_name, git_commit, triton_version,  # noqa: E402
                       write_outputs)

from lgd.methods import method_names  # noqa: E402
from lgd_ops.benchmark import proc_status_kib, reset_peak_rss  # noqa: E402

DETECTORS = {
    "retinanet": "lgd/configs/retinanet_R_50_FPN_1x_lgd.py",
    "fcos": "lgd/configs/fcos_R_50_FPN_1x_lgd.py",
    "faster_rcnn": "lgd/configs/faster_rcnn_R_50_FPN_1x_lgd.py",
}
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
VARIANTS = {"baseline": None, "lgd_reference": "reference", "lgd_fused": "auto"}
# precision x memory format (lgd.engine.trainer's fast path): fp32 NCHW, or autocast bf16 (fp16 + GradScaler on
# a GPU without bf16; fp32 with a note on a CPU without native bf16) with the model and inputs in channels_last
MODES = {"fp32": dict(amp_enabled=False), "fast": dict(amp_enabled=True, precision="bf16")}
COPY_OPS = ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone")
MAIN = "main"  # the method's own run, beside its stage runs
COMPONENTS = ("backbone", "label_encoder", "appearance_proj", "box_pool", "relation_attention", "box_fill",
              "mapper_convs", "student_head_loss", "instructive_head_loss", "distill_adapter", "normalized_mse",
              "forward_other", "backward", "optimizer")


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
        adapter, losses, calls = model.detector_adapter, model.detector_adapter.losses, []

        def counted(*args, **kwargs):  # first call: the student's features, second: the instructive ones
            calls.append(None)
            name = "student_head_loss" if len(calls) % 2 else "instructive_head_loss"
            with torch.profiler.record_function(name):
                return losses(*args, **kwargs)
        adapter.losses = counted
    for name, module in modules.items():
        module.forward = _ranged(module.forward, name)
    model.forward = _ranged(model.forward, "forward_total")


def build(detector, variant, device, mode="fp32"):
    """(model, optimizer) of one variant; raises ValueError with the reason when it cannot be built."""
    from detectron2.config import LazyConfig, instantiate

    from lgd.modeling.distiller import LGDDistiller
    from lgd.engine.optim import build_lgd_optimizer, build_sgd

    path = os.path.join(ROOT, DETECTORS[detector])
    if not os.path.isfile(path):
        raise ValueError(f"no config {DETECTORS[detector]}")
    cfg = LazyConfig.load(path)
    torch.manual_seed(0)
    lgd_model = LGDDistiller(instantiate(cfg.model), backend=VARIANTS[variant] or "auto")
    if VARIANTS[variant] is None:
        model = lgd_model.detector
        optimizer = build_sgd(model, lr=0.0)
    else:
        model = lgd_model
        optimizer = build_lgd_optimizer(model, lr=0.0)
    from lgd.engine.trainer import resolve_fast_path, use_channels_last

    fast = resolve_fast_path(device=device, **MODES[mode])
    model = model.to(device).train()
    if fast.channels_last:
        model = use_channels_last(model)
    return model, optimizer, lgd_model.teacher.label_encoder.num_classes, fast


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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, iters, device):
    """One warm-up step (lazy init, gradients and optimizer state allocated), then `iters` timed steps (ms)."""
    step()
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def percentiles(times):
    """(p20, median, p80) of the step times."""
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return q[0], statistics.median(times), q[3]


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
        _sync(device)
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


def method_config(detector, method, mode, device, overrides=(), output_dir="bench_train_methods"):
    """The detector's LGD config as lgd-train runs it with lgd.method=method (after `overrides`, lgd-train's
    key=value syntax) in `mode` on `device`, writing into output_dir (where its stages' checkpoints are looked
    for); optimizer.lr 0, as for the variants."""
    from lgd.config import load_config

    path = os.path.join(ROOT, DETECTORS[detector])
    if not os.path.isfile(path):
        raise ValueError(f"no config {DETECTORS[detector]}")
    cfg = load_config(path, overrides)
    cfg.lgd.method = method
    cfg.train.device, cfg.train.output_dir, cfg.optimizer.lr = str(device), output_dir, 0.0
    cfg.train.amp.enabled = MODES[mode]["amp_enabled"]
    cfg.train.amp.precision = MODES[mode].get("precision", cfg.train.amp.get("precision", "bf16"))
    return cfg


def stage_runs(cfg, prefix=""):
    """[(path, config)] of every stage run the method of cfg needs, in lgd-train's order: each stage after its
    own stages (path "stage/its_stage"), each config with lgd-train's train.output_dir (OUTPUT/<stage>)."""
    from lgd.methods import build_method
    from lgd.runner import method_stages

    runs = []
    for stage, stage_cfg in method_stages(cfg, build_method(cfg)):
        runs += stage_runs(stage_cfg, f"{prefix}{stage.name}/") + [(prefix + stage.name, stage_cfg)]
    return runs


def method_plan(detector, method, overrides=()):
    """[(run, iterations)] of one method's training: its stage runs (stage_runs), then MAIN, each with its
    config's train.max_iter. Raises (ValueError, UsageError) when the method or a stage cannot be configured."""
    cfg = method_config(detector, method, "fp32", "cpu", overrides)
    return [(path, int(c.train.max_iter)) for path, c in stage_runs(cfg)] + [(MAIN, int(cfg.train.max_iter))]


def write_random_checkpoint(cfg):
    """A freshly built (random-weight) model of the run cfg saved as its final checkpoint, in lgd-train's
    checkpointer format (OUTPUT/model_final.pth, the student's EMA normalizer beside it): what a later run's
    method.build loads in place of a trained stage. Speed and memory do not depend on the weights."""
    from lgd.engine.checkpoint import AtomicCheckpointer, DetectorEMAState, student_module
    from lgd.runner import build_model

    model = build_model(cfg)
    os.makedirs(cfg.train.output_dir, exist_ok=True)
    AtomicCheckpointer(model, cfg.train.output_dir, detector_ema=DetectorEMAState(student_module(model))).save(
        "model_final")


def held_bytes(model, optimizer):
    """Bytes held between steps: parameters, buffers, gradients and optimizer state (what peak_mb leaves out)."""
    tensors = [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters() if p.grad is not None),
               *(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def method_child(detector, method, run, device, batch, image, objects, iters, mode, overrides=()):
    """Times one run of a method's training (a stage run's path, or MAIN) as lgd-train builds it
    (lgd.tools.train_net.build_model and build_optimizer), after writing random-weight checkpoints of the
    stage runs before it into a temporary OUTPUT. Returns its result dict (or {"skipped": reason})."""
    from lgd.engine.checkpoint import student_module
    from lgd.methods import build_method
    from lgd.modeling.detector_adapters import build_detector_adapter
    from lgd.runner import build_model, build_optimizer, fast_path

    device = torch.device(device)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as output_dir:
        try:
            cfg = method_config(detector, method, mode, device, overrides, output_dir)
            runs = stage_runs(cfg) + [(MAIN, cfg)]
            index = [path for path, _ in runs].index(run)
            for _, earlier in runs[:index]:
                write_random_checkpoint(earlier)
            cfg = runs[index][1]
            torch.manual_seed(0)
            model = build_model(cfg).train()
            optimizer = build_optimizer(cfg, model, build_method(cfg))
            num_classes = build_detector_adapter(student_module(model)).num_classes
        except Exception as exc:  # the method does not support the detector, a stage fails, ...: skip, say why
            return {"skipped": f"{type(exc).__name__}: {exc}"}
    fast = fast_path(cfg, device)
    step = train_step(model, optimizer, fast, make_batch(batch, image, objects, num_classes), device)
    times = time_steps(step, iters, device)
    held = held_bytes(model, optimizer)
    peak = peak_step_bytes(step, device)  # last: on CPU it leaves glibc in its mmap-everything mode
    return {"step_ms": percentiles(times), "peak_mb": max(peak, 0) / 2**20, "held_mb": held / 2**20,
            "precision": fast.describe()}


def run_child(child_args, args):
    """Runs this script with child_args (["--child", detector, variant, mode] or ["--child-method", detector,
    method, mode, run]) and the run's settings in a fresh process; returns its result dict."""
    env = dict(os.environ, **(STEADY_MALLOC if args.device == "cpu" else {}))
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, os.path.abspath(__file__), *child_args, "--device", args.device,
           "--batch", str(args.batch), "--image", *map(str, args.image), "--objects", str(args.objects),
           "--iters", str(args.iters), "--threads", str(args.threads)]
    if args.overrides:
        cmd += ["--overrides", *args.overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"skipped": f"child failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv=None, prog=None):
    parser = ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", nargs="+", choices=sorted(DETECTORS), default=list(DETECTORS))
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                      help=f"the step comparison and its breakdown (default: {' '.join(VARIANTS)})")
    runs.add_argument("--methods", nargs="+", choices=method_names(), default=None,
                      help="training methods (lgd.method) as lgd-train builds them, their stages included: the cost "
                           "table (step time, peak memory, total cost of the config's schedule; ratios to "
                           "'baseline' when it is among them) instead of the variants")
    parser.add_argument("--overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="with --methods: lgd-train's key=value overrides of every detector's config, e.g. "
                             "+lgd.ban.generations=3 +lgd.labelenc.step1_iters=120000")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                        help="precision x memory format: fp32 (fp32 NCHW) and/or fast (lgd-train --fast: "
                             "train.amp.enabled with train.amp.precision=bf16 and channels_last)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2, help="images per step")
    parser.add_argument("--image", type=int, nargs=2, default=[256, 320], metavar=("H", "W"))
    parser.add_argument("--objects", type=int, default=7, help="objects per image (COCO's mean is ~7)")
    parser.add_argument("--iters", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); 1 is steadier on a shared machine")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--child", nargs=3, metavar=("DETECTOR", "VARIANT", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--child-method", nargs=4, metavar=("DETECTOR", "METHOD", "MODE", "RUN"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.overrides and args.methods is None and args.child_method is None:
        parser.error("--overrides needs --methods (the variants are built from the configs as they are)")
    if args.methods is None and args.variants is None:
        args.variants = list(VARIANTS)
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    for name in ("batch", "objects", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.image) < 32:
        parser.error(f"--image must be at least 32 x 32, got {args.image}")
    return args


def _case(variant, mode):
    return variant if mode == "fp32" else f"{variant} {mode}"


def targets(variants):
    """The fast path's targets (issue 15) from one detector's results, as (name, value, bound) rows:
    LGD fused fast step / fp32 baseline step, / fp32 LGD fused step, and LGD's extra peak memory (vs the
    baseline of the same mode) fast / fp32."""
    def get(var, mode, key):
        r = variants.get(_case(var, mode), {})
        return r[key][1] if key == "step_ms" and key in r else r.get(key)

    rows = []
    fast, base, lgd = get("lgd_fused", "fast", "step_ms"), get("baseline", "fp32", "step_ms"), \
        get("lgd_fused", "fp32", "step_ms")
    if fast and base:
        rows.append(("LGD fast step / fp32 baseline step", fast / base, 0.6))
    if fast and lgd:
        rows.append(("LGD fast step / fp32 LGD step", fast / lgd, 0.3))
    extra = {m: (get("lgd_fused", m, "peak_mb"), get("baseline", m, "peak_mb")) for m in ("fast", "fp32")}
    if all(a is not None and b is not None for a, b in extra.values()) and extra["fp32"][0] > extra["fp32"][1]:
        rows.append(("LGD extra peak MB fast / fp32", (extra["fast"][0] - extra["fast"][1])
                     / (extra["fp32"][0] - extra["fp32"][1]), 0.6))
    return rows


def tables(results, stamp, args):
    """The step table (time, peak memory, ratios to the fp32 baseline and to the same mode's baseline), the
    targets and the breakdown table, as markdown."""
    lines = [f"LGD training step, {stamp['device']}, torch {stamp['torch']}, commit {stamp['commit']}, "
             f"{stamp['date']}, {stamp['threads']} threads, load {stamp.get('load', '-')}: batch {args.batch} x "
             f"{args.image[0]}x{args.image[1]}, {args.objects} objects/image, median of {args.iters} steps (p20-p80); "
             "peak = memory beyond weights, grads and optimizer state. fast = lgd-train --fast (see precision).", "",
             "| detector | variant | precision | step ms (p20-p80) | vs fp32 baseline | vs baseline (same mode) "
             "| peak MB | + MB vs baseline (same mode) | teacher copies (ms) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    skipped = []
    for det, variants in results.items():
        base32 = variants.get("baseline", {})
        for case, r in variants.items():
            if "skipped" in r:
                skipped.append(f"- {det} / {case}: skipped ({r['skipped']})")
                continue
            mode = case.split(" ")[1] if " " in case else "fp32"
            base = variants.get(_case("baseline", mode), {})
            lo, mid, hi = r["step_ms"]
            ratio32 = f"{mid / base32['step_ms'][1]:.2f}x" if "step_ms" in base32 else "-"
            ratio = f"{mid / base['step_ms'][1]:.2f}x" if "step_ms" in base else "-"
            extra = f"{r['peak_mb'] - base['peak_mb']:+.0f}" if "peak_mb" in base else "-"
            copies = f"{r['teacher_copies']} ({r['teacher_copy_ms']:.1f})" if "teacher_copies" in r and \
                not case.startswith("baseline") else "-"
            lines.append(f"| {det} | {case} | {r.get('precision', '-')} | {mid:.0f} ({lo:.0f}-{hi:.0f}) | {ratio32} | "
                         f"{ratio} | {r['peak_mb']:.0f} | {extra} | {copies} |")
    target_rows = [(det, *row) for det, variants in results.items() for row in targets(variants)]
    if target_rows:
        lines += ["", "Targets of the fast path (LGD with the fused ops):", "", "| detector | ratio | value | target | met |",
                  "|---|---|---:|---:|---|"]
        lines += [f"| {det} | {name} | {value:.2f} | <= {bound} | {'yes' if value <= bound else 'no'} |"
                  for det, name, value, bound in target_rows]
    lines += ["", "Breakdown of one profiled step (ms: forward of each component; backward and optimizer in total):",
              "",
              "| detector | variant | " + " | ".join(COMPONENTS) + " |", "|---|---|" + "---:|" * len(COMPONENTS)]
    for det, variants in results.items():
        for var, r in variants.items():
            if "breakdown" in r:
                lines.append(f"| {det} | {var} | " + " | ".join(
                    f"{r['breakdown'][c]:.1f}" if c in r["breakdown"] else "-" for c in COMPONENTS) + " |")
    return "\n".join(lines + ([""] + skipped if skipped else []))


def plot(results, path):
    """One stacked bar per (detector, variant): the components' ms of the profiled step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{d}\n{v}", r["breakdown"]) for d, vs in results.items() for v, r in vs.items() if "breakdown" in r]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(bars), 5))
    bottom = [0.0] * len(bars)
    cmap = plt.get_cmap("tab20")
    for i, comp in enumerate(COMPONENTS):
        values = [b.get(comp, 0.0) for _, b in bars]
        if any(values):
            ax.bar(range(len(bars)), values, bottom=bottom, label=comp, color=cmap(i))
            bottom = [x + y for x, y in zip(bottom, values)]
    ax.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=8)
    ax.set_ylabel("ms (profiled step)")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def add_totals(methods):
    """Adds each method's total_h (the sum of its runs' cost_h: stage runs and MAIN) and vs_baseline (total_h /
    the baseline's, None without a measured baseline) to {method: entry} of one detector and mode."""
    for entry in methods.values():
        if "runs" in entry:
            entry["total_h"] = sum(r["cost_h"] for r in entry["runs"].values())
    base = methods.get("baseline", {}).get("total_h")
    for entry in methods.values():
        if "total_h" in entry:
            entry["vs_baseline"] = entry["total_h"] / base if base else None


def method_cases(args):
    """({detector: {mode: {method: entry}}}, [(detector, mode, method, run, iterations)] to time): a method
    whose stages cannot be configured is an entry {"skipped": why}; each method's MAIN run comes first, so a
    method the detector does not support is found before its stages are timed."""
    results, cases = {}, []
    for det in args.detectors:
        for method in args.methods:
            try:
                plan = method_plan(det, method, args.overrides)
            except Exception as exc:  # a bad setting, a missing config: the row says why
                plan, reason = None, f"{type(exc).__name__}: {exc}"
            for mode in args.modes:
                results.setdefault(det, {}).setdefault(mode, {})[method] = (
                    {"runs": {}, "plan": dict(plan)} if plan else {"skipped": reason})
                if plan:
                    cases += [(det, mode, method, run, iters) for run, iters in plan[-1:] + plan[:-1]]
    return results, cases


def run_methods(args, stamp, device):
    """The cost table of --methods (module docstring); writes methods_<device>.*."""
    from tqdm import tqdm

    results, cases = method_cases(args)
    for det, mode, method, run, iters in tqdm(cases, desc="bench_train methods", file=sys.stderr):
        entry = results[det][mode][method]
        if "skipped" in entry:  # an earlier run of this method could not be built
            continue
        r = run_child(["--child-method", det, method, mode, run], args)
        if "skipped" in r:
            reason = r["skipped"] if run == MAIN else f"stage run {run}: {r['skipped']}"
            results[det][mode][method] = {"skipped": reason}
            print(f"  {det} / {mode} / {method}: not built ({reason})", flush=True)
            continue
        entry["runs"][run] = dict(r, iterations=iters, cost_h=r["step_ms"][1] * iters / 3.6e6)
        print(f"  {det} / {mode} / {method} / {run}: step {r['step_ms'][1]:.0f} ms, peak {r['peak_mb']:.0f} MB, "
              f"held {r['held_mb']:.0f} MB ({r['precision']}), load {os.getloadavg()[0]:.2f}", flush=True)
    for det in results.values():
        for methods in det.values():
            for entry in methods.values():
                if "runs" in entry:  # stage runs in lgd-train's order, then the main run
                    entry["runs"] = {run: entry["runs"][run] for run in entry.pop("plan")}
            add_totals(methods)
    stamp["load_end"] = "/".join(f"{x:.2f}" for x in os.getloadavg())
    table = method_tables(results, stamp, args)
    print("\n" + table)
    base = os.path.join(args.out, f"methods_{device.type}")
    write_outputs(base, method_rows(results, stamp, args), {"stamp": stamp, "args": vars(args), "results": results},
                  table)
    png = plot_costs(results, base + ".png")
    print(f"\nwrote {base}.csv, .json, .md" + (f", {os.path.basename(png)}" if png else ""))
    return results


def method_rows(results, stamp, args):
    """The CSV rows (long format): per run step_ms (p20/p50/p80), peak_mb, held_mb and cost_h; per method
    (run "total") cost_h and vs_baseline."""
    rows = []
    for det, modes in results.items():
        for mode, methods in modes.items():
            for method, entry in methods.items():
                if "runs" not in entry:
                    continue
                key = dict(detector=det, method=method, mode=mode, batch=args.batch,
                           image=f"{args.image[0]}x{args.image[1]}", objects=args.objects)
                for run, r in entry["runs"].items():
                    run_key = dict(key, run=run, precision=r["precision"], iterations=r["iterations"])
                    rows.append(dict(run_key, metric="step_ms", p20=r["step_ms"][0], p50=r["step_ms"][1],
                                     p80=r["step_ms"][2], **stamp))
                    rows += [dict(run_key, metric=m, p20=r[m], p50=r[m], p80=r[m], **stamp)
                             for m in ("peak_mb", "held_mb", "cost_h")]
                total_key = dict(key, run="total", precision=entry["runs"][MAIN]["precision"],
                                 iterations=sum(r["iterations"] for r in entry["runs"].values()))
                rows += [dict(total_key, metric=m, p20=entry[m], p50=entry[m], p80=entry[m], **stamp)
                         for m in ("total_h", "vs_baseline") if entry[m] is not None]
    return rows


def method_tables(results, stamp, args):
    """The cost table (one row per detector, mode and method) and the runs table (every stage run), markdown."""
    lines = [f"Training cost per method, {stamp['device']}, torch {stamp['torch']}, commit {stamp['commit']}, "
             f"{stamp['date']}, {stamp['threads']} threads, load average {stamp['load']} at the start, "
             f"{stamp.get('load_end', '-')} at the end: batch {args.batch} x {args.image[0]}x{args.image[1]}, "
             f"{args.objects} objects/image, median of {args.iters} steps (p20-p80)"
             + (f", overrides {' '.join(args.overrides)}" if args.overrides else "") + ".",
             "Each run is built as lgd-train builds it; the stages' checkpoints are random weights (speed and "
             "memory do not depend on them). Cost = step time x the run's train.max_iter, summed over the stage "
             "runs and the main run: this machine's time for that many steps of this batch (compare the ratios). "
             "Peak = memory one step needs beyond the held MB (weights, buffers, gradients, optimizer state).", "",
             "| detector | mode | method | step ms (p20-p80) | vs baseline step | peak MB | held MB "
             "| stages: step ms x iterations | total cost h | vs baseline total |",
             "|---|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for det, modes in results.items():
        for mode, methods in modes.items():
            base = methods.get("baseline", {}).get("runs", {}).get(MAIN)
            for method, entry in methods.items():
                if "skipped" in entry:
                    lines.append(f"| {det} | {mode} | {method} | not built: {entry['skipped']} | - | - | - | - "
                                 "| - | - |")
                    continue
                main, stages = entry["runs"][MAIN], [(n, r) for n, r in entry["runs"].items() if n != MAIN]
                lo, mid, hi = main["step_ms"]
                ratio = f"{mid / base['step_ms'][1]:.2f}x" if base else "-"
                stage_text = "; ".join(f"{n} {r['step_ms'][1]:.0f} x {r['iterations']}" for n, r in stages) or "-"
                vs = f"{entry['vs_baseline']:.2f}x" if entry["vs_baseline"] is not None else "-"
                lines.append(f"| {det} | {mode} | {method} | {mid:.0f} ({lo:.0f}-{hi:.0f}) | {ratio} | "
                             f"{main['peak_mb']:.0f} | {main['held_mb']:.0f} | {stage_text} | "
                             f"{entry['total_h']:.1f} | {vs} |")
    lines += ["", "Every run (stage runs before the method's main run, in lgd-train's order):", "",
              "| detector | mode | method | run | precision | step ms (p20-p80) | peak MB | held MB | iterations "
              "| cost h |", "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for det, modes in results.items():
        for mode, methods in modes.items():
            for method, entry in methods.items():
                for run, r in entry.get("runs", {}).items():
                    lo, mid, hi = r["step_ms"]
                    lines.append(f"| {det} | {mode} | {method} | {run} | {r['precision']} | {mid:.0f} ({lo:.0f}-"
                                 f"{hi:.0f}) | {r['peak_mb']:.0f} | {r['held_mb']:.0f} | {r['iterations']} | "
                                 f"{r['cost_h']:.1f} |")
    return "\n".join(lines)


def plot_costs(results, path):
    """One bar per (detector, mode, method): its total cost in hours, stacked by run (stage runs, main run);
    a method that was not built is marked "not built"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{det}\n{mode}\n{method}", entry.get("runs")) for det, modes in results.items()
            for mode, methods in modes.items() for method, entry in methods.items()]
    if not bars:
        return None
    names = [MAIN] + sorted({run for _, runs in bars if runs for run in runs} - {MAIN})
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    fig, ax = plt.subplots(figsize=(2 + 0.9 * len(bars), 5))
    labelled = set()
    for i, (_, runs) in enumerate(bars):
        if runs is None:
            ax.text(i, 0, "not built", rotation=90, ha="center", va="bottom", fontsize=8)
            continue
        bottom = 0.0
        for run, r in runs.items():
            label = None if run in labelled else ("main run" if run == MAIN else f"stage {run}")
            labelled.add(run)
            ax.bar(i, r["cost_h"], bottom=bottom, color=colors[run], label=label)
            bottom += r["cost_h"]
    ax.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=7)
    ax.set_ylabel("total training cost, h (step time x iterations)")
    if labelled:
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run_variants(args, stamp, device):
    """The variants' step comparison and breakdown (module docstring); writes train_<device>.*."""
    from tqdm import tqdm

    results, rows = {}, []
    cases = [(d, v, m) for d in args.detectors for m in args.modes for v in args.variants]
    for det, var, mode in tqdm(cases, desc="bench_train", file=sys.stderr):
        r = run_child(["--child", det, var, mode], args)
        case = _case(var, mode)
        results.setdefault(det, {})[case] = r
        if "skipped" in r:
            print(f"  {det} / {case}: skipped ({r['skipped']})", flush=True)
            continue
        print(f"  {det} / {case}: step {r['step_ms'][1]:.0f} ms, peak {r['peak_mb']:.0f} MB ({r['precision']}), "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
        key = dict(detector=det, variant=var, mode=mode, precision=r["precision"], batch=args.batch,
                   image=f"{args.image[0]}x{args.image[1]}", objects=args.objects)
        rows.append(dict(key, metric="step_ms", p20=r["step_ms"][0], p50=r["step_ms"][1], p80=r["step_ms"][2], **stamp))
        rows.append(dict(key, metric="peak_mb", p20=r["peak_mb"], p50=r["peak_mb"], p80=r["peak_mb"], **stamp))
        for comp, ms in r["breakdown"].items():
            rows.append(dict(key, metric=f"{comp}_ms", p20=ms, p50=ms, p80=ms, **stamp))
        for metric in ("teacher_copies", "teacher_copy_ms"):
            rows.append(dict(key, metric=metric, p20=r[metric], p50=r[metric], p80=r[metric], **stamp))
    table = tables(results, stamp, args)
    print("\n" + table)
    base = os.path.join(args.out, f"train_{device.type}")
    write_outputs(base, rows, {"stamp": stamp, "args": vars(args), "results": results}, table)
    png = plot(results, base + ".png")
    print(f"\nwrote {base}.csv, .json, .md" + (f", {os.path.basename(png)}" if png else ""))
    return results


def main(argv=None, prog=None):
    args = parse_args(sys.argv[1:] if argv is None else argv, prog)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        det, var, mode = args.child
        print(json.dumps(child(det, var, args.device, args.batch, tuple(args.image), args.objects, args.iters, mode)))
        return None
    if args.child_method:
        det, method, mode, run = args.child_method
        print(json.dumps(method_child(det, method, run, args.device, args.batch, tuple(args.image), args.objects,
                                      args.iters, mode, args.overrides)))
        return None
    device = torch.device(args.device)
    stamp = {"device": device_name(device), "torch": torch.__version__, "triton": triton_version(),
             "commit": git_commit(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M"),
             "load": "/".join(f"{x:.2f}" for x in os.getloadavg())}
    print(f"# LGD training-step benchmark: {stamp}", flush=True)
    return run_methods(args, stamp, device) if args.methods else run_variants(args, stamp, device)


if __name__ == "__main__":
    main()
