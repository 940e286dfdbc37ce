"""Speed and memory of the lgd_ops backends, fused vs the reference, at detection shapes.

For each op, backend and objects-per-image: forward and forward+backward wall time over all pyramid
levels (median and 20th/80th percentiles of repeats) and the peak memory the call allocates beyond
its inputs (allocator peak on GPU, child-process peak RSS on CPU). Prints a markdown
table with each backend's time as a ratio of the reference's, and writes CSV, JSON and the table stamped with
the device, torch version and thread count.

  python benchmarks/bench_ops.py                       # COCO RetinaNet shape, every backend
  python benchmarks/bench_ops.py --shape tiny --repeats 2 --out /tmp/bench   # smoke run
"""
import argparse
import csv
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import lgd_ops

# (B, C, padded input H, W, level sizes)
SHAPES = {
    "retinanet": (2, 256, 800, 1216, [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]),
    "faster_rcnn": (2, 256, 800, 1216, [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]),
    "tiny": (2, 8, 64, 96, [(16, 24), (8, 12), (4, 6)]),
}


# glibc settings for the timed runs: freed blocks stay in the heap, so a repeat does not pay the
# page faults of fresh 40 MB maps (what a caching allocator, or a long training run, sees). Without
# them both backends' CPU times swing 2-3x with the kernel's page-fault cost.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736",
                 "MALLOC_TOP_PAD_": "536870912"}


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return f"{model} ({torch.get_num_threads()} threads)"


def random_boxes(objects, n_img, in_h, in_w, device, generator):
    """COCO-like boxes: log-uniform sizes from 8 px to the image size, some past the edge."""
    n = objects * n_img
    size = torch.exp(torch.empty(n, 2).uniform_(2.0, 6.5, generator=generator))
    size = torch.minimum(size, torch.tensor([in_w, in_h], dtype=torch.float32))
    centre = torch.rand(n, 2, generator=generator) * torch.tensor([in_w, in_h])
    boxes = torch.cat([centre - size / 2, centre + size / 2], 1)
    batch_idx = torch.arange(n_img).repeat_interleave(objects)
    return boxes.to(device), batch_idx.to(device)


def make_case(op, shape, objects, dtype, device, seed=0):
    """Returns (forward, forward_backward) closures for one op at one shape."""
    g = torch.Generator().manual_seed(seed)
    n_img, channels, in_h, in_w, levels = SHAPES[shape]
    boxes, batch_idx = random_boxes(objects, n_img, in_h, in_w, device, g)
    size = (in_h, in_w)

    def leaf(*shape_):
        return torch.randn(*shape_, generator=g).to(device=device, dtype=dtype).requires_grad_()

    if op == "box_pool":
        feats = [leaf(n_img, channels, h, w) for h, w in levels]

        def fwd(backend):
            return [lgd_ops.box_pool(f, boxes, batch_idx, size, backend=backend) for f in feats]

        inputs = feats
    elif op == "box_fill":
        emb = leaf(boxes.shape[0], channels)

        def fwd(backend):
            return [lgd_ops.box_fill(emb, boxes, batch_idx, size, (n_img, h, w), backend=backend) for h, w in levels]

        inputs = [emb]
    else:
        students = [leaf(n_img, channels, h, w) for h, w in levels]
        teachers = [torch.randn(n_img, channels, h, w, generator=g).to(device=device, dtype=dtype) for h, w in levels]

        def fwd(backend):
            return [lgd_ops.normalized_mse(students, teachers, backend=backend)]

        inputs = students

    def forward(backend):
        with torch.no_grad():
            return fwd(backend)

    def forward_backward(backend):
        outs = fwd(backend)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        for x in inputs:
            x.grad = None

    return forward, forward_backward


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, device, repeats):
    fn()  # warm-up (first-call allocations, lazy init)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def peak_memory(op, shape, objects, dtype, device, backend):
    """Peak bytes one forward+backward allocates beyond its inputs.

    CUDA: the caching allocator's peak statistics. CPU: the peak resident size (VmHWM) of a fresh child
    process (glibc told to mmap every block over 64 KiB, so freed memory leaves the RSS at once),
    measured from after its inputs are built, with the libraries warmed up on a tiny case first.
    """
    if device.type == "cuda":
        _, forward_backward = make_case(op, shape, objects, dtype, device)
        forward_backward(backend)
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        forward_backward(backend)
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    env = {k: v for k, v in os.environ.items() if k not in STEADY_MALLOC}
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, os.path.abspath(__file__), "--peak-child", op, shape, str(objects), str(dtype).split(".")[-1], backend]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def _peak_child(op, shape, objects, dtype, backend):
    """Runs in a child process: prints the peak resident-size growth (bytes) of one forward+backward.

    Reads the kernel's high-water mark VmHWM after resetting it (ru_maxrss would not do: Linux keeps
    it across exec, so it starts at the parent's size)."""
    device = torch.device("cpu")
    make_case(op, "tiny", int(objects), getattr(torch, dtype), device)[1](backend)
    _, forward_backward = make_case(op, shape, int(objects), getattr(torch, dtype), device)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    base = _proc_status_kib("VmRSS")
    forward_backward(backend)
    print((_proc_status_kib("VmHWM") - base) * 1024)


