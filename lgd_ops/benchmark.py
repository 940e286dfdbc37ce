"""Timing and peak memory of the lgd_ops ops, and the stamp and files every benchmark writes: the one
implementation behind `lgd-bench ops` (lgd_ops.bench_ops), `lgd-bench train` (lgd.benchmarks) and the trainer's
op report (lgd.engine.op_report), so all of them measure the same thing.

A case (make_case) is an op over all the levels of a feature pyramid with random inputs of the given shapes and
the given boxes; mode_fn runs it, time_ms times it, peak_memory measures what one call allocates. Usage:
docs/library.md.
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
import tempfile
import time
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

import lgd_ops

__all__ = ["MODES", "OPS", "STEADY_MALLOC", "ArgumentParser", "OpCase", "device_name", "git_commit", "make_case",
           "mode_fn", "peak_memories", "peak_memory", "proc_status_kib", "reset_peak_rss", "sync", "time_ms",
           "triton_version", "write_outputs"]

OPS = ("box_pool", "box_fill", "normalized_mse")
MODES = ("forward", "backward", "full")


@dataclass
class OpCase:
    """One op over a pyramid: `levels` [B, C, H, W] shapes, the boxes (CPU copies; moved to `device`)."""
    op: str
    levels: List[Tuple[int, int, int, int]]
    boxes: torch.Tensor
    batch_idx: torch.Tensor
    image_size: Tuple[int, int]
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    memory_format: torch.memory_format = torch.contiguous_format
    seed: int = 0

    def to_spec(self):
        """Plain values (for the peak-memory child): dtype and memory format by name."""
        spec = dict(self.__dict__)
        spec["dtype"] = str(self.dtype).split(".")[-1]
        spec["memory_format"] = "channels_last" if self.memory_format == torch.channels_last else "contiguous_format"
        return spec

    @classmethod
    def from_spec(cls, spec):
        return cls(**dict(spec, dtype=getattr(torch, spec["dtype"]), memory_format=getattr(torch, spec["memory_format"])))


def make_case(op: str, levels: Sequence[Sequence[int]], boxes: torch.Tensor, batch_idx: torch.Tensor,
              image_size, dtype=torch.float32, device="cpu", memory_format=torch.contiguous_format,
              seed: int = 0) -> OpCase:
    if op not in OPS:
        raise ValueError(f"lgd_ops.benchmark: unknown op {op!r}; expected one of {OPS}")
    if not levels:
        raise ValueError("lgd_ops.benchmark: levels must hold at least one [B, C, H, W] shape")
    return OpCase(op, [tuple(int(v) for v in s) for s in levels], boxes.detach().cpu(), batch_idx.detach().cpu(),
                  tuple(int(v) for v in image_size), dtype, str(device), memory_format, seed)


def _build(case: OpCase):
    """(run(backend) -> outputs, differentiable inputs) with random inputs of the case's shapes. Each level's
    BoxIndex is built once here on the host from the case's CPU boxes (which checks them) and moved to the device,
    so the timed calls read no box value (no host sync), as the trainer's calls do
    (lgd.modeling.labels.PackedLabels.box_index)."""
    g = torch.Generator().manual_seed(case.seed)
    device = torch.device(case.device)
    boxes, batch_idx = case.boxes.to(device), case.batch_idx.to(device)
    n_img, channels = case.levels[0][:2]
    if case.op != "normalized_mse":
        indices = [lgd_ops.box_index(case.boxes, case.batch_idx, case.image_size, n_img, s[2:]).to(device)
                   for s in case.levels]

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=case.dtype)

    def level(shape):
        x = rand(*shape)
        return x.contiguous(memory_format=case.memory_format) if len(shape) == 4 else x

    if case.op == "box_pool":
        inputs = [level(s).requires_grad_() for s in case.levels]

        def run(backend):
            return [lgd_ops.box_pool(f, boxes, batch_idx, case.image_size, index=index, backend=backend)
                    for f, index in zip(inputs, indices)]
    elif case.op == "box_fill":
        inputs = [rand(boxes.shape[0], channels).requires_grad_()]

        def run(backend):
            return [lgd_ops.box_fill(inputs[0], boxes, batch_idx, case.image_size, (n_img, h, w),
                                     memory_format=case.memory_format, index=index, backend=backend)
                    for (_, _, h, w), index in zip(case.levels, indices)]
    else:
        inputs = [level(s).requires_grad_() for s in case.levels]
        teachers = [level(s) for s in case.levels]

        def run(backend):
            return [lgd_ops.normalized_mse(inputs, teachers, backend=backend)]
    return run, inputs


def mode_fn(case: OpCase, mode: str, backend: str):
    """A no-argument function running one `mode` call of the case with `backend`: "forward" (no_grad), "backward"
    (autograd.grad on a graph built outside the timer) or "full" (both; the upstream gradients are made once,
    outside the timer). box_pool pools every level, box_fill paints random embeddings into every level's size,
    normalized_mse compares the levels with random teachers."""
    run, inputs = _build(case)
    if mode == "forward":
        def forward():
            with torch.no_grad():
                run(backend)
        return forward
    if mode not in ("backward", "full"):
        raise ValueError(f"lgd_ops.benchmark: unknown mode {mode!r}; expected one of {MODES}")
    with torch.enable_grad():
        graph = run(backend)
    grads = [torch.ones_like(o) for o in graph]
    if mode == "backward":
        return lambda: torch.autograd.grad(graph, inputs, grads, retain_graph=True)
    graph = None  # full builds its own graph on every call

    def full():
        with torch.enable_grad():
            torch.autograd.grad(run(backend), inputs, grads)
    return full


def sync(device):
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, repeats: int = 10):
    """(p20, median, p80) milliseconds of fn over `repeats` samples, after one warm-up call:
    triton.testing.do_bench on CUDA (CUDA events if triton is missing), a synchronized perf_counter on CPU."""
    if repeats < 1:
        raise ValueError(f"lgd_ops.benchmark.time_ms: repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            p20, p50, p80 = do_bench(fn, rep=max(repeats, 25), quantiles=[0.2, 0.5, 0.8])
            return p20, p50, p80
        fn()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
    else:
        fn()
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return q[0], statistics.median(times), q[3]


def peak_memory(case: OpCase, mode: str, backend: str) -> int:
    """Bytes one `mode` call of the case allocates beyond its inputs. CUDA: the caching allocator's peak, in this
    process. CPU: the peak resident-size growth (VmHWM, Linux) of a fresh child process (`python -m
    lgd_ops.benchmark`) that builds the same case, with glibc told to mmap every block over 64 KiB so freed
    memory leaves the RSS at once; the calling process only waits for it and keeps nothing."""
    return peak_memories([case], mode, [backend])[0][0]


def peak_memories(cases: Sequence[OpCase], mode: str, backends: Sequence[str]) -> List[List[int]]:
    """peak_memory of every case x backend ([case][backend] bytes); on CPU all of them in one child process."""
    if not cases:
        return []
    device = torch.device(cases[0].device)
    if device.type == "cuda":
        result = []
        for case in cases:
            row = []
            for backend in backends:
                fn = mode_fn(case, mode, backend)
                fn()
                sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                fn()
                sync(device)
                row.append(torch.cuda.max_memory_allocated(device) - base)
                del fn
            result.append(row)
        return result
    with tempfile.TemporaryDirectory(prefix="lgd_ops_peak_") as tmp:
        path = os.path.join(tmp, "cases.pt")
        torch.save({"cases": [c.to_spec() for c in cases], "mode": mode, "backends": list(backends)}, path)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
        out = subprocess.run([sys.executable, "-m", "lgd_ops.benchmark", "--peak-child", path], env=env, check=True,
                             capture_output=True, text=True).stdout
    values = [int(v) for v in out.split()]
    return [values[i * len(backends):(i + 1) * len(backends)] for i in range(len(cases))]


def proc_status_kib(field):
    """A KiB field of /proc/self/status (Linux): "VmRSS" (resident size) or "VmHWM" (its high-water mark)."""
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def reset_peak_rss():
    """Resets this process's VmHWM to its current resident size (Linux /proc/self/clear_refs, proc(5))."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# glibc settings for timed CPU runs: freed blocks stay in the heap, so a repeat does not pay the page faults of
