"""Speed, memory and bandwidth of the lgd_ops backends, fused vs the reference, at detection shapes.

Sweep: op (box_pool, box_fill, normalized_mse) x backend (every available one: reference, cpu on CPU tensors,
cuda and triton on GPU tensors) x mode x shape x batch x objects per image x dtype, each case over all
pyramid levels of the shape. Modes:
  forward   the op under no_grad
  backward  torch.autograd.grad of the op's outputs, the forward graph built once outside the timer
  full      forward + backward
Timing and peak memory come from lgd_ops.benchmark (shared with the trainer's op report): median and 20th/80th
percentiles of `--repeats` samples; a synchronized perf_counter on CPU (this process' thread count),
triton.testing.do_bench on CUDA (CUDA events when triton is missing).
Peak memory: beyond the inputs; CUDA: the caching allocator's peak, every mode; CPU: the peak resident size
(VmHWM) of a fresh child process, mode full only (a child per case costs ~2 s).
Achieved bandwidth: the bytes the op must move at least (below), over the median time, also as a fraction of
the measured device copy bandwidth (dst.copy_(src) of 256 MiB, 2 x bytes per copy). With s = element size,
M = sum over levels of B*C*H_l*W_l (one feature pyramid), N = objects in the batch (context objects included):
  box_pool        forward s*(M + N*C*L)   (read the levels, write one [N, C] per level; L levels)
                  backward s*(N*C*L + M)  (read grad [N, C] per level, write grad of the levels)
  box_fill        forward s*(N*C + M)     (read the embeddings once, write the painted levels)
                  backward s*(M + N*C*L)  (read grad of the levels, write one grad [N, C] per level)
  normalized_mse  forward 2*s*M           (read student and teacher)
                  backward 3*s*M          (read both again, write grad of the student)
  full = forward + backward. Box coordinates (16 bytes per box) are ignored.
Ratios: each backend's median time and peak memory over the reference's in the same run.

Outputs under --out, named ops_<device>_<shapes>_<dtypes>: .csv (long format, one row per metric: op,
backend, mode, shape, batch, objects, dtype, metric, p20, p50, p80, device, torch, triton, commit, ...),
appended as each case finishes, so a run stopped part-way (a timeout) keeps every finished case; then, at the
end, .json (the same rows), .md (table) and _time.png / _memory.png (time and memory of mode full vs objects).

  lgd-bench ops                       # COCO RetinaNet shape, B=2, fp32, 7/50/300 objects + context
  lgd-bench ops --sweep               # everything: both shapes, 1-300 objects, B 1/2/8, fp32+bf16
  lgd-bench ops --shape faster_rcnn --dtype bfloat16 --batch 1 8 --objects 1 300
  lgd-bench ops --dtype bfloat16 --layout channels_last   # the fast training path's maps
  lgd-bench ops --shape tiny --repeats 2 --out /tmp/bench   # smoke run
"""
import argparse
import csv
import os
import sys
import time

import torch

import lgd_ops
from lgd_ops import benchmark
from lgd_ops._backend import BACKENDS
from lgd_ops.benchmark import (STEADY_MALLOC, ArgumentParser, device_name, git_commit, triton_version,
                                 write_outputs)

# (default B, C, padded input H, W, level sizes): RetinaNet P3-P7, Faster R-CNN P2-P6 of a COCO image resized to
# 800 x ~1200 and padded to a multiple of 32 (the 800 x 1333 setting's usual size)
SHAPES = {
    "retinanet": (2, 256, 800, 1216, [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]),
    "faster_rcnn": (2, 256, 800, 1216, [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]),
    "tiny": (2, 8, 64, 96, [(16, 24), (8, 12), (4, 6)]),
}
OPS = ("box_pool", "box_fill", "normalized_mse")
MODES = ("forward", "backward", "full")
FULL_SWEEP = dict(shape=["retinanet", "faster_rcnn"], objects=[1, 7, 50, 100, 300], batch=[1, 2, 8],
                  dtype=["float32", "bfloat16"])



def random_boxes(objects, n_img, in_h, in_w, device, generator):
    """COCO-like boxes: `objects` per image with log-uniform sizes from 8 px to the image size, some past the
    edge, then the image's context object last (the whole padded input, as lgd.modeling.labels packs it)."""
    n = objects * n_img
    size = torch.exp(torch.empty(n, 2).uniform_(2.0, 6.5, generator=generator))
    size = torch.minimum(size, torch.tensor([in_w, in_h], dtype=torch.float32))
    centre = torch.rand(n, 2, generator=generator) * torch.tensor([in_w, in_h])
    boxes = torch.cat([centre - size / 2, centre + size / 2], 1).reshape(n_img, objects, 4)
    context = torch.tensor([0.0, 0.0, in_w - 1.0, in_h - 1.0]).expand(n_img, 1, 4)
    boxes = torch.cat([boxes, context], 1).reshape(-1, 4)
    batch_idx = torch.arange(n_img).repeat_interleave(objects + 1)
    return boxes.to(device), batch_idx.to(device)