def main():
    if len(sys.argv) == 7 and sys.argv[1] == "--peak-child":
        return _peak_child(*sys.argv[2:])
    if any(os.environ.get(k) != v for k, v in STEADY_MALLOC.items()):  # glibc reads these at start-up
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, **STEADY_MALLOC))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="retinanet")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--ops", nargs="+", default=["box_pool", "box_fill", "normalized_mse"])
    parser.add_argument("--objects", type=int, nargs="+", default=[7, 50, 100], help="objects per image")
    parser.add_argument("--backends", nargs="+", default=None, help="default: every available backend")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    backends = args.backends or [
        b for b in lgd_ops.available_backends() if b == "reference" or (b == "cpu") == (device.type == "cpu")
    ]
    stamp = {
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "malloc": "steady (glibc keeps freed blocks)" if device.type == "cpu" else "caching allocator",
        "shape": args.shape,
        "dtype": args.dtype,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(f"# lgd_ops benchmark: {stamp}")
    rows = []
    for op in args.ops:
        objects_list = [0] if op == "normalized_mse" else args.objects
        for objects in objects_list:
            forward, forward_backward = make_case(op, args.shape, objects, dtype, device)
            for backend in backends:
                row = dict(stamp, op=op, objects=objects, backend=backend)
                for name, fn in (("fwd", forward), ("fwdbwd", forward_backward)):
                    med, p20, p80 = time_it(lambda: fn(backend), device, args.repeats)
                    row.update({f"{name}_ms": med, f"{name}_p20_ms": p20, f"{name}_p80_ms": p80})
                row["fwdbwd_peak_mb"] = peak_memory(op, args.shape, objects, dtype, device, backend) / 2**20
                rows.append(row)
                print(f"  {op:15s} objects={objects:3d} {backend:9s} fwd {row['fwd_ms']:8.2f} ms  "
                      f"fwd+bwd {row['fwdbwd_ms']:8.2f} ms  peak {row['fwdbwd_peak_mb']:8.1f} MB", flush=True)

    ref = {(r["op"], r["objects"]): r for r in rows if r["backend"] == "reference"}
    for r in rows:
        base = ref.get((r["op"], r["objects"]))
        for key in ("fwd_ms", "fwdbwd_ms", "fwdbwd_peak_mb"):
            r[f"{key}_vs_ref"] = r[key] / base[key] if base and base[key] else float("nan")

    table = [f"lgd_ops benchmark, {stamp['device']}, torch {stamp['torch']}, shape {args.shape}, {args.dtype}, "
             f"{stamp['date']} (fwd+bwd = forward and backward over all levels; peak = memory beyond the inputs)", "",
             "| op | objects/img | backend | fwd ms | fwd+bwd ms (p20-p80) | fwd+bwd vs ref | peak MB | peak vs ref |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['op']} | {r['objects'] or '-'} | {r['backend']} | {r['fwd_ms']:.2f} | "
                     f"{r['fwdbwd_ms']:.2f} ({r['fwdbwd_p20_ms']:.2f}-{r['fwdbwd_p80_ms']:.2f}) | "
                     f"{r['fwdbwd_ms_vs_ref']:.3f}x | {r['fwdbwd_peak_mb']:.1f} | {r['fwdbwd_peak_mb_vs_ref']:.3f}x |")
    print("\n" + "\n".join(table))

    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"ops_{device.type}_{args.shape}_{args.dtype}")
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(base + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write("\n".join(table) + "\n")
    print(f"\nwrote {base}.csv, .json and .md")


if __name__ == "__main__":
    main()
