"""One demo run: the demo config for a budget and its datasets, one training method trained and evaluated through
lgd.runner, and the run's record (run.json). On the console a run shows a progress bar and one line per
evaluation; what the evaluation prints (pycocotools' tables) goes to the log instead."""
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time

import torch
from detectron2.engine import HookBase
from tqdm import tqdm

from ..config import apply_overrides_strict, load_config
from ..data.register import register_coco_once, validate_coco_json
from ..errors import UsageError
from ..methods import method_names
from ..runner import fast_path, read_cost, read_metrics, run_device, train
from ..runner.predict import Predictor
from .deepforest import demo_dataset_names, register_demo_datasets

__all__ = ["AP_KEYS", "BUDGETS", "DEMO_CONFIG", "LOSS_KEYS", "METHOD_LOSS_KEYS", "MODES", "build_config",
           "predict_tiles", "prepare_data", "run_name", "run_one"]

logger = logging.getLogger(__name__)
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "retinanet_mobilenetv2_lgd.py")
# (iterations, images per batch, data loader workers) by device
BUDGETS = {"cpu": (600, 4, 1), "cuda": (2000, 16, 4)}
EVALS_PER_RUN = 4  # COCO evaluations during a run (the last one at the end)
MODES = ("baseline", "lgd")  # --compare's methods; --methods takes any of lgd.methods.method_names()
LOSS_KEYS = ("total_loss", "loss_cls", "loss_box_reg", "loss_cls_tea", "loss_box_reg_tea", "loss_distill")
# the comparison systems' own losses (docs/methods/): plotted with the rest when a run logs them
METHOD_LOSS_KEYS = ("loss_imitation", "loss_labelenc", "loss_distill_peer", "loss_tfkd")
AP_KEYS = ("AP", "AP50")


class Progress(HookBase):
    """A tqdm bar over the run's iterations (ETA, latest total loss) and, after each evaluation, one line with the
    student's AP and AP50 on `console` (the evaluation hook has put them into the event storage)."""

    def __init__(self, label: str, console):
        self.label, self.console = label, console
        self._bar, self._reported = None, None

    def before_train(self):
        self._bar = tqdm(total=self.trainer.max_iter, initial=self.trainer.start_iter, desc=self.label,
                         unit="it", dynamic_ncols=True)

    def after_step(self):
        history = self.trainer.storage.histories().get("total_loss")
        if history is not None:
            self._bar.set_postfix(loss=f"{history.latest():.3f}", refresh=False)
        self._bar.update(1)
        self._report_evaluation()

    def after_train(self):
        self._report_evaluation()  # the last evaluation runs in the evaluation hook's after_train, before this one
        self._bar.close()

    def _report_evaluation(self):
        latest = self.trainer.storage.latest()
        if "bbox/AP" not in latest or latest["bbox/AP"][1] == self._reported:
            return
        ap, self._reported = latest["bbox/AP"]
        ap50 = latest.get("bbox/AP50", (math.nan,))[0]
        done = min(self._reported + 1, self.trainer.max_iter)
        results = f"AP {ap:.2f} AP50 {ap50:.2f}" if math.isfinite(ap) else "no detections (AP n/a)"
        self._bar.clear()
        print(f"[{self.label}] iter {done}/{self.trainer.max_iter}: {results}", file=self.console, flush=True)
        self._bar.refresh()


class _LogLines:
    """A text stream that logs each line written to it at INFO: print() output into the demo's log.txt."""

    def __init__(self, log):
        self._log, self._pending = log, ""

    def write(self, text):
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            if line.strip():
                self._log.info(line)
        return len(text)

    def flush(self):
        pass


@contextlib.contextmanager
def printed_to_log(log=logger):
    """Within it, sys.stdout goes to `log` line by line."""
    stream = _LogLines(log)
    try:
        with contextlib.redirect_stdout(stream):
            yield
    finally:
        stream.write("\n")  # a last line printed without its newline


