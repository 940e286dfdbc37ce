"""The main job: LGD on real data in about ten minutes on 2 CPU cores, and the baseline-vs-LGD comparison.

    lgd-demo                                  # LGD on the deepforest tree tiles, evaluated and plotted
    lgd-demo --compare --seeds 0 1 2          # baseline vs LGD, same budget and seeds: AP table
    lgd-demo --compare --seeds 0 1 2 3 4 5 --folds 0 1   # the same, validated on two held-out source images
    lgd-demo --resume                         # continue an interrupted run (or comparison)

Options first, `key=value` overrides of the demo config last (e.g. `--seeds 0 1 --iters 100 train.log_period=5`).

Steps: prepare and register the demo data (lgd.data: deepforest aerial images tiled to 400 px, one class
"Tree"; `--data TRAIN_JSON VAL_JSON IMAGE_ROOT` uses any COCO-format dataset instead), train the small RetinaNet
of lgd/configs/demo_retinanet_mobilenetv2_lgd.py (ImageNet MobileNetV2 + 64-channel FPN/head) with LGD
through lgd.tools.train_net.train (fused lgd_ops, backend "auto"), evaluate the student with pycocotools (AP, AP50)
a few times during training and at the end, and write into the output folder (default ./output/demo):

    <mode>_seed<S>[_fold<F>]/  the run: checkpoints, metrics.json, run.json (its results and curves)
    summary.json             budget, wall time, s/iter, AP/AP50, final losses, the LGD op report
    curves.png               losses (student, instructive branch, distillation) and AP over iterations
    compare.json, compare.png   (--compare, --methods) per-run and mean ± standard error AP/AP50 of each method,
                             the paired difference to the baseline (same seed and fold): does it clear 2
                             standard errors? and each method's training cost (wall time, stages included)
    log.txt                  detectron2's log (the console shows progress bars and the results)

Budget: on CPU 600 iterations of batch 4 at 400 px on the fast path (bf16 autocast + channels_last, lgd-train
--fast; --fp32 for fp32 NCHW), about ten minutes for an LGD run on 2 cores, what 300 fp32 iterations took; on
CUDA 2000 iterations of batch 16. --folds: 4-fold cross-validation by source image (lgd.data.DEMO_FOLDS), run i
of --seeds holding out fold FOLDS[i % len(FOLDS)]: more validation data across the runs. --methods: the
paper's comparison systems (lgd.methods, docs/methods/) on the same budget and seeds, e.g. `--methods baseline
lgd fgfi labelenc`; a method's stages (FGFI's teacher, LabelEnc's step 1, BAN's earlier generations) train in
its run's folder and count in its cost. lgd-demo restarts itself once with OMP_WAIT_POLICY=PASSIVE (unless an
OpenMP wait policy is set): a machine where another process keeps a core busy then slows it in proportion, not
5-10x (passive_openmp). Measured times and AP are in benchmarks/README.md (demo section) and
benchmarks/results/demo_cpu*/.
--iters / --batch-size / --image-size override the budget; the LGD schedule (distillation from 1/3 of the run,
backbone frozen for the first 1/9, LR steps at 2/3 and 8/9) scales with --iters (lgd.tools.train_net).
The op report (lgd.engine.op_report.OpReport: the three fused ops vs the reference on the run's own shapes) runs
every quarter of an LGD run; its last values go to summary.json and the console.

--resume: a finished run (run.json present) is reused; an unfinished one continues from its last checkpoint.
Without --resume an earlier run's folder (or summary.json) in the output folder is never replaced silently:
the demo refuses to start (exit status 2) unless --overwrite is given, which starts those runs afresh.
Everything the demo reads (options, config overrides, a --data dataset) is checked before it writes
anything. Exit status and one-line failures as every lgd command (lgd.tools.cli; --debug for a traceback);
run(argv) is the Python API (returns summary.json's content, raises), main(argv) the console script.
"""
import argparse
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time

import torch
from detectron2.engine import HookBase
from detectron2.utils.logger import setup_logger
from tqdm import tqdm

from ..engine.op_report import OPS
from ..config import apply_overrides_strict, load_config
from ..errors import UsageError
from ..methods import method_names
from ..runner import check_backend, fast_path, read_cost, read_metrics, train
from .cli import DEBUG_HELP, run_command
from .train_net import OPS_HELP

