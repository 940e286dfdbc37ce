"""The demo's tables: AP and AP50 per training method with standard errors and the paired difference to the
baseline (does it clear 2 standard errors?), each method's training cost, and the LGD op report of a run."""
import math
import statistics

from ..engine.op_report import OPS
from .run import AP_KEYS

__all__ = ["compare_table", "cost_table", "format_ap", "format_cost", "format_op_report", "format_table",
           "methods_of", "op_report"]


def _stats(values):
    """mean, sample standard deviation, standard error of the mean (std / sqrt(n)) and n of the non-None values."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "se": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.mean(values), "std": std, "se": std / math.sqrt(len(values)), "n": len(values)}


def _run_key(record):
    """"<seed>" or "<seed>/fold<F>": what pairs a baseline run with another method's run."""
    return str(record["seed"]) + ("" if record.get("fold") is None else f"/fold{record['fold']}")


def methods_of(records):
    """The methods of the records, in order of first appearance."""
    return list(dict.fromkeys(r["mode"] for r in records))


def compare_table(records):
    """{method: {metric: {"mean", "std", "se", "n", "per_seed": {run key: value}}}} for AP and AP50, and under
    "<method> - baseline" the paired differences (same seed and fold) with "above_2se": mean > 2 standard
    errors, for every method other than the baseline when baseline runs are there."""
    table = {}
    for mode in methods_of(records):
        runs = [r for r in records if r["mode"] == mode]
        table[mode] = {m: dict(_stats([r["results"][m] for r in runs]),
                               per_seed={_run_key(r): r["results"][m] for r in runs}) for m in AP_KEYS}
    for mode in [m for m in table if m != "baseline" and "baseline" in table]:
        pairs = {}
        for metric in AP_KEYS:
            base, other = table["baseline"][metric]["per_seed"], table[mode][metric]["per_seed"]
            diffs = {k: other[k] - base[k] for k in other if base.get(k) is not None and other[k] is not None}
            stats = _stats(list(diffs.values()))
            pairs[metric] = dict(stats, per_seed=diffs,
                                 above_2se=bool(stats["n"] > 1 and stats["mean"] > 2 * stats["se"]))
        if any(p["n"] for p in pairs.values()):
            table[f"{mode} - baseline"] = pairs
    return table


def cost_table(records):
    """{method: {"total_wall_s": mean over its runs (stages included), "stages": their names, "vs_baseline":
    ratio of the means}}: the demo's training cost per method (the paper's Table 7 on this machine)."""
    table = {}
    for mode in methods_of(records):
        # a run.json written before cost.json existed holds only its own wall_s (such runs had no stages)
        walls = [r.get("total_wall_s", r["wall_s"]) for r in records if r["mode"] == mode]
        stages = sorted({k for r in records if r["mode"] == mode for k in r.get("stages_wall_s", {})})
        table[mode] = {"total_wall_s": statistics.mean(walls) if walls else None, "stages": stages}
    base = table.get("baseline", {}).get("total_wall_s")
    for row in table.values():
        row["vs_baseline"] = row["total_wall_s"] / base if base and row["total_wall_s"] is not None else None
    return table


def format_cost(table):
    lines = [f"{'':15s}{'wall s (stages incl.)':>24s}{'vs baseline':>14s}  stages"]
    for mode, row in table.items():
        wall = f"{row['total_wall_s']:.0f}" if row["total_wall_s"] is not None else "-"
        ratio = f"{row['vs_baseline']:.2f}x" if row["vs_baseline"] is not None else "-"
        lines.append(f"{mode:15s}{wall:>24s}{ratio:>14s}  {', '.join(row['stages']) or '-'}")
    return "\n".join(lines)


def format_table(table):
    """mean ± standard error (n) per mode and metric; the paired difference row says whether it clears 2 SE."""
    lines = [f"{'':15s}" + "".join(f"{m:>20s}" for m in AP_KEYS)]
    for mode, metrics in table.items():
        cells = []
        for m in AP_KEYS:
            s = metrics[m]
            sign = "+" if "above_2se" in s else ""
            cells.append(f"{s['mean']:{sign}7.2f} ± {s['se']:4.2f} (n={s['n']})" if s["n"] else "-")
        lines.append(f"{mode:15s}" + "".join(f"{c:>20s}" for c in cells))
    lines.append("(mean ± standard error over runs; a difference is paired by seed and fold)")
    for mode, pairs in table.items():
        if mode.endswith(" - baseline"):
            lines.append(f"{mode}: " + ", ".join(f"{m} {'above' if pairs[m]['above_2se'] else 'NOT above'} 2 SE"
                                                 for m in AP_KEYS))
    return "\n".join(lines)


def op_report(record):
    """The last value of every op-report scalar of an LGD run (lgd.engine.op_report): {op: {"ms", "ref_ms",
    "speedup", "peak_mb", "ref_peak_mb"}} per op, and the step-level figures (lgd_fwd_share, lgd_mem_share, ...)."""
    report = {}
    for key, points in record["curves"].items():
        if not key.startswith("op_report/"):
            continue
        name, value = key[len("op_report/"):], points[-1][1]
        op = next((op for op in OPS if name.startswith(op + "_")), None)
        if op is None:
            report[name] = value
        else:
            report.setdefault(op, {})[name[len(op) + 1:]] = value
    return report


def format_ap(value):
    return "n/a (no detections)" if value is None else f"{value:.2f}"


def format_op_report(report):
    memory = any("peak_mb" in r for r in report.values() if isinstance(r, dict))
    lines = [f"{'op':16s}{'fused ms':>10s}{'ref ms':>10s}{'speedup':>9s}"
             + (f"{'peak MB':>10s}{'ref MB':>10s}" if memory else "")]
    for op, r in report.items():
        if isinstance(r, dict) and "ms" in r:
            nan = float("nan")
            peaks = f"{r.get('peak_mb', nan):10.1f}{r.get('ref_peak_mb', nan):10.1f}" if memory else ""
            lines.append(f"{op:16s}{r['ms']:10.2f}{r['ref_ms']:10.2f}{r['speedup']:8.2f}x" + peaks)
    if "lgd_fwd_share" in report:
        lines.append(f"LGD forward work: {report['lgd_fwd_ms']:.1f} ms of a {report['step_ms']:.1f} ms step "
                     f"({100 * report['lgd_fwd_share']:.1f} %)")
    if "lgd_mem_share" in report:
        lines.append(f"LGD's saved activations: {report['lgd_saved_mb']:.1f} MB of the step's "
                     f"{report['step_saved_mb']:.1f} MB ({100 * report['lgd_mem_share']:.1f} %)")
    return "\n".join(lines)
