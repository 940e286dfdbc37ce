"""One lgd-demo invocation: the runs of each method, seed and fold in order, then summary.json, the plots, the
comparison and cost tables, and what the console shows (the device first, one line per evaluation, the results)."""
import json
import logging
import os
import shutil
import sys
import time

import torch
from detectron2.utils.logger import setup_logger

from ..errors import UsageError
from ..runner import fast_path, run_device
from .plots import plot_compare, plot_predictions, plot_run
from .report import compare_table, cost_table, format_ap, format_cost, format_op_report, format_table, op_report
from .run import (BUDGETS, DEMO_CONFIG, LOSS_KEYS, METHOD_LOSS_KEYS, build_config, predict_tiles, prepare_data,
                  run_name, run_one)

__all__ = ["run_demo"]


def _earlier_outputs(output_dir, runs):
    """What an earlier demo left in output_dir that runs [(mode, seed, fold), ...] would replace."""
    found = [os.path.join(output_dir, run_name(*r)) for r in runs]
    found = [d for d in found if os.path.isdir(d) and os.listdir(d)]
    return found + [p for p in (os.path.join(output_dir, "summary.json"),) if os.path.exists(p)]


def _setup_logging(output_dir, verbose):
    """detectron2's and lgd's logs to output_dir/log.txt; on the console only warnings unless verbose."""
    for name in ("detectron2", "lgd", "fvcore"):
        log = setup_logger(output=os.path.join(output_dir, "log.txt"), name=name, abbrev_name=name[:3])
        for handler in log.handlers:
            if getattr(handler, "stream", None) in (sys.stdout, sys.stderr) and not verbose:
                handler.setLevel(logging.WARNING)


def _device_line(cfg):
    device = run_device(cfg)
    where = (torch.cuda.get_device_name(device) if device.startswith("cuda")
             else f"{torch.get_num_threads()} CPU threads")
    return f"device: {device} ({where}); precision: {fast_path(cfg, device).describe()}"


def run_demo(output_dir, *, methods, seeds, folds=None, compare=False, data=None, cache_dir=None, backend="auto",
             resume=False, overwrite=False, verbose=False, command="lgd-demo", iters=None, batch_size=None,
             workers=None, **budget):
    """Runs `methods` over `seeds` (run i validated on fold folds[i % len(folds)] when folds are given) into
    output_dir, writes summary.json, the plots (predictions.png: the first seed's runs on the same validation
    tiles) and, with several methods or compare, compare.json; returns summary.json's content. Unset iters,
    batch_size and workers come from BUDGETS for this machine's device."""
    default_iters, default_batch, default_workers = BUDGETS["cuda" if torch.cuda.is_available() else "cpu"]
    budget.update(iters=iters or default_iters, batch_size=batch_size or default_batch,
                  workers=default_workers if workers is None else workers)
    comparing = compare or len(methods) > 1
    run_folds = [None if folds is None else folds[i % len(folds)] for i in range(len(seeds))]
    out = output_dir
    cfg = build_config(out, {"train": "", "val": ""}, **budget)  # the overrides, before anything is written
    earlier = _earlier_outputs(out, [(mode, seed, fold) for seed, fold in zip(seeds, run_folds) for mode in methods])
    if earlier and not (resume or overwrite):
        raise UsageError(f"{out} holds an earlier demo ({', '.join(earlier[:2])}{', ...' if len(earlier) > 2 else ''})"
                         ": refusing to overwrite it", hint="--resume reuses or continues its runs, --overwrite "
                         "starts them afresh, or choose another --output-dir")
    print(f"lgd-demo: {' vs '.join(methods)}, seeds {seeds}, {budget['iters']} iterations of {budget['batch_size']} "
          f"images per run\n{_device_line(cfg)}", flush=True)
    start = time.perf_counter()
    # a --data dataset is validated before the output folder is touched; the demo tiles log their preparation
    datasets = prepare_data(data, cache_dir) if data is not None else None
    os.makedirs(out, exist_ok=True)
    _setup_logging(out, verbose)
    split = {fold: datasets or prepare_data(None, cache_dir, fold) for fold in sorted(set(run_folds), key=str)}
    records = [run_one(mode, seed, out, split[fold], fold=fold, backend=backend, resume=resume, overwrite=overwrite,
                       **budget)
               for seed, fold in zip(seeds, run_folds) for mode in methods]
    for rec in records:
        plot_run(rec, os.path.join(out, f"curves_{run_name(rec['mode'], rec['seed'], rec.get('fold'))}.png"))
    # the run summarised: LGD's, else the first method's other than the baseline
    main_run = next((r for r in records if r["mode"] == "lgd"), None) or next(
        (r for r in records if r["mode"] != "baseline"), records[0])
    main_name = run_name(main_run["mode"], main_run["seed"], main_run.get("fold"))
    shutil.copyfile(os.path.join(out, f"curves_{main_name}.png"), os.path.join(out, "curves.png"))
    # each method's student on the same validation tiles: the runs of the first seed (and fold)
    tiles, images, predictions = predict_tiles(records[:len(methods)], split[run_folds[0]], **budget)
    plot_predictions(tiles, images, predictions, os.path.join(out, "predictions.png"))
    ops = op_report(main_run)
    summary = {
        "command": command, "config": DEMO_CONFIG,
        "datasets": next(iter(split.values())) if len(split) == 1 else {f"fold{k}": v for k, v in split.items()},
        "total_wall_s": time.perf_counter() - start,
        "runs": [{k: v for k, v in r.items() if k != "curves"} for r in records],
        "method": main_run["mode"], "results": main_run["results"], "op_report": ops,
        "predictions": {"png": "predictions.png", "methods": list(predictions), "seed": seeds[0],
                        "tiles": [t["file_name"] for t in tiles]},
        "final_losses": {k: v[-1][1] for k, v in main_run["curves"].items() if k in LOSS_KEYS + METHOD_LOSS_KEYS},
    }
    ap, ap50 = (format_ap(main_run["results"][k]) for k in ("AP", "AP50"))
    print(f"\n{main_run['mode']} student on {main_run['datasets']['val']}: AP {ap}, AP50 {ap50} "
          f"({main_run['iterations']} iterations of {main_run['batch_size']} images, {main_run['wall_s']:.0f} s, "
          f"{main_run['s_per_iter'] or float('nan'):.2f} s/iter on {main_run['device']})")
    if ops:
        print("LGD op report (last, on the run's shapes):\n" + format_op_report(ops))
    if comparing:
        table, cost = compare_table(records), cost_table(records)
        summary.update(compare=table, cost=cost)
        plot_compare(records, os.path.join(out, "compare.png"))
        with open(os.path.join(out, "compare.json"), "w") as f:
            json.dump({"table": table, "cost": cost, "methods": methods, "seeds": seeds, "folds": run_folds,
                       "budget": {k: v for k, v in budget.items() if k != "overrides"},
                       "runs": summary["runs"]}, f, indent=1)
        print(f"\n{' vs '.join(methods)}, seeds {seeds}" + (f", folds {run_folds}" if folds else "")
              + " (COCO AP %):\n" + format_table(table))
        print("\ntraining cost per run (mean; stages included):\n" + format_cost(cost))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nwrote {out}/summary.json, curves.png, predictions.png"
          + (", compare.json, compare.png" if comparing else ""))
    return summary
