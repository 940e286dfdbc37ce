"""A run's training cost record, OUTPUT/cost.json: wall time, seconds per iteration and peak memory, its
stages included, so that methods can be priced on the same budget (docs/methods/README.md)."""
import json
import os
import statistics

import torch
from detectron2.utils import comm

import lgd_ops
from lgd_ops.benchmark import proc_status_kib, reset_peak_rss

from ..engine.checkpoint import atomic_write

__all__ = ["COST_FILE", "read_cost", "read_metrics", "reset_peak_memory", "write_cost"]

COST_FILE = "cost.json"


def reset_peak_memory(device):
    """Restarts the peak that write_cost records: CUDA's allocator peak, or the process's peak RSS (Linux)."""
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            reset_peak_rss()
        except OSError:
            pass  # no /proc/self/clear_refs: the peak then covers the process's lifetime


def _peak_memory_mb(device):
    """(MB, kind): the CUDA allocator's peak or the main process's peak resident size; (None, None) when neither
    can be read."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    try:
        return proc_status_kib("VmHWM") / 1024, "cpu_peak_rss"
    except (OSError, StopIteration):
        return None, None


def read_cost(output_dir):
    """The cost.json of the run in output_dir, or None when it has none."""
    path = os.path.join(output_dir, COST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_metrics(output_dir):
    """The rows of OUTPUT/metrics.json by iteration (a resumed run appends: the last row of an iteration wins)."""
    path = os.path.join(output_dir, "metrics.json")
    rows = {}
    if os.path.isfile(path):
        with open(path) as f:
            for row in map(json.loads, filter(str.strip, f)):
                rows.setdefault(row["iteration"], {}).update(row)
    return [rows[i] for i in sorted(rows)]


def _median_step_seconds(output_dir):
    times = [row["time"] for row in read_metrics(output_dir) if "time" in row]
    return statistics.median(times) if times else None


def write_cost(cfg, method, iterations, max_iter, wall_s, device, stages=(), resume=False):
    """Writes and returns OUTPUT/cost.json: the method, iterations done of max_iter, wall seconds (a resumed run
    adds those of the pieces before it), median seconds per iteration, peak memory, the lgd_ops backends auto
    chose, each stage's cost.json and total_wall_s (the stages' and this run's)."""
    output_dir = cfg.train.output_dir
    earlier = read_cost(output_dir) if resume else None
    peak, kind = _peak_memory_mb(device)
    if earlier:
        wall_s += float(earlier.get("wall_s") or 0.0)
        if earlier.get("peak_mem_kind") == kind and earlier.get("peak_mem_mb") is not None:
            peak = max(peak, float(earlier["peak_mem_mb"]))
    stage_costs = {name: read_cost(os.path.join(output_dir, name)) for name in stages}
    cost = {"method": method, "iterations": int(iterations), "max_iter": int(max_iter), "wall_s": wall_s,
            "s_per_iter": _median_step_seconds(output_dir), "peak_mem_mb": peak, "peak_mem_kind": kind,
            "device": str(device), "world_size": comm.get_world_size(), "lgd_ops_auto": lgd_ops.auto_choices(),
            "stages": stage_costs,
            "total_wall_s": wall_s + sum(c["total_wall_s"] for c in stage_costs.values() if c)}
    atomic_write(os.path.join(output_dir, COST_FILE), lambda f: f.write(json.dumps(cost, indent=2).encode()))
    return cost