# fresh 40 MB maps (what a caching allocator, or a long training run, sees); without them CPU times swing with
# the kernel's page-fault cost
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736",
                 "MALLOC_TOP_PAD_": "536870912"}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a bad argument reported on one line (no usage block), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def device_name(device):
    """The GPU's name, or the CPU model with this process's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return f"{model} ({torch.get_num_threads()} threads)"


def git_commit():
    """The commit of the lgd_ops checkout being measured, or "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(lgd_ops.__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def triton_version():
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def write_outputs(base, rows, payload, table):
    """base.csv (rows, long format; rows=None: written already, as lgd-bench ops appends it case by case),
    base.json (payload) and base.md (table)."""
    os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
    if rows:
        with open(base + ".csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    with open(base + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(table + "\n")


def _peak_child(path):
    """In the child: prints, per case and backend, the peak resident-size growth (bytes) of one call, counted
    from after its inputs are built (libraries warmed up on a tiny case first). Resets the kernel's high-water
    mark VmHWM before each (ru_maxrss would not do: Linux keeps it across exec)."""
    spec = torch.load(path, weights_only=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for fields in spec["cases"]:
        case = OpCase.from_spec(fields)
        for backend in spec["backends"]:
            tiny = OpCase(case.op, [(s[0], s[1], 4, 4) for s in case.levels], case.boxes, case.batch_idx,
                          case.image_size, case.dtype, case.device, case.memory_format)
            mode_fn(tiny, spec["mode"], backend)()
            fn = mode_fn(case, spec["mode"], backend)
            gc.collect()
            reset_peak_rss()
            base = proc_status_kib("VmRSS")
            fn()
            # RSS counters are synced lazily per thread (tens of KiB): a tiny case can read slightly negative
            print(max(0, proc_status_kib("VmHWM") - base) * 1024, flush=True)
            del fn
            gc.collect()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak-child":
        _peak_child(sys.argv[2])
    else:
        raise SystemExit("usage: python -m lgd_ops.benchmark --peak-child CASE.pt   (used by peak_memory)")
