"""Training-step time, peak memory and a per-component breakdown: baseline vs LGD (reference ops) vs LGD (fused ops).

Variants, each built from the project's LGD config of the detector (lgd/configs/<detector>_R_50_FPN_1x_lgd.py,
its `model` instantiated, no weights loaded), trained with plain SGD steps (zero_grad, sum of losses, backward,
step) on one synthetic batch (random images, `--objects` random boxes and classes per image):
  baseline       the plain detector (LGDDistiller(...).detector trained alone; lgd.engine.optim.build_sgd)
  lgd_reference  LGDDistiller, lgd_ops backend "reference", student + teacher (lgd.engine.optim.build_lgd_optimizer)
  lgd_fused      LGDDistiller, lgd_ops backend "auto" (the compiled kernels for the device)
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

  python benchmarks/bench_train.py                                  # RetinaNet/FCOS/Faster R-CNN R50, 2 x 256x320
  python benchmarks/bench_train.py --detectors retinanet --image 512 640 --objects 20 --iters 5
"""
import argparse
import csv
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import STEADY_MALLOC, ArgumentParser, device_name, git_commit, triton_version  # noqa: E402

DETECTORS = {
    "retinanet": "lgd/configs/retinanet_R_50_FPN_1x_lgd.py",
    "fcos": "lgd/configs/fcos_R_50_FPN_1x_lgd.py",
    "faster_rcnn": "lgd/configs/faster_rcnn_R_50_FPN_1x_lgd.py",
}
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
VARIANTS = {"baseline": None, "lgd_reference": "reference", "lgd_fused": "auto"}
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


def build(detector, variant, device):
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
    return model.to(device).train(), optimizer, lgd_model.teacher.label_encoder.num_classes


def _rss_kib(field):
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))


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
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    base = _rss_kib("VmRSS")
    step()
    return (_rss_kib("VmHWM") - base) * 1024


def child(detector, variant, device, batch, image, objects, iters):
    """Runs one (detector, variant) and returns its result dict (or {"skipped": reason})."""
    from detectron2.utils.events import EventStorage

    device = torch.device(device)
    try:
        model, optimizer, num_classes = build(detector, variant, device)
    except Exception as exc:  # a missing config, a build failure or an unsupported detector: skip, say why
        return {"skipped": f"{type(exc).__name__}: {exc}"}
    inputs = make_batch(batch, image, objects, num_classes)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with EventStorage(0):
            losses = model(inputs)
        with torch.profiler.record_function("backward"):
            sum(losses.values()).backward()
        with torch.profiler.record_function("optimizer"):
            optimizer.step()

    step()  # warm-up: lazy init, gradients and optimizer state allocated
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    instrument(model)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        step()
        sync()
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
    peak = peak_step_bytes(step, device)  # last: on CPU it leaves glibc in its mmap-everything mode
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return {"step_ms": (q[0], statistics.median(times), q[3]), "peak_mb": max(peak, 0) / 2**20, "breakdown": totals}


def run_child(detector, variant, args):
    env = dict(os.environ, **(STEADY_MALLOC if args.device == "cpu" else {}))
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, os.path.abspath(__file__), "--child", detector, variant, "--device", args.device,
           "--batch", str(args.batch), "--image", *map(str, args.image), "--objects", str(args.objects),
           "--iters", str(args.iters), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"skipped": f"child failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv=None, prog=None):
    parser = ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", nargs="+", choices=sorted(DETECTORS), default=list(DETECTORS))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2, help="images per step")
    parser.add_argument("--image", type=int, nargs=2, default=[256, 320], metavar=("H", "W"))
    parser.add_argument("--objects", type=int, default=7, help="objects per image (COCO's mean is ~7)")
    parser.add_argument("--iters", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); 1 is steadier on a shared machine")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--child", nargs=2, metavar=("DETECTOR", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    for name in ("batch", "objects", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.image) < 32:
        parser.error(f"--image must be at least 32 x 32, got {args.image}")
    return args


def tables(results, stamp, args):
    """The step table (time, peak memory, ratios to the baseline) and the breakdown table, as markdown."""
    lines = [f"LGD training step, {stamp['device']}, torch {stamp['torch']}, commit {stamp['commit']}, "
             f"{stamp['date']}: batch {args.batch} x {args.image[0]}x{args.image[1]}, {args.objects} objects/image, "
             f"median of {args.iters} steps (p20-p80); peak = memory beyond weights, grads and optimizer state.", "",
             "| detector | variant | step ms (p20-p80) | vs baseline | peak MB | + MB vs baseline |",
             "|---|---|---:|---:|---:|---:|"]
    skipped = []
    for det, variants in results.items():
        base = variants.get("baseline", {})
        for var, r in variants.items():
            if "skipped" in r:
                skipped.append(f"- {det} / {var}: skipped ({r['skipped']})")
                continue
            lo, mid, hi = r["step_ms"]
            ratio = f"{mid / base['step_ms'][1]:.2f}x" if "step_ms" in base else "-"
            extra = f"{r['peak_mb'] - base['peak_mb']:+.0f}" if "peak_mb" in base else "-"
            lines.append(f"| {det} | {var} | {mid:.0f} ({lo:.0f}-{hi:.0f}) | {ratio} | {r['peak_mb']:.0f} | {extra} |")
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


def main(argv=None, prog=None):
    args = parse_args(sys.argv[1:] if argv is None else argv, prog)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(*args.child, args.device, args.batch, tuple(args.image), args.objects, args.iters)))
        return None
    from tqdm import tqdm

    device = torch.device(args.device)
    stamp = {"device": device_name(device), "torch": torch.__version__, "triton": triton_version(),
             "commit": git_commit(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"# LGD training-step benchmark: {stamp}", flush=True)
    results, rows = {}, []
    cases = [(d, v) for d in args.detectors for v in args.variants]
    for det, var in tqdm(cases, desc="bench_train", file=sys.stderr):
        r = run_child(det, var, args)
        results.setdefault(det, {})[var] = r
        if "skipped" in r:
            print(f"  {det} / {var}: skipped ({r['skipped']})", flush=True)
            continue
        print(f"  {det} / {var}: step {r['step_ms'][1]:.0f} ms, peak {r['peak_mb']:.0f} MB", flush=True)
        key = dict(detector=det, variant=var, batch=args.batch, image=f"{args.image[0]}x{args.image[1]}",
                   objects=args.objects)
        rows.append(dict(key, metric="step_ms", p20=r["step_ms"][0], p50=r["step_ms"][1], p80=r["step_ms"][2], **stamp))
        rows.append(dict(key, metric="peak_mb", p20=r["peak_mb"], p50=r["peak_mb"], p80=r["peak_mb"], **stamp))
        for comp, ms in r["breakdown"].items():
            rows.append(dict(key, metric=f"{comp}_ms", p20=ms, p50=ms, p80=ms, **stamp))
    table = tables(results, stamp, args)
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"train_{device.type}")
    if rows:
        with open(base + ".csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    with open(base + ".json", "w") as f:
        json.dump({"stamp": stamp, "args": vars(args), "results": results}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(table + "\n")
    png = plot(results, base + ".png")
    print(f"\nwrote {base}.csv, .json, .md" + (f", {os.path.basename(png)}" if png else ""))
    return results


if __name__ == "__main__":
    main()