__all__ = ["DEMO_CONFIG", "build_config", "compare_table", "main", "plot_compare", "plot_run",
           "run", "run_one"]

logger = logging.getLogger("lgd.tools.demo")
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                           "demo_retinanet_mobilenetv2_lgd.py")
# (iterations, images per batch, data loader workers) by device
BUDGETS = {"cpu": (600, 4, 1), "cuda": (2000, 16, 4)}
EVALS_PER_RUN = 4  # COCO evaluations during a run (the last one at the end)
MODES = ("baseline", "lgd")  # --compare's methods; --methods takes any of lgd.methods.method_names()
STUDENT_LOSSES = ("loss_cls", "loss_box_reg")
LOSS_KEYS = ("total_loss", "loss_cls", "loss_box_reg", "loss_cls_tea", "loss_box_reg_tea", "loss_distill")
# the comparison systems' own losses (docs/methods/): plotted with the rest when a run logs them
METHOD_LOSS_KEYS = ("loss_imitation", "loss_labelenc", "loss_distill_peer", "loss_tfkd")
AP_KEYS = ("AP", "AP50")


class TqdmProgress(HookBase):
    """A tqdm bar over the run's iterations (with its ETA), showing the latest total loss."""

    def __init__(self, desc: str):
        self.desc = desc
        self._bar = None

    def before_train(self):
        self._bar = tqdm(total=self.trainer.max_iter, initial=self.trainer.start_iter, desc=self.desc,
                         unit="it", dynamic_ncols=True)

    def after_step(self):
        history = self.trainer.storage.histories().get("total_loss")
        if history is not None:
            self._bar.set_postfix(loss=f"{history.latest():.3f}", refresh=False)
        self._bar.update(1)

    def after_train(self):
        self._bar.close()


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def prepare_data(data=None, cache_dir=None, fold=None):
    """Registers the datasets and returns {"train": name, "val": name, "stats": ...}: the deepforest demo tiles
    (lgd.data.register_demo_datasets; fold k: the cross-validation split holding out source image k) or, with
    data=(train_json, val_json, image_root), that COCO dataset."""
    from ..data import demo_dataset_names, register_coco_once, register_demo_datasets

    from ..data.register import validate_coco_json

    if data is None:
        paths = register_demo_datasets(cache_dir, fold)
        train, val = demo_dataset_names(fold)
        return {"train": train, "val": val, "stats": paths.get("stats", {})}
    if len(data) != 3:
        raise ValueError(f"prepare_data: data must be (train_json, val_json, image_root), got {data!r}")
    train_json, val_json, image_root = data
    validate_coco_json(train_json, image_root, training=True)
    validate_coco_json(val_json, image_root, evaluation=True)
    return {"train": register_coco_once("lgd_demo_custom_train", train_json, image_root),
            "val": register_coco_once("lgd_demo_custom_val", val_json, image_root), "stats": {}}