def prepare_data(data=None, cache_dir=None, fold=None):
    """Registers the datasets and returns {"train": name, "val": name, "stats": ...}: the deepforest demo tiles
    (lgd.demo.deepforest; fold k: the cross-validation split holding out source image k) or, with
    data=(train_json, val_json, image_root), that COCO dataset."""
    if data is None:
        paths = register_demo_datasets(cache_dir, fold)
        train_name, val_name = demo_dataset_names(fold)
        return {"train": train_name, "val": val_name, "stats": paths.get("stats", {})}
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
    (train.amp.enabled) unless fast=False, then `overrides` (key=value). EVALS_PER_RUN evaluations and an op
    report every quarter of the run; checkpoints likewise."""
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


def run_one(mode, seed, output_dir, datasets, *, fold=None, backend="auto", resume=False, overwrite=False,
            **budget):
    """Trains and evaluates one run of the training method `mode` (lgd.methods.method_names(): "lgd", "baseline",
    "fgfi", ...; its stages inside the run's folder) into output_dir/run_name(mode, seed, fold); returns its
    record (also saved as run.json there): results, curves, wall time, cost (stages included), budget. An
    earlier run there is reused or continued with resume, started afresh with overwrite, else a UsageError."""
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
    label = f"{mode} seed {seed}" + ("" if fold is None else f" fold {fold}")
    start = time.perf_counter()
    progress = Progress(label, console=sys.stdout)  # the console, which printed_to_log hides from the evaluations
    with printed_to_log():  # train() adds the op report (cfg.lgd.op_report_period)
        results = train(cfg, backend=backend, resume=resume, extra_hooks=[progress])
    wall_s = time.perf_counter() - start
    cost, rows = read_cost(run_dir), read_metrics(run_dir)
    record = {
        "mode": mode, "seed": seed, "fold": fold, "datasets": {k: datasets[k] for k in ("train", "val")},
        "backend": backend if mode != "baseline" else None, "precision": fast_path(cfg).describe(),
        "iterations": int(cfg.train.max_iter), "batch_size": int(cfg.dataloader.train.total_batch_size),
        "image_size": int(cfg.dataloader.train.mapper.augmentations[0].max_size),
        "device": run_device(cfg), "threads": torch.get_num_threads(), "wall_s": wall_s,
        "total_wall_s": cost["total_wall_s"],  # the run and its stages (teacher pretraining, LabelEnc step 1, ...)
        "stages_wall_s": {k: (v or {}).get("total_wall_s") for k, v in (cost.get("stages") or {}).items()},
        "s_per_iter": cost["s_per_iter"],
        "results": {k: _number(results.get("bbox", {}).get(k)) for k in AP_KEYS + ("AP75",)},
        "curves": _curves(rows), "run_dir": run_dir,
    }
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    return record


def predict_tiles(records, datasets, count=4, **budget):
    """The validation tiles of predictions.png and each run's student on them: (up to `count` dataset dicts
    spread evenly over datasets["val"], their RGB images, {mode: [Instances per tile]}) for `records` (one run
    per method, same seed and fold; each predicted from its model_final.pth with the config it trained with)."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import convert_image_to_rgb, read_image

    dicts = DatasetCatalog.get(datasets["val"])
    tiles = [dicts[i * len(dicts) // count] for i in range(min(count, len(dicts)))]
    images, predictions = None, {}
    for record in records:
        cfg = build_config(record["run_dir"], datasets, seed=record["seed"], **budget)
        cfg.lgd.method = record["mode"]
        predictor = Predictor(cfg, os.path.join(record["run_dir"], "model_final.pth"))
        inputs = [read_image(tile["file_name"], format=predictor.input_format) for tile in tiles]
        images = images or [convert_image_to_rgb(x, predictor.input_format) for x in inputs]
        predictions[record["mode"]] = predictor(inputs)
    return tiles, images, predictions
