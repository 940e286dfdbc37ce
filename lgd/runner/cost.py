"""A run's training cost record, OUTPUT/cost.json: wall time, seconds per iteration and peak memory, its
stages included, so that methods can be priced on the same budget (docs/methods/README.md)."""
import json
import logging
import os
import statistics

import torch
from detectron2.utils import comm

import lgd_ops
from lgd_ops.benchmark import proc_status_kib, reset_peak_rss

from ..engine.checkpoint import atomic_write

__all__ = ["COST_FILE", "METRICS_FILE", "drop_torn_tail", "read_cost", "read_metrics", "reset_peak_memory",
           "write_cost"]

COST_FILE = "cost.json"
METRICS_FILE = "metrics.json"
logger = logging.getLogger(__name__)


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
    """The rows of OUTPUT/metrics.json by iteration (a resumed run appends: the last row of an iteration wins).
    A line that is not a JSON row (torn by a full disk or a kill) is skipped with a warning naming the file."""
    path = os.path.join(output_dir, METRICS_FILE)
    rows = {}
    if os.path.isfile(path):
        with open(path, errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    rows.setdefault(row["iteration"], {}).update(row)
                except (ValueError, KeyError, TypeError):
                    logger.warning("%s: line %d is not a metrics row (torn by an interrupted write?): skipped",
                                   path, number)
    return [rows[i] for i in sorted(rows)]


def drop_torn_tail(output_dir):
    """Cuts a last line without its newline (an append torn by a full disk or a kill) off OUTPUT/metrics.json,
    with a warning naming the file, so the rows a resumed run appends start on a line of their own."""
    path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(size - 2**16, 0))
        tail = f.read()
        if tail.endswith(b"\n"):
            return
        cut = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        f.truncate(cut)
    logger.warning("%s: removed its torn last line (%d bytes, an interrupted write)", path, size - cut)


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