def shape_dims(shape, batch):
    """(B, C, H_in, W_in, levels) of a SHAPES entry, B replaced by `batch` when given."""
    n_img, channels, in_h, in_w, levels = SHAPES[shape]
    return batch or n_img, channels, in_h, in_w, levels


def min_bytes(op, mode, shape, batch, objects, dtype):
    """Bytes `op` must move at least in `mode` (module docstring formulas)."""
    n_img, channels, _, _, levels = shape_dims(shape, batch)
    s = torch.empty(0, dtype=dtype).element_size()
    m = sum(n_img * channels * h * w for h, w in levels)
    boxes = (objects + 1) * n_img  # the context object included
    per_level = boxes * channels * len(levels)
    fwd, bwd = {"box_pool": (m + per_level, per_level + m),
                "box_fill": (boxes * channels + m, m + per_level),
                "normalized_mse": (2 * m, 3 * m)}[op]
    return s * {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def make_case(op, shape, objects, dtype, device, batch=None, seed=0, layout="contiguous"):
    """The lgd_ops.benchmark case of one op over all levels of a named shape, with random_boxes; the maps in
    `layout` (a LAYOUTS key: the fast training path runs channels_last)."""
    g = torch.Generator().manual_seed(seed)
    n_img, channels, in_h, in_w, levels = shape_dims(shape, batch)
    boxes, batch_idx = random_boxes(objects, n_img, in_h, in_w, "cpu", g)
    return benchmark.make_case(op, [(n_img, channels, h, w) for h, w in levels], boxes, batch_idx, (in_h, in_w),
                               dtype, device, memory_format=LAYOUTS[layout], seed=seed)


def mode_fn(op, shape, objects, dtype, device, batch, mode, backend, layout="contiguous"):
    """A no-argument function running one `mode` call of the case (lgd_ops.benchmark.mode_fn)."""
    return benchmark.mode_fn(make_case(op, shape, objects, dtype, device, batch, layout=layout), mode, backend)


def time_it(fn, device, repeats):
    """(p20, median, p80) milliseconds of fn over `repeats` samples (lgd_ops.benchmark.time_ms)."""
    return benchmark.time_ms(fn, device, repeats)


def copy_bandwidth(device, nbytes=256 * 2**20, repeats=5):
    """Measured device copy bandwidth, GB/s (2 x bytes moved per dst.copy_(src))."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    _, median_ms, _ = time_it(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / (median_ms * 1e-3) / 1e9


def peak_memory(op, shape, objects, dtype, device, backend, batch, mode="full", layout="contiguous"):
    """Peak bytes one `mode` call allocates beyond its inputs (lgd_ops.benchmark.peak_memory)."""
    return benchmark.peak_memory(make_case(op, shape, objects, dtype, device, batch, layout=layout), mode, backend)


def parse_args(argv=None, prog=None):
    parser = ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["retinanet"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16", "float16"], default=["float32"])
    parser.add_argument("--layout", nargs="+", choices=sorted(LAYOUTS), default=["contiguous"],
                        help="memory format of the maps (the fast training path: bfloat16 channels_last)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--objects", type=int, nargs="+", default=[7, 50, 300],
                        help="objects per image (each image also gets its whole-image context object)")
    parser.add_argument("--batch", type=int, nargs="+", default=[0], help="images per batch (0: the shape's, 2)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                        help="default: every available backend for --device")
    parser.add_argument("--repeats", type=int, default=10, help="timed samples per case")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); 1 is steadier on a shared machine")
    parser.add_argument("--no-memory", action="store_true", help="skip peak memory (CPU: saves a child per case)")
    parser.add_argument("--sweep", action="store_true",
                        help="the full sweep: " + ", ".join(f"{k} {v}" for k, v in FULL_SWEEP.items()))
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "ops"),
                        help="output folder (default: benchmarks/results/ops)")
    args = parser.parse_args(argv)
    if args.sweep:
        for key, value in FULL_SWEEP.items():
            setattr(args, key, value)
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if any(n < 1 for n in args.objects) or any(b < 0 for b in args.batch):
        parser.error("--objects must be >= 1 and --batch >= 0")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"argument --device: {e}")
    for backend in args.backends or ():
        try:
            lgd_ops.resolve_backend(backend, device)
        except ValueError as e:
            parser.error(f"argument --backends: {e}")
    return args


CSV_FIELDS = ["op", "backend", "mode", "shape", "batch", "objects", "dtype", "layout", "metric", "p20", "p50", "p80"]


def run_sweep(args, device, backends, stamp, on_case=None):
    """One row per (case, metric): time_ms, gbps, bw_fraction, vs_ref (time), peak_mb, peak_vs_ref; each case's
    rows also go to on_case as soon as the case is measured."""
    from tqdm import tqdm

    cases = [(op, shape, batch, dtype, layout, objects) for shape in args.shape for batch in args.batch
             for dtype in args.dtype for layout in args.layout for op in args.ops
             for objects in ([0] if op == "normalized_mse" else args.objects)]
    rows, ref = [], {}
    with tqdm(total=len(cases) * len(backends) * len(args.modes), desc="bench_ops", file=sys.stderr) as bar:
        for op, shape, batch, dtype_name, layout, objects in cases:
            dtype = getattr(torch, dtype_name)
            n_img = shape_dims(shape, batch)[0]
            for backend in backends:
                for mode in args.modes:
                    key = dict(op=op, backend=backend, mode=mode, shape=shape, batch=n_img, objects=objects,
                               dtype=dtype_name, layout=layout)
                    fn = mode_fn(op, shape, objects, dtype, device, batch, mode, backend, layout)
                    p20, p50, p80 = time_it(fn, device, args.repeats)
                    del fn
                    moved = min_bytes(op, mode, shape, batch, objects, dtype)
                    gbps = [moved / (t * 1e-3) / 1e9 for t in (p80, p50, p20)]
                    metrics = {"time_ms": (p20, p50, p80), "gbps": tuple(gbps),
                               "bw_fraction": tuple(x / stamp["copy_gbps"] for x in gbps)}
                    if not args.no_memory and (device.type == "cuda" or mode == "full"):
                        mb = peak_memory(op, shape, objects, dtype, device, backend, batch, mode, layout) / 2**20
                        metrics["peak_mb"] = (mb, mb, mb)
                    case = tuple(key.items())
                    if backend == "reference":
                        ref[case] = metrics
                    base = ref.get(tuple(dict(key, backend="reference").items()))
                    if base:
                        metrics["vs_ref"] = tuple(t / base["time_ms"][1] for t in metrics["time_ms"])
                        if "peak_mb" in metrics and base.get("peak_mb", (0,))[0]:
                            metrics["peak_vs_ref"] = tuple(m / base["peak_mb"][0] for m in metrics["peak_mb"])
                    case_rows = [dict(key, metric=metric, p20=lo, p50=mid, p80=hi, **stamp)
                                 for metric, (lo, mid, hi) in metrics.items()]
                    rows += case_rows
                    if on_case:
                        on_case(case_rows)
                    bar.set_postfix_str(f"{op} {shape} B{n_img} {dtype_name} {layout} {objects} obj {backend} {mode}: "
                                        f"{p50:.2f} ms")
                    bar.update()
    return rows


def auto_choices(args, device):
    """What lgd_ops' auto chooses on this device for each op, dtype and layout of the sweep, measured as a run
    measures it: one forward call with backend "auto" on the sweep's first shape and batch and its most objects."""
    lgd_ops.set_auto_choices({})
    for op in args.ops:
        for dtype in args.dtype:
            for layout in args.layout:
                mode_fn(op, args.shape[0], max(args.objects), getattr(torch, dtype), device, args.batch[0],
                        "forward", "auto", layout)()
    return lgd_ops.auto_choices()


def markdown(rows, stamp, modes):
    """One table row per (shape, batch, dtype, op, objects, backend): median ms per mode (p20-p80 for full),
    full vs reference, achieved GB/s of full (% of the copy bandwidth), peak MB of full."""
    cells = {}
    for r in rows:
        dtype = r["dtype"] if r["layout"] == "contiguous" else f"{r['dtype']}, {r['layout']}"
        case = (r["shape"], r["batch"], dtype, r["op"], r["objects"], r["backend"])
        cells.setdefault(case, {})[(r["mode"], r["metric"])] = r
    lines = [f"lgd_ops benchmark, {stamp['device']}, torch {stamp['torch']}, triton {stamp['triton']}, commit "
             f"{stamp['commit']}, {stamp['date']}; copy bandwidth {stamp['copy_gbps']:.1f} GB/s. Times over all "
             "levels; full = forward + backward; peak = memory beyond the inputs (full).", "",
             "| shape | B | dtype | op | objects/img | backend | " + " | ".join(f"{m} ms" for m in modes)
             + " | full vs ref | full GB/s (% copy) | peak MB | peak vs ref |",
             "|---|---:|---|---|---:|---|" + "---:|" * (len(modes) + 4)]

    def get(c, mode, metric, fmt, field="p50"):
        r = c.get((mode, metric))
        return fmt.format(r[field]) if r else "-"

    for (shape, batch, dtype, op, objects, backend), c in cells.items():
        times = [get(c, m, "time_ms", "{:.2f}") + (f" ({get(c, m, 'time_ms', '{:.2f}', 'p20')}-"
                                                   f"{get(c, m, 'time_ms', '{:.2f}', 'p80')})" if m == "full" else "")
                 for m in modes]
        frac = c.get(("full", "bw_fraction"))
        bw = f"{get(c, 'full', 'gbps', '{:.1f}')} ({100 * frac['p50']:.0f} %)" if frac else "-"
        lines.append(f"| {shape} | {batch} | {dtype} | {op} | {objects or '-'} | {backend} | " + " | ".join(times)
                     + f" | {get(c, 'full', 'vs_ref', '{:.3f}x')} | {bw} | {get(c, 'full', 'peak_mb', '{:.1f}')} | "
                     f"{get(c, 'full', 'peak_vs_ref', '{:.3f}x')} |")
    return "\n".join(lines)


def plot(rows, base):
    """base_time.png / base_memory.png: median full time and peak memory vs objects per image, one panel per
    (shape, batch, dtype, layout) x op, one line per backend. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for metric, ylabel, suffix in (("time_ms", "full fwd+bwd time (ms)", "time"),
                                   ("peak_mb", "peak memory (MB)", "memory")):
        data = [r for r in rows if r["mode"] == "full" and r["metric"] == metric and r["op"] != "normalized_mse"]
        panels = sorted({(r["shape"], r["batch"], r["dtype"], r["layout"], r["op"]) for r in data})
        if not panels:
            continue
        cols = min(len(panels), 4)
        nrows = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
        for ax, panel in zip(axes.flat, panels):
            for backend in sorted({r["backend"] for r in data}):
                pts = sorted((r["objects"], r["p50"], r["p20"], r["p80"]) for r in data if r["p50"] > 0  # log axes
                             and (r["shape"], r["batch"], r["dtype"], r["layout"], r["op"]) == panel
                             and r["backend"] == backend)
                if pts:
                    x, y, lo, hi = zip(*pts)
                    ax.errorbar(x, y, yerr=[[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]],
                                marker="o", capsize=2, label=backend)
            ax.set(xscale="log", yscale="log", xlabel="objects per image", ylabel=ylabel,
                   title="{} B={} {} {}\n{}".format(*panel))
            ax.legend(fontsize=7)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        fig.tight_layout()
        path = f"{base}_{suffix}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None, prog=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, prog)  # before the re-exec, so that --help and errors name the command as typed
    if any(os.environ.get(k) != v for k, v in STEADY_MALLOC.items()):  # glibc reads these at start-up
        os.execve(sys.executable, [sys.executable, "-m", "lgd_ops.bench_ops", *argv], dict(os.environ, **STEADY_MALLOC))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backends = args.backends or [
        b for b in lgd_ops.available_backends() if b == "reference" or (b == "cpu") == (device.type == "cpu")
    ]
    if "reference" in backends:  # first, so every other backend's ratio exists when its row is written
        backends = ["reference"] + [b for b in backends if b != "reference"]
    stamp = {"device": device_name(device), "torch": torch.__version__, "triton": triton_version(),
             "commit": git_commit(), "threads": torch.get_num_threads(),
             "malloc": "steady (glibc keeps freed blocks)" if device.type == "cpu" else "caching allocator",
             "date": time.strftime("%Y-%m-%d %H:%M"), "copy_gbps": copy_bandwidth(device)}
    print(f"# lgd_ops benchmark: {stamp}", flush=True)
    layouts = "" if args.layout == ["contiguous"] else "_" + "-".join(args.layout)
    base = os.path.join(args.out, f"ops_{device.type}_{'-'.join(args.shape)}_{'-'.join(args.dtype)}{layouts}")
    os.makedirs(args.out, exist_ok=True)
    with open(base + ".csv", "w", newline="") as f:  # a case's rows as soon as it is measured: a timeout keeps them
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS + list(stamp))
        writer.writeheader()

        def append(case_rows):
            writer.writerows(case_rows)
            f.flush()

        rows = run_sweep(args, device, backends, stamp, append)
    chosen = auto_choices(args, device)
    table = markdown(rows, stamp, args.modes) + "\n\nauto chooses (measured once per op, dtype and layout): " + \
        ", ".join(f"{key} -> {name}" for key, name in sorted(chosen.items()))
    print("\n" + table)

    write_outputs(base, None, rows, table)  # the CSV is written already, case by case
    plots = plot(rows, base)
    print(f"\nwrote {base}.csv, .json, .md" + "".join(f", {os.path.basename(p)}" for p in plots))


if __name__ == "__main__":
    main()
