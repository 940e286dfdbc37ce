"""The training cost of each method (the LGD paper's Table 7 on this machine): every run a method trains, its
stages included, built as lgd-train builds it and timed in its own process; total cost = sum of step time x
the run's train.max_iter."""
import os
import sys
import tempfile

import torch

from lgd_ops.benchmark import write_outputs

from .steps import (held_bytes, make_batch, peak_step_bytes, percentiles, run_child, run_config, time_steps,
                    train_step)

__all__ = ["MAIN", "method_child", "method_plan", "run_methods"]

MAIN = "main"  # the method's own run, beside its stage runs


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
    cfg = run_config(detector, method, "fp32", "cpu", overrides)
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


def method_child(detector, method, run, device, batch, image, objects, iters, mode, overrides=()):
    """Times one run of a method's training (a stage run's path, or MAIN) as lgd-train builds it
    (lgd.runner.build_model and build_optimizer), after writing random-weight checkpoints of the
    stage runs before it into a temporary OUTPUT. Returns its result dict (or {"skipped": reason})."""
    from lgd.engine.checkpoint import student_module
    from lgd.methods import build_method
    from lgd.modeling.detector_drivers import build_detector_driver
    from lgd.runner import build_model, build_optimizer, fast_path

    device = torch.device(device)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as output_dir:
        try:
            cfg = run_config(detector, method, mode, device, overrides, output_dir)
            runs = stage_runs(cfg) + [(MAIN, cfg)]
            index = [path for path, _ in runs].index(run)
            for _, earlier in runs[:index]:
                write_random_checkpoint(earlier)
            cfg = runs[index][1]
            torch.manual_seed(0)
            model = build_model(cfg).train()
            optimizer = build_optimizer(cfg, model, build_method(cfg))
            num_classes = build_detector_driver(student_module(model)).num_classes
        except Exception as exc:  # the method does not support the detector, a stage fails, ...: skip, say why
            return {"skipped": f"{type(exc).__name__}: {exc}"}
    fast = fast_path(cfg, device)
    step = train_step(model, optimizer, fast, make_batch(batch, image, objects, num_classes), device)
    times = time_steps(step, iters, device)
    held = held_bytes(model, optimizer)
    peak = peak_step_bytes(step, device)  # last: on CPU it leaves glibc in its mmap-everything mode
    return {"step_ms": percentiles(times), "peak_mb": max(peak, 0) / 2**20, "held_mb": held / 2**20,
            "precision": fast.describe()}


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