def build_config(output_dir, datasets, *, iters, batch_size, image_size=None, workers=None, seed=0,
                 pretrained=True, fast=True, overrides=()):
    """The demo LazyConfig for one run: datasets from prepare_data, the budget, the seed, the fast path
    (train.amp.enabled, lgd-train --fast) unless fast=False, then `overrides` (key=value). EVALS_PER_RUN
    evaluations and an op report every quarter of the run; checkpoints likewise."""
    for name, value in (("iters", iters), ("batch_size", batch_size)):
        if int(value) < 1:
            raise ValueError(f"build_config: {name} must be >= 1, got {value}")
    cfg = load_config(DEMO_CONFIG)
    period = max(1, iters // EVALS_PER_RUN)
    cfg.train.output_dir = output_dir
    cfg.train.max_iter = int(iters)
    cfg.train.seed = int(seed)
    cfg.train.amp.enabled = bool(fast)
    cfg.train.eval_period = period
    cfg.train.checkpointer = dict(period=period, max_to_keep=2)
    cfg.train.log_period = max(1, min(20, period))
    cfg.lgd.op_report_period = period
    cfg.dataloader.train.total_batch_size = int(batch_size)
    cfg.dataloader.train.dataset.names = datasets["train"]
    cfg.dataloader.test.dataset.names = datasets["val"]
    if workers is not None:
        cfg.dataloader.train.num_workers = cfg.dataloader.test.num_workers = int(workers)
    if image_size is not None:
        if int(image_size) < 32:
            raise ValueError(f"build_config: image_size must be >= 32, got {image_size}")
        for aug in (cfg.dataloader.train.mapper.augmentations[0], cfg.dataloader.test.mapper.augmentations[0]):
            aug.short_edge_length = aug.max_size = int(image_size)
    if not pretrained:
        cfg.model.backbone.weights = None
    return apply_overrides_strict(cfg, overrides)


def _curves(rows):
    """{key: [[iteration, value], ...]} for the losses, bbox AP/AP50 and the op report."""
    curves = {}
    for row in rows:
        for key, value in row.items():
            name = key[len("bbox/"):] if key.startswith("bbox/") else key
            if (key in LOSS_KEYS + METHOD_LOSS_KEYS or (key.startswith("bbox/") and name in AP_KEYS)
                    or key.startswith("op_report/")):
                curves.setdefault(name, []).append([row["iteration"], value])
    return curves


def _number(value):
    """A finite float, else None (COCOeval's NaN when the model predicted nothing; JSON has no NaN)."""
    return float(value) if value is not None and math.isfinite(value) else None


def run_name(mode, seed, fold=None):
    """The folder of one run: <mode>_seed<S>, with _fold<F> for a cross-validation fold."""
    return f"{mode}_seed{seed}" + ("" if fold is None else f"_fold{fold}")


def _earlier_outputs(output_dir, runs):
    """What an earlier demo left in output_dir that runs [(mode, seed, fold), ...] would replace."""
    found = [os.path.join(output_dir, run_name(*r)) for r in runs]
    found = [d for d in found if os.path.isdir(d) and os.listdir(d)]
    return found + [p for p in (os.path.join(output_dir, "summary.json"),) if os.path.exists(p)]


def run_one(mode, seed, output_dir, datasets, *, fold=None, backend="auto", resume=False, overwrite=False,
            **budget):
    """Trains and evaluates one run of the training method `mode` (lgd.methods.method_names(): "lgd", "baseline",
    "fgfi", ...; its stages inside the run's folder) into output_dir/run_name(mode, seed, fold); returns its
    record (also saved as run.json there): results, curves, wall time, cost (stages included), budget. An
    earlier run there is reused or continued with resume, started afresh with overwrite, else a UsageError.
    See the module docstring."""
    if mode not in method_names():
        raise ValueError(f"run_one: mode must be one of {method_names()}, got {mode!r}")
    run_dir = os.path.join(output_dir, run_name(mode, seed, fold))
    record_path = os.path.join(run_dir, "run.json")
    if resume and os.path.isfile(record_path):
        with open(record_path) as f:
            logger.info("%s: finished before, reusing %s", run_dir, record_path)
            return json.load(f)
    if not resume and os.path.isdir(run_dir) and os.listdir(run_dir):
        if not overwrite:
            raise UsageError(f"{run_dir} holds an earlier run: refusing to overwrite it",
                             hint="--resume reuses or continues it, --overwrite starts it afresh, "
                                  "or choose another --output-dir")
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    cfg = build_config(run_dir, datasets, seed=seed, **budget)
    cfg.lgd.method = mode
    extra_hooks = [TqdmProgress(f"{mode} seed {seed}")]  # train() adds the op report (cfg.lgd.op_report_period)
    start = time.perf_counter()
    results = train(cfg, backend=backend, resume=resume, extra_hooks=extra_hooks)
    wall_s = time.perf_counter() - start
    cost, rows = read_cost(run_dir), read_metrics(run_dir)
    record = {
        "mode": mode, "seed": seed, "fold": fold, "datasets": {k: datasets[k] for k in ("train", "val")},
        "backend": backend if mode != "baseline" else None, "precision": fast_path(cfg).describe(),
        "iterations": int(cfg.train.max_iter), "batch_size": int(cfg.dataloader.train.total_batch_size),
        "image_size": int(cfg.dataloader.train.mapper.augmentations[0].max_size),
        "device": str(cfg.train.device) if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(), "wall_s": wall_s,
        "total_wall_s": cost["total_wall_s"],  # the run and its stages (teacher pretraining, LabelEnc step 1, ...)
        "stages_wall_s": {k: (v or {}).get("total_wall_s") for k, v in (cost.get("stages") or {}).items()},
        "s_per_iter": cost["s_per_iter"],
        "results": {k: _number(results.get("bbox", {}).get(k)) for k in AP_KEYS + ("AP75",)},
        "curves": _curves(rows), "run_dir": run_dir,
    }
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    return record


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(record, path):
    """Losses and AP/AP50 of one run over iterations, as a PNG."""
    plt = _plt()
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    curves = record["curves"]
    for key in LOSS_KEYS + METHOD_LOSS_KEYS:
        if key in curves:
            it, val = zip(*curves[key])
            ax_loss.plot(it, val, label=key, linestyle="--" if key.endswith("_tea") else "-")
    ax_loss.set(xlabel="iteration", ylabel="loss", yscale="log",
                title=f"{record['mode']} seed {record['seed']}: losses")
    ax_loss.legend(fontsize=8)
    for key in AP_KEYS:
        if key in curves:
            it, val = zip(*curves[key])
            ax_ap.plot(it, val, marker="o", label=key)
    ax_ap.set(xlabel="iteration", ylabel="COCO AP (%)", title="student, validation")
    ax_ap.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mean_curve(records, key):
    """Iterations and mean value over the records of `key` (a sum of keys if key is a tuple), on shared iterations."""
    keys = key if isinstance(key, tuple) else (key,)
    per_run = []
    for rec in records:
        parts = [dict(map(tuple, rec["curves"].get(k, []))) for k in keys]
        shared = set.intersection(*(set(p) for p in parts)) if parts else set()
        per_run.append({i: sum(p[i] for p in parts) for i in shared})
    common = sorted(set.intersection(*(set(r) for r in per_run))) if per_run else []
    return common, [statistics.mean(r[i] for r in per_run) for i in common]


def _stats(values):
    """mean, sample standard deviation, standard error of the mean (std / sqrt(n)) and n of the non-None values."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "se": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.mean(values), "std": std, "se": std / math.sqrt(len(values)), "n": len(values)}


def _run_key(record):
    """"<seed>" or "<seed>/fold<F>": what pairs a baseline run with an LGD run."""
    return str(record["seed"]) + ("" if record.get("fold") is None else f"/fold{record['fold']}")


def _methods(records):
    """The methods of the records, in order of first appearance."""
    return list(dict.fromkeys(r["mode"] for r in records))


def compare_table(records):
    """{method: {metric: {"mean", "std", "se", "n", "per_seed": {run key: value}}}} for AP and AP50, and under
    "<method> - baseline" the paired differences (same seed and fold) with "above_2se": mean > 2 standard
    errors, for every method other than the baseline when baseline runs are there."""
    table = {}
    for mode in _methods(records):
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
    for mode in _methods(records):
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


def plot_compare(records, path):
    """Side by side, every method (mean over seeds): the student's detection loss, AP/AP50 over iterations,
    and the final AP of each paired run against the baseline (bars per method, with the mean and its
    2-standard-error band)."""
    plt = _plt()
    fig, (ax_loss, ax_ap, ax_diff) = plt.subplots(1, 3, figsize=(16, 4))
    colors = dict(zip(_methods(records), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2))
    colors.update({m: c for m, c in (("baseline", "tab:gray"), ("lgd", "tab:green")) if m in colors})
    for mode, color in colors.items():
        runs = [r for r in records if r["mode"] == mode]
        it, val = _mean_curve(runs, STUDENT_LOSSES)
        ax_loss.plot(it, val, color=color, label=f"{mode} (n={len(runs)})")
        for key, style in zip(AP_KEYS, ("-o", "--s")):
            it, val = _mean_curve(runs, key)
            ax_ap.plot(it, val, style, color=color, label=f"{mode} {key}")
    ax_loss.set(xlabel="iteration", ylabel="loss_cls + loss_box_reg", yscale="log", title="student detection loss")
    ax_ap.set(xlabel="iteration", ylabel="COCO AP (%)", title="student, validation (mean over seeds)")
    ax_loss.legend(fontsize=8)
    ax_ap.legend(fontsize=8)
    table = compare_table(records)
    diffs = [(m, table[f"{m} - baseline"]["AP"]) for m in colors if f"{m} - baseline" in table]
    width = 0.8 / max(len(diffs), 1)
    keys = list(dict.fromkeys(k for _, pairs in diffs for k in pairs["per_seed"]))
    for i, (mode, pairs) in enumerate(diffs):
        xs = [keys.index(k) + (i - (len(diffs) - 1) / 2) * width for k in pairs["per_seed"]]
        ax_diff.bar(xs, list(pairs["per_seed"].values()), width, color=colors[mode],
                    label=f"{mode}: {pairs['mean']:+.2f} ± 2 SE")
        ax_diff.axhline(pairs["mean"], color=colors[mode], linewidth=1)
        ax_diff.axhspan(pairs["mean"] - 2 * pairs["se"], pairs["mean"] + 2 * pairs["se"], color=colors[mode],
                        alpha=0.1)
    if diffs:
        ax_diff.axhline(0, color="k", linewidth=0.8)
        ax_diff.set_xticks(range(len(keys)), keys, rotation=45, fontsize=7)
        ax_diff.legend(fontsize=8)
    ax_diff.set(xlabel="run (seed/fold)", ylabel="AP difference (points)", title="final AP, method - baseline")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _op_report(record):
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


def _format_ap(value):
    return "n/a (no detections)" if value is None else f"{value:.2f}"


def format_op_report(report):
    memory = any("peak_mb" in r for r in report.values() if isinstance(r, dict))
    lines = [f"{'op':16s}{'fused ms':>10s}{'ref ms':>10s}{'speedup':>9s}"
             + (f"{'peak MB':>10s}{'ref MB':>10s}" if memory else "")]
    for op, r in report.items():
        if isinstance(r, dict) and "ms" in r:
            peaks = f"{r.get('peak_mb', float('nan')):10.1f}{r.get('ref_peak_mb', float('nan')):10.1f}" if memory else ""
            lines.append(f"{op:16s}{r['ms']:10.2f}{r['ref_ms']:10.2f}{r['speedup']:8.2f}x" + peaks)
    if "lgd_fwd_share" in report:
        lines.append(f"LGD forward work: {report['lgd_fwd_ms']:.1f} ms of a {report['step_ms']:.1f} ms step "
                     f"({100 * report['lgd_fwd_share']:.1f} %)")
    if "lgd_mem_share" in report:
        lines.append(f"LGD's saved activations: {report['lgd_saved_mb']:.1f} MB of the step's "
                     f"{report['step_saved_mb']:.1f} MB ({100 * report['lgd_mem_share']:.1f} %)")
    return "\n".join(lines)


def _setup_logging(output_dir, verbose):
    """detectron2's logs to output_dir/log.txt; on the console only warnings unless verbose (progress bars
    and results are printed)."""
    for name in ("detectron2", "lgd", "fvcore"):
        log = setup_logger(output=os.path.join(output_dir, "log.txt"), name=name, abbrev_name=name[:3])
        for handler in log.handlers:
            if getattr(handler, "stream", None) in (sys.stdout, sys.stderr) and not verbose:
                handler.setLevel(logging.WARNING)


def build_parser():
    parser = argparse.ArgumentParser(prog="lgd-demo", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="./output/demo")
    parser.add_argument("--compare", action="store_true",
                        help="baseline vs LGD over --seeds (= --methods baseline lgd)")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help="compare these training methods over --seeds, same budget and seeds: any of "
                             f"{', '.join(method_names())} (docs/methods/; not tfkd: it needs an R-CNN, the "
                             "demo's detector is a RetinaNet); stages (FGFI's teacher, LabelEnc's step 1, BAN's "
                             "generations) run inside each run's folder and count in its cost")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="default: 0 (0 1 2 with --compare or --methods)")
    parser.add_argument("--folds", type=int, nargs="+", default=None, metavar="K",
                        help="cross-validation over the 4 source images: run i of --seeds validates on the held-out "
                             "source image K = FOLDS[i %% len(FOLDS)] and trains on the other three (0: the default "
                             "split; lgd.data.DEMO_FOLDS); default: the fixed split")
    parser.add_argument("--fp32", action="store_true",
                        help="train in fp32 NCHW instead of the fast path (bf16 autocast + channels_last where the "
                             "device supports it; lgd-train --fast)")
    parser.add_argument("--iters", type=int, default=None, help="default: 600 on CPU, 2000 on CUDA")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 4 on CPU, 16 on CUDA")
    parser.add_argument("--image-size", type=int, default=None, help="image side (default: the config's, 400)")
    parser.add_argument("--workers", type=int, default=None, help="data loader workers (default: 1 CPU, 4 CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, one per core; OpenMP threads wait passively, "
                             "OMP_WAIT_POLICY=PASSIVE unless set, so a busy machine slows the demo in proportion)")
    parser.add_argument("--ops", metavar="BACKEND", default="auto", help=OPS_HELP + " of the LGD runs; default: auto")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs, continue unfinished ones")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh runs whose folders already exist (default: refuse)")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    parser.add_argument("--data", nargs=3, metavar=("TRAIN_JSON", "VAL_JSON", "IMAGE_ROOT"), default=None,
                        help="a COCO-format dataset instead of the deepforest demo tiles")
    parser.add_argument("--cache-dir", default=None, help="lgd cache (default $LGD_CACHE or ~/.cache/lgd)")
    parser.add_argument("--no-pretrained", action="store_true", help="random backbone init (no ImageNet weights)")
    parser.add_argument("--verbose", action="store_true", help="detectron2's log on the console too")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value overrides of the demo LazyConfig")
    return parser


def _check_arguments(args):
    for name in ("threads", "iters", "batch_size", "workers"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "workers" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be >= {0 if name == 'workers' else 1}, got {value}")
    if args.image_size is not None and args.image_size < 32:
        raise UsageError(f"--image-size must be >= 32, got {args.image_size}")
    check_backend(args.ops)
    unknown = sorted(set(args.methods or ()) - set(method_names()))
    if unknown:
        raise UsageError(f"--methods: unknown {unknown}; choose from {method_names()}")
    if "tfkd" in (args.methods or ()):  # checked here so that no earlier run trains before it fails
        raise UsageError("--methods: tfkd (tf-KD_reg) is defined for R-CNN's softmax box classifier; the demo's "
                         "detector is a RetinaNet",
                         hint="lgd-train --config-file lgd/configs/faster_rcnn_R_50_FPN_1x_lgd.py lgd.method=tfkd")
    if args.methods and args.compare and set(args.methods) != set(MODES):
        raise UsageError("--compare is --methods baseline lgd: give one of them")
    if args.folds is not None and args.data is not None:
        raise UsageError("--folds splits the demo's deepforest images; it cannot be used with --data")
    from ..data import DEMO_FOLDS

    for fold in args.folds or ():
        if not 0 <= fold < len(DEMO_FOLDS):
            raise UsageError(f"--folds: each fold must be in [0, {len(DEMO_FOLDS)}), got {fold}")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other (reuse the runs, or replace them?)")


def run(argv=None):
    """The demo as a function (argv without the program name). Returns summary.json's content (with
    --compare / --methods, the AP table and the cost table too); raises on failure (module docstring)."""
    args = build_parser().parse_args(argv)
    _check_arguments(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    iters, batch, workers = BUDGETS[_device()]
    budget = dict(iters=args.iters or iters, batch_size=args.batch_size or batch, image_size=args.image_size,
                  workers=args.workers if args.workers is not None else workers,
                  pretrained=not args.no_pretrained, fast=not args.fp32, overrides=args.opts)
    methods = list(dict.fromkeys(args.methods)) if args.methods else list(MODES) if args.compare else ["lgd"]
    comparing = len(methods) > 1 or args.compare
    seeds = args.seeds if args.seeds is not None else ([0, 1, 2] if comparing else [0])
    folds = [None if args.folds is None else args.folds[i % len(args.folds)] for i in range(len(seeds))]
    out = args.output_dir
    build_config(out, {"train": "", "val": ""}, **budget)  # the overrides, before anything is written
    earlier = _earlier_outputs(out, [(mode, seed, fold) for seed, fold in zip(seeds, folds) for mode in methods])
    if earlier and not (args.resume or args.overwrite):
        raise UsageError(f"{out} holds an earlier demo ({', '.join(earlier[:2])}{', ...' if len(earlier) > 2 else ''})"
                         ": refusing to overwrite it", hint="--resume reuses or continues its runs, --overwrite "
                         "starts them afresh, or choose another --output-dir")
    start = time.perf_counter()
    # a --data dataset is validated before the output folder is touched; the demo tiles log their preparation
    datasets = prepare_data(args.data, args.cache_dir) if args.data is not None else None
    os.makedirs(out, exist_ok=True)
    _setup_logging(out, args.verbose)
    split = {fold: datasets or prepare_data(None, args.cache_dir, fold) for fold in sorted(set(folds), key=str)}
    records = [run_one(mode, seed, out, split[fold], fold=fold, backend=args.ops, resume=args.resume,
                       overwrite=args.overwrite, **budget)
               for seed, fold in zip(seeds, folds) for mode in methods]
    for rec in records:
        plot_run(rec, os.path.join(out, f"curves_{run_name(rec['mode'], rec['seed'], rec.get('fold'))}.png"))
    # the run summarised: LGD's, else the first method's other than the baseline
    main_run = next((r for r in records if r["mode"] == "lgd"), None) or next(
        (r for r in records if r["mode"] != "baseline"), records[0])
    main_name = run_name(main_run["mode"], main_run["seed"], main_run.get("fold"))
    shutil.copyfile(os.path.join(out, f"curves_{main_name}.png"), os.path.join(out, "curves.png"))
    op_report = _op_report(main_run)
    summary = {
        "command": "lgd-demo " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": DEMO_CONFIG,
        "datasets": next(iter(split.values())) if len(split) == 1 else {f"fold{k}": v for k, v in split.items()},
        "total_wall_s": time.perf_counter() - start,
        "runs": [{k: v for k, v in r.items() if k != "curves"} for r in records],
        "method": main_run["mode"], "results": main_run["results"], "op_report": op_report,
        "final_losses": {k: v[-1][1] for k, v in main_run["curves"].items() if k in LOSS_KEYS + METHOD_LOSS_KEYS},
    }
    ap, ap50 = (_format_ap(main_run["results"][k]) for k in AP_KEYS)
    print(f"\n{main_run['mode']} student on {main_run['datasets']['val']}: AP {ap}, AP50 {ap50} "
          f"({main_run['iterations']} iterations of {main_run['batch_size']} images, {main_run['wall_s']:.0f} s, "
          f"{main_run['s_per_iter'] or float('nan'):.2f} s/iter on {main_run['device']})")
    if op_report:
        print("LGD op report (last, on the run's shapes):\n" + format_op_report(op_report))
    if comparing:
        table, cost = compare_table(records), cost_table(records)
        summary.update(compare=table, cost=cost)
        plot_compare(records, os.path.join(out, "compare.png"))
        with open(os.path.join(out, "compare.json"), "w") as f:
            json.dump({"table": table, "cost": cost, "methods": methods, "seeds": seeds, "folds": folds,
                       "budget": {k: v for k, v in budget.items() if k != "overrides"},
                       "runs": summary["runs"]}, f, indent=1)
        print(f"\n{' vs '.join(methods)}, seeds {seeds}" + (f", folds {folds}" if args.folds else "")
              + " (COCO AP %):\n" + format_table(table))
        print("\ntraining cost per run (mean; stages included):\n" + format_cost(cost))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nwrote {out}/summary.json, curves.png" + (", compare.json, compare.png" if comparing else ""))
    return summary


OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}  # what lgd-demo runs with unless the environment sets an OpenMP policy
_REEXEC_MARK = "LGD_DEMO_OPENMP"


def passive_openmp(argv=None):
    """Restarts this process (once, before any work) with OPENMP_ENV when neither OMP_WAIT_POLICY nor
    GOMP_SPINCOUNT is set: OpenMP reads them when torch loads it, which happened at `import lgd`.
    Why: with the default policy the idle OpenMP threads spin-wait, and when another process takes one of the
    two cores the spinning threads and the descheduled one make a 2-thread step 5-10x slower; passive waiting
    slows it in proportion to the lost core (benchmarks/README.md, "The fast path"). Only for the console
    script (argv None) on a machine without CUDA; run(argv) and other callers are left alone."""
    if argv is not None or torch.cuda.is_available() or os.environ.get(_REEXEC_MARK):
        return
    if any(os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
        return
    env = dict(os.environ, **OPENMP_ENV, **{_REEXEC_MARK: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "lgd.tools.demo", *sys.argv[1:]], env)


def main(argv=None):
    """Console script lgd-demo: run(argv) -> exit status 0, 2 or 1 (lgd.tools.cli); as a console script
    first with passive OpenMP waiting (passive_openmp)."""
    passive_openmp(argv)
    return run_command("lgd-demo", run, argv)


if __name__ == "__main__":
    sys.exit(main())
