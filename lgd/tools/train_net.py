"""lgd-train / lgd-eval: end-to-end LGD (or baseline) training and evaluation of a detectron2 detector
(docs/method.md §8), LazyConfig based.

    lgd-train --config-file lgd/configs/retinanet_R_50_FPN_1x_lgd.py [--num-gpus N] [--ops BACKEND]
              [--resume | --overwrite] [--eval-only] [--train-dataset SPEC] [--test-dataset SPEC]
              [--dataset SPEC ...] [--debug] [key=value ...]
    lgd-eval  --config-file CFG --checkpoint PATH [--allow-partial] [--test-dataset SPEC] [--dataset SPEC ...]
              [--debug] [key=value ...]

(also `python -m lgd.tools.train_net ...`; lgd-eval is eval_main). lgd-train's options are detectron2's
default_argument_parser's (--num-machines, --machine-rank, --dist-url as well) plus:
  --resume / --overwrite  an output directory (train.output_dir) that is not empty is refused unless --resume
                          (continue from its last checkpoint; the method's stages are reused or continued) or
                          --overwrite (delete the earlier run's files: checkpoints, metrics, logs, events,
                          config.yaml, cost.json and the method's stage folders; other files stay) is given.
  --fast                  the fast path, = train.amp.enabled=True: autocast in lgd.precision (bf16 by default;
                          fp16 with a GradScaler on a GPU without bf16; fp32 with a warning on a CPU without
                          native bf16) and the model and its inputs in channels_last (lgd.channels_last);
                          losses, weights, optimizer state and checkpoints stay fp32 (lgd.engine.trainer).
  --ops BACKEND           lgd_ops backend, lgd_ops' own names: auto (the compiled kernels for the device when
                          built), reference (pure PyTorch), cpu, cuda, triton. Default: the config's lgd.backend.
  --train-dataset SPEC    train on a COCO-format dataset given by path, SPEC = "[NAME=]ann.json:images/"
                          (lgd.data.register_coco_by_path): registers it in every worker, sets
                          dataloader.train.dataset.names and the model's number of classes (the json's categories).
  --test-dataset SPEC     the same for evaluation (dataloader.test.dataset.names; the evaluator follows it).
  --dataset SPEC          only register a COCO-format dataset (repeatable); point the config at it yourself with
                          dataloader.train.dataset.names=NAME. Pascal VOC and COCO itself: detectron2's builtin
                          names under $DETECTRON2_DATASETS (see lgd.data.register).
  --debug                 print the traceback of a failure (also LGD_DEBUG=1); lgd.tools.cli has the exit codes.
  key=value               LazyConfig overrides, after all the options; a key the config does not have is an
                          error naming the closest keys (lgd.tools.overrides; `+key=value` adds one on purpose).
  lgd.method=NAME         the training method (an override): lgd (default), baseline (= lgd.enabled=False), fgfi,
                          labelenc, dml, ban or tfkd, its settings lgd.NAME.KEY=VALUE; a method's stages
                          (teacher pretraining, ...) train first into OUTPUT/<stage>/; OUTPUT/cost.json holds the
                          run's training cost, stages included (docs/methods/README.md).
The config must define model, dataloader (train, test, evaluator), optimizer (lr, momentum, weight_decay), train
(detectron2's common/train.py keys) and lgd (see lgd/configs/retinanet_R_50_FPN_1x_lgd.py).

What lgd-train does: the training method lgd.method (lgd.methods, docs/methods/README.md; default "lgd") first
trains its stages (prerequisite runs: a teacher's pretraining, LabelEnc's step 1) into OUTPUT/<stage name>/, each
by the same train() (a stage whose model_final.pth exists is reused, a partial one continued), then builds the
run's model around the student instantiate(cfg.model): LGD's is LGDDistiller, one SGD (lgd.engine.optim: the
student + adapter groups at optimizer.lr, the teacher's at lgd.teacher_lr, gradient clipping lgd.clip_type /
clip_value); detectron2's SimpleTrainer (lgd.engine.trainer.AMPTrainer when train.amp.enabled / --fast runs
autocast; lgd.precision, lgd.channels_last: lgd.engine.trainer's module docstring), hooks: IterationSeed, the LR
schedule, IterationTimer, the method's hooks (LGD: its schedule hooks and OpReport, lgd.op_report_period, default
1000, 0 = off), PeriodicCheckpointer (atomic writes), EvalHook (COCO evaluation of the STUDENT detector every
train.eval_period and at the end), PeriodicWriter (CommonMetricPrinter with ETA, JSONWriter to
OUTPUT/metrics.json, TensorboardXWriter to OUTPUT). --resume continues from
OUTPUT/last_checkpoint; --eval-only evaluates the student of train.init_checkpoint (or, with --resume, of the
last checkpoint) and returns the results. With --num-gpus N and no CUDA, N CPU processes train with gloo.

Before anything is written (config.yaml included; an earlier run's files stay untouched when a check fails),
lgd-train and lgd-eval check, once and before any process is launched: the config file and every override
key, lgd-train's training method and its settings (lgd.method, lgd.<method>: a usage error) and each of its
stages' configs the same way, the datasets the run reads (lgd.data.register.validate_dataset: registered, json
schema, categories, every image file, the boxes), a local train.init_checkpoint's existence (or that a stage
run before writes it), and the output directory (above; --overwrite also deletes the stages' folders).
lgd-eval refuses a checkpoint that lacks any of the student's weights or has one of another shape (the
list of what is missing) unless --allow-partial; an unreadable, truncated or foreign file is one line
naming it. A run removes the temporaries of an interrupted checkpoint write at its start (lgd.engine.checkpoint),
and seeds the model's initialisation with train.seed (default 0): two runs of one seed match from
iteration 0. Exit status and failure lines: lgd.tools.cli (0 success, 2 usage error, 1 any other failure).

Baseline mode, lgd.enabled=False (= lgd.method=baseline): the plain detector instantiate(cfg.model), one SGD
optimizer (optimizer.*), the same trainer, LR schedule, seeds, evaluation, checkpoints and writers; no teacher,
no distillation and no backbone freezing (those are LGD's). Same numbers with LGD on or off otherwise: the
comparison of the paper. Its checkpoints hold the plain detector (stock detectron2 keys). Every run
checkpoints the student's EMA loss normalizer (RetinaNet/FCOS) under `detector_ema`
(lgd.engine.checkpoint.DetectorEMAState).

Python API (for benchmarks / demos): load_config(path, overrides) -> cfg (strict overrides); build_model(cfg,
lgd_enabled=None, backend=None, checkpoints=None) -> the method's model (LGDDistiller; the baseline's plain
detector) on train.device; train(cfg, lgd_enabled=None,
backend=None, resume=False, extra_hooks=()) -> the last evaluation results ({} without evaluator);
evaluate(cfg, checkpoint, allow_partial=False) -> COCO results of the student of any checkpoint; run(argv) /
eval_run(argv): lgd-train / lgd-eval returning their results and raising on failure (main / eval_main are the
console scripts: they return the exit status). lgd_enabled=None means the config's lgd.enabled (default True).

Schedule rule (build_schedule): lgd.schedule holds the iteration counts (max_iter, steps, distill_start_iter,
backbone_freeze_iters, warmup_iters, warmup_factor) written for lgd.schedule.max_iter iterations (90k for 1x);
a run of train.max_iter iterations scales each by train.max_iter / lgd.schedule.max_iter
(lgd.engine.schedule.LGDSchedule.scaled), so a short run keeps the proportions of the paper's schedule.

Exact resume: the training images come from ResumableTrainingSampler (detectron2's TrainingSampler stream,
continued at iteration * total_batch_size on resume) and IterationSeed reseeds every step, both from
train.seed (0 when unset or negative: unlike detectron2, the data order is fixed by default), so a run
stopped and resumed sees the same batches and losses as an uninterrupted one. Exact for num_workers=0 and
images of one aspect-ratio group (or aspect_ratio_grouping=False): worker processes draw augmentations from
their own RNG streams, and aspect-ratio grouping keeps a partial batch that a checkpoint does not hold.
TorchScript functions (detectron2's focal loss) run without graph optimization while training: the profiling
executor would switch them to a differently rounded graph after their first calls in each process.
A dataloader.train that is not detectron2's build_detection_train_loader is used as is (not exact).

Checkpoints: `model` holds the method's whole model (LGDDistiller or another wrapper: the student under
`detector.`) or, in baseline mode, the plain detector; train.init_checkpoint and lgd-eval's --checkpoint may be
either kind (lgd.engine.checkpoint), or detectron2://... ImageNet weights. lgd-export (lgd.tools.export) writes
the student as a stock detectron2 checkpoint.
"""
import argparse
import copy
import glob
import json
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.config import LazyConfig, instantiate
from detectron2.data import build_detection_train_loader
from detectron2.engine import SimpleTrainer, default_argument_parser, default_setup, hooks, launch
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

import lgd_ops
from lgd_ops.benchmark import proc_status_kib, reset_peak_rss

from ..data.register import (DatasetError, drop_degenerate_boxes, parse_coco_spec, register_coco_by_path,
                             validate_coco_json, validate_dataset)
from ..data.samplers import ResumableTrainingSampler
from ..engine.checkpoint import (AtomicCheckpointer, DetectorEMAState, atomic_write, remove_stale_temporaries,
                                 student_module)
from ..engine.hooks import IterationSeed, build_lr_hook
from ..engine.optim import GradientClip, upgrade_trainer_state
from ..engine.schedule import LGDSchedule
from ..engine.trainer import AMPTrainer, resolve_fast_path, use_channels_last
from ..methods import build_method, stage_checkpoint
from .cli import DEBUG_HELP, CommandError, UsageError, run_command

__all__ = ["AtomicCheckpointer", "apply_dataset_arguments", "build_model", "build_optimizer", "build_parser",
           "build_schedule", "build_train_loader", "check_backend", "check_output_dir", "check_run_inputs", "do_test",
           "eval_main", "eval_run", "evaluate", "fast_path", "launch_cpu", "load_config", "main", "method_stages",
           "read_cost", "read_metrics", "run", "set_num_classes", "train", "train_stages", "write_cost"]

logger = logging.getLogger("lgd.tools.train_net")
OPS_HELP = ("lgd_ops backend: auto (compiled kernels when built), reference (pure PyTorch), cpu, cuda or triton "
            "(lgd_ops' names)")


def build_parser():
    parser = default_argument_parser(epilog="\n\n".join(__doc__.split("\n\n")[1:3]) if __doc__ else None)
    parser.prog = "lgd-train"
    parser.add_argument("--ops", metavar="BACKEND", default=None, help=OPS_HELP + "; default: the config's lgd.backend")
    parser.add_argument("--fast", action="store_true",
                        help="the fast path: train.amp.enabled=True (autocast in lgd.precision, default bf16, where "
                             "the device has it, else fp32 with a warning) and channels_last (lgd.channels_last)")
    parser.add_argument("--overwrite", action="store_true",
                        help="train into a non-empty train.output_dir, deleting the earlier run's files and the "
                             "method's stage folders")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    _add_dataset_arguments(parser, train=True)
    return parser


def _add_dataset_arguments(parser, train):
    spec = "[NAME=]ann.json:images/"
    if train:
        parser.add_argument("--train-dataset", metavar="SPEC", help=f"train on the COCO-format dataset {spec}")
    parser.add_argument("--test-dataset", metavar="SPEC", help=f"evaluate on the COCO-format dataset {spec}")
    parser.add_argument("--dataset", metavar="SPEC", action="append", default=[],
                        help=f"register the COCO-format dataset {spec} (repeatable)")


def build_schedule(cfg) -> LGDSchedule:
    """The run's LGDSchedule: cfg.lgd.schedule scaled to train.max_iter (lgd.engine.schedule)."""
    schedule = {k: (tuple(int(x) for x in v) if k == "steps" else v) for k, v in dict(cfg.lgd.schedule).items()}
    return LGDSchedule(**schedule).scaled(int(cfg.train.max_iter))


def do_test(cfg, detector):
    """COCO evaluation (cfg.dataloader.evaluator) of the student detector on cfg.dataloader.test;
    {} when the config has no evaluator (or dataloader.evaluator=None)."""
    if cfg.dataloader.get("evaluator") is None:
        return {}
    evaluator = instantiate(cfg.dataloader.evaluator)
    results = inference_on_dataset(detector, instantiate(cfg.dataloader.test), evaluator)
    if comm.is_main_process() and results:
        print_csv_format(results)
    return results


def load_config(config_file, overrides=()):
    """LazyConfig.load(config_file) with `key=value` overrides applied strictly (lgd.tools.overrides: a key the
    config does not have is a UsageError naming the closest keys). A missing or broken file: one error naming it."""
    from .overrides import apply_overrides_strict

    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file not found: {config_file}")
    try:
        cfg = LazyConfig.load(config_file)
    except Exception as exc:  # noqa: BLE001 - anything a python config file can raise
        raise CommandError(f"config file {config_file} cannot be loaded: {type(exc).__name__}: {exc}",
                           hint="rerun with --debug for the traceback") from exc
    return apply_overrides_strict(cfg, overrides)


def _device(cfg):
    device = str(cfg.train.get("device", "cuda"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("lgd-train: train.device=%s but CUDA is not available; using cpu", device)
        device = "cpu"
    return device


def _data_seed(cfg):
    seed = int(cfg.train.get("seed", -1))
    return seed if seed >= 0 else 0


def fast_path(cfg, device=None):
    """The run's FastPath (lgd.engine.trainer.resolve_fast_path) of train.amp.enabled, lgd.precision
    (default "bf16") and lgd.channels_last (default None: on with autocast) on `device` (default train.device)."""
    lgd = cfg.get("lgd", {}) or {}
    amp = cfg.train.get("amp", {}) or {}
    return resolve_fast_path(bool(amp.get("enabled", False)), lgd.get("precision", "bf16"),
                             lgd.get("channels_last", None), _device(cfg) if device is None else device)


def build_model(cfg, lgd_enabled=None, backend=None, checkpoints=None):
    """The run's model: its training method's (lgd.methods.build_method: lgd.method, or the baseline when
    lgd_enabled, default cfg.lgd.enabled, is False) build() around instantiate(cfg.model), on train.device, in
    channels_last when the fast path says so (fast_path). LGD: an LGDDistiller; baseline: the plain detector.
    backend: lgd_ops backend, default the config's lgd.backend; checkpoints: {stage name: final checkpoint},
    default each stage's under train.output_dir (lgd.methods.stage_checkpoint)."""
    return _build_model(cfg, build_method(cfg, lgd_enabled, backend), checkpoints)


def _build_model(cfg, method, checkpoints=None):
    if checkpoints is None:
        checkpoints = {stage.name: stage_checkpoint(cfg.train.output_dir, stage.name) for stage in method.stages()}
    device = _device(cfg)
    model = method.build(instantiate(cfg.model), dict(checkpoints)).to(device)
    return use_channels_last(model) if fast_path(cfg, device).channels_last else model


def build_optimizer(cfg, model, method=None):
    """The run's optimizer: method.build_optimizer (default the config's method, lgd.methods.build_method) with
    lr=optimizer.lr, optimizer.momentum / weight_decay / params.weight_decay_norm (absent or None: the same as
    weight_decay, as in the authors' configs) and gradient clipping lgd.clip_type ("value", "norm" or None) at
    lgd.clip_value. LGD: the student's parameter groups at optimizer.lr and the teacher's at lgd.teacher_lr
    (lgd.engine.optim); the baseline and other methods: one SGD over the trainable parameters."""
    opt, lgd = cfg.optimizer, cfg.lgd
    norm_decay = opt.get("params", {}).get("weight_decay_norm", None)
    kind = lgd.get("clip_type", "value")
    kwargs = dict(lr=float(opt.lr), momentum=float(opt.momentum), weight_decay=float(opt.weight_decay),
                  weight_decay_norm=None if norm_decay is None else float(norm_decay),
                  clip=None if kind is None else GradientClip(str(kind), float(lgd.get("clip_value", 1.0))))
    return (method or build_method(cfg)).build_optimizer(model, **kwargs)


def build_train_loader(cfg, start_iter=0):
    """cfg.dataloader.train, with a ResumableTrainingSampler (seed: train.seed, or 0) that starts at
    start_iter * total_batch_size when it is detectron2's build_detection_train_loader (module docstring)."""
    loader_cfg = cfg.dataloader.train
    if loader_cfg.get("_target_") is not build_detection_train_loader or loader_cfg.get("sampler") is not None:
        logger.warning("lgd-train: dataloader.train is not a plain build_detection_train_loader; "
                       "a resumed run will not see the same data order")
        return instantiate(loader_cfg)
    kwargs = {k: instantiate(loader_cfg[k]) for k in loader_cfg if k != "_target_"}
    if isinstance(kwargs["dataset"], list):  # boxes of width or height <= 0: lgd.data.register's rule
        filter_empty = loader_cfg.dataset.get("filter_empty", True) if hasattr(loader_cfg.dataset, "get") else True
        kwargs["dataset"] = drop_degenerate_boxes(kwargs["dataset"], drop_empty_images=bool(filter_empty))[0]
    batch = int(kwargs["total_batch_size"])
    kwargs["sampler"] = ResumableTrainingSampler(len(kwargs["dataset"]), seed=_data_seed(cfg), start=start_iter * batch)
    return build_detection_train_loader(**kwargs)


def _ddp_kwargs(cfg, device):
    # backbone freezing toggles requires_grad after DDP is built: DDP must tolerate unused parameters
    kwargs = dict(cfg.train.get("ddp", {}))
    kwargs["find_unused_parameters"] = True
    if device == "cpu":
        kwargs["device_ids"] = None  # a CPU module takes no device ids
    return kwargs


def _build_trainer(model, loader, optimizer, fast):
    """detectron2's SimpleTrainer, or lgd.engine.trainer.AMPTrainer when the run's FastPath (fast_path:
    train.amp.enabled and lgd.precision) runs autocast: bf16 (CPU with native bf16, CUDA with bf16), fp16 with a
    GradScaler."""
    if fast.dtype is None:
        return SimpleTrainer(model, loader, optimizer)
    return AMPTrainer(model, loader, optimizer, device_type=fast.device_type, dtype=fast.dtype)


def _load_trainer_state(trainer, state, loaded_from):
    """The resumed trainer state (iteration, optimizer, grad scaler); states of the earlier two-optimizer
    trainer are converted. A checkpoint whose optimizer groups differ from this run's is a CommandError."""
    try:
        trainer.load_state_dict(upgrade_trainer_state(state))
    except ValueError as exc:
        raise CommandError(f"checkpoint {loaded_from}: its optimizer state does not fit this run's parameter "
                           f"groups ({exc})", hint="resume with the config (and overrides) of the run that "
                           "wrote it, e.g. the same optimizer.params.weight_decay_norm") from exc


def train(cfg, *, lgd_enabled=None, backend=None, resume=False, extra_hooks=()):
    """Trains cfg with its training method (lgd.method; the baseline with lgd_enabled=False; module docstring):
    first the method's stages (train_stages), then the run itself from train.init_checkpoint, or from
    OUTPUT/last_checkpoint with resume=True, to train.max_iter. extra_hooks are registered after the built-in
    ones. Returns the last evaluation results ({} without evaluator; on the main process)."""
    schedule = build_schedule(cfg)
    method = build_method(cfg, lgd_enabled, backend)
    checkpoints = train_stages(cfg, method, backend)
    started = time.perf_counter()
    logger.info("Method: %s; schedule: %s", method.name, schedule)
    device = _device(cfg)
    fast = fast_path(cfg, device)
    (logger.warning if fast.fallback else logger.info)("Precision and memory format: %s", fast.describe())
    seed_all_rng(_data_seed(cfg))  # the model's initialisation follows train.seed (default 0)
    model = _build_model(cfg, method, checkpoints)
    logger.info("Model:\n%s", model)
    output_dir = cfg.train.output_dir
    if comm.is_main_process():
        for path in remove_stale_temporaries(output_dir):
            logger.info("removed %s, left by an interrupted checkpoint write", path)
    # weights first, so that the data loader can start where the checkpoint stopped
    detector = student_module(model)
    extra = {"detector_ema": DetectorEMAState(detector)}
    initial = AtomicCheckpointer(model, output_dir, **extra)
    resumed = resume and initial.has_checkpoint()
    loaded = initial.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    trainer_state = loaded.get("trainer") if resumed else None
    start_iter = trainer_state["iteration"] + 1 if trainer_state else 0

    trainer = _build_trainer(create_ddp_model(model, **_ddp_kwargs(cfg, device)),
                             build_train_loader(cfg, start_iter), build_optimizer(cfg, model, method), fast)
    if trainer_state:
        _load_trainer_state(trainer, trainer_state, loaded_from=initial.get_checkpoint_file())

    checkpointer = AtomicCheckpointer(model, output_dir, trainer=trainer, **extra)
    results = {}

    def test_and_keep():
        results.clear()
        results.update(do_test(cfg, detector))
        return results

    main = comm.is_main_process()
    if main:
        PathManager.mkdirs(output_dir)
        _reset_peak_memory(device)
    writers = [CommonMetricPrinter(schedule.max_iter), JSONWriter(os.path.join(output_dir, "metrics.json")),
               TensorboardXWriter(output_dir)] if main else []
    # the method's hooks after the timer (a report's own work is not step time), before the writers (their
    # scalars reach metrics.json)
    trainer.register_hooks([IterationSeed(_data_seed(cfg)), build_lr_hook(schedule), hooks.IterationTimer()]
                           + method.hooks(schedule) + [
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main else None,
        hooks.EvalHook(cfg.train.eval_period, test_and_keep),
        hooks.PeriodicWriter(writers, period=cfg.train.log_period) if main else None,
    ] + list(extra_hooks))
    # TorchScript's profiling executor swaps a scripted function (detectron2's focal loss) for a re-derived graph
    # after its first calls in a process, rounding differently: unoptimized, a resumed run stays bit-exact
    try:
        with torch.jit.optimized_execution(False):
            trainer.train(start_iter, schedule.max_iter)
    finally:  # a failed or interrupted run records what it spent too (a resumed run adds to it)
        if main:
            write_cost(cfg, method.name, min(trainer.iter, schedule.max_iter), schedule.max_iter,
                       time.perf_counter() - started, device, stages=list(checkpoints), resume=resume)
    return results


COST_FILE = "cost.json"


def _reset_peak_memory(device):
    """Restarts the peak that _peak_memory_mb reads: CUDA's allocator peak, or the process's peak RSS (Linux)."""
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            reset_peak_rss()
        except OSError:
            pass  # no /proc/self/clear_refs: the peak then covers the process's lifetime


def _peak_memory_mb(device):
    """(MB, kind): the CUDA allocator's peak ("cuda_max_allocated") or the main process's peak resident size
    ("cpu_peak_rss", Linux); (None, None) when neither is available."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    try:
        return proc_status_kib("VmHWM") / 1024, "cpu_peak_rss"
    except (OSError, StopIteration):
        return None, None


def read_cost(output_dir):
    """The cost.json of the run in output_dir (write_cost), or None when it has none."""
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
    """Median of metrics.json's "time" (detectron2's IterationTimer: seconds per iteration after its warm-up),
    None when no row has one."""
    times = [row["time"] for row in read_metrics(output_dir) if "time" in row]
    return statistics.median(times) if times else None


def write_cost(cfg, method, iterations, max_iter, wall_s, device, stages=(), resume=False):
    """Writes OUTPUT/cost.json, the run's training cost (docs/methods/README.md): the method, iterations done of
    max_iter, wall seconds of this run (model build, training, evaluations; a resumed run adds those of the
    pieces before it), median seconds per iteration, peak memory, the cost.json of each stage (under
    OUTPUT/<stage>; null if it has none) and total_wall_s = the stages' total_wall_s + wall_s. Returns it."""
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
            "device": str(device), "world_size": comm.get_world_size(), "stages": stage_costs,
            "total_wall_s": wall_s + sum(c["total_wall_s"] for c in stage_costs.values() if c)}
    atomic_write(os.path.join(output_dir, COST_FILE), lambda f: f.write(json.dumps(cost, indent=2).encode()))
    return cost


STAGE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def method_stages(cfg, method):
    """[(stage, its config)] of a method's stages for a run into cfg.train.output_dir: each config a copy of
    stage.cfg with train.output_dir = OUTPUT/<stage.name>. ValueError for a name that is not a folder name
    (letters, digits, "_", "-") or is used twice."""
    stages, seen = [], set()
    for stage in method.stages():
        if not STAGE_NAME.match(str(stage.name)) or stage.name in seen:
            raise ValueError(f"lgd.method={method.name}: stage name {stage.name!r} must be a folder name (letters, "
                             "digits, '_', '-') used once")
        seen.add(stage.name)
        stage_cfg = copy.deepcopy(stage.cfg)
        stage_cfg.train.output_dir = os.path.join(cfg.train.output_dir, stage.name)
        stages.append((stage, stage_cfg))
    return stages


def train_stages(cfg, method, backend=None):
    """Runs the method's stages in order, each by train() into OUTPUT/<stage.name>: a stage whose final
    checkpoint exists is reused, one with a partial run is continued, a missing one is trained (backend: the
    run's lgd_ops backend). Returns {stage name: its final checkpoint} for method.build."""
    checkpoints = {}
    for stage, stage_cfg in method_stages(cfg, method):
        final = stage_checkpoint(cfg.train.output_dir, stage.name)
        if os.path.isfile(final):
            logger.info("Stage %s of %s: reusing %s", stage.name, method.name, final)
        else:
            logger.info("Stage %s of %s: training into %s", stage.name, method.name, stage_cfg.train.output_dir)
            if comm.is_main_process():
                PathManager.mkdirs(stage_cfg.train.output_dir)
                LazyConfig.save(stage_cfg, os.path.join(stage_cfg.train.output_dir, "config.yaml"))
            train(stage_cfg, backend=backend, resume=True)
            comm.synchronize()  # every process builds the run from the stage's final checkpoint
        checkpoints[stage.name] = final
    return checkpoints


def evaluate(cfg, checkpoint, allow_partial=False):
    """COCO evaluation (do_test) of the student detector instantiate(cfg.model) with the weights of
    `checkpoint`: an LGD checkpoint (its student) or a plain detectron2 one. A checkpoint lacking any of the
    student's weights, or with one of another shape, is a CheckpointError unless allow_partial."""
    if not checkpoint:
        raise ValueError("evaluate: checkpoint must name a checkpoint file, got an empty path")
    detector = build_model(cfg, lgd_enabled=False)
    AtomicCheckpointer(detector).load_checked(checkpoint, allow_partial=allow_partial)
    return do_test(cfg, detector.eval())


def _num_categories(json_file, image_root):
    try:
        with open(json_file) as f:
            return len(json.load(f)["categories"])
    except Exception:  # noqa: BLE001 - let the validation name the problem
        validate_coco_json(json_file, image_root, training=True)
        raise


def set_num_classes(cfg, num_classes):
    """Sets the number of classes of a model-zoo detector config (RetinaNet/FCOS: model.num_classes and
    model.head.num_classes when present; R-CNN: model.roi_heads.num_classes)."""
    model, found = cfg.model, False
    for node in (model, model.get("head"), model.get("roi_heads")):
        if node is not None and "num_classes" in node:
            node.num_classes, found = num_classes, True
    if not found:
        raise ValueError("set_num_classes: the config's model has no num_classes key (model, model.head or "
                         "model.roi_heads); set it with a key=value override instead")


def apply_dataset_arguments(cfg, args):
    """Registers args.dataset / train_dataset / test_dataset (COCO json by path) and points cfg at the last
    two; the train dataset's categories set the model's number of classes."""
    for spec in args.dataset:
        _register(spec, "--dataset")
    if getattr(args, "train_dataset", None):
        cfg.dataloader.train.dataset.names = _register(args.train_dataset, "--train-dataset")
        _, json_file, image_root = parse_coco_spec(args.train_dataset)
        try:
            set_num_classes(cfg, _num_categories(json_file, image_root))
        except DatasetError as exc:
            raise DatasetError(f"--train-dataset: {exc}", hint=exc.hint) from None
    if args.test_dataset:
        cfg.dataloader.test.dataset.names = _register(args.test_dataset, "--test-dataset")
    return cfg


def _register(spec, argument):
    try:
        parse_coco_spec(spec)
    except ValueError as exc:
        raise UsageError(f"{argument}: {exc}") from None
    try:
        return register_coco_by_path(spec)
    except FileNotFoundError as exc:
        raise DatasetError(f"{argument}: {exc}") from None
    except ValueError as exc:  # the name is taken by other files
        raise UsageError(f"{argument}: {exc}") from None


def _names(names):
    return [names] if isinstance(names, str) else [str(n) for n in (names or ())]


def check_backend(name, where="--ops"):
    """A UsageError unless `name` is one of lgd_ops' backend names (auto, reference, cpu, cuda, triton)."""
    try:
        with lgd_ops.use_backend(name):
            pass
    except ValueError as exc:
        raise UsageError(f"{where}: {str(exc).split(': ', 1)[-1]}") from exc


def check_run_inputs(cfg, *, training=True, produced=()):
    """What a run reads, checked before it writes anything (module docstring): when training, the training
    method (lgd.method and its settings: UsageError) and each of its stages' configs in turn, the schedule,
    the datasets of dataloader.train, a local train.init_checkpoint (or one in `produced`: the final checkpoints
    of the stages that run before it); the datasets of dataloader.test when there is an evaluator. Raises
    UsageError / DatasetError / FileNotFoundError / ValueError. Returns the run's TrainingMethod (None when
    not training)."""
    from detectron2.evaluation import COCOEvaluator

    method = None
    if training:
        try:
            method = build_method(cfg)
            stages = method_stages(cfg, method)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        produced = list(produced)
        for stage, stage_cfg in stages:
            try:
                check_run_inputs(stage_cfg, produced=produced)
            except (CommandError, DatasetError) as exc:
                raise type(exc)(f"stage {stage.name} of lgd.method={method.name}: {exc}", hint=exc.hint) from exc
            produced.append(stage_checkpoint(cfg.train.output_dir, stage.name))
        build_schedule(cfg)
        check_backend(str(cfg.lgd.get("backend", "auto")), where="lgd.backend")
        try:
            fast_path(cfg)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        for name in _names(cfg.dataloader.train.get("dataset", {}).get("names")):
            validate_dataset(name, where="dataloader.train.dataset.names", training=True)
        init = cfg.train.get("init_checkpoint", "")
        if init and "://" not in str(init) and not os.path.isfile(init) and init not in produced:
            raise FileNotFoundError(f"train.init_checkpoint: file not found: {init}")
    evaluator = cfg.dataloader.get("evaluator")
    if evaluator is not None:
        target = evaluator.get("_target_") if hasattr(evaluator, "get") else None
        coco = target is COCOEvaluator or str(target).endswith("COCOEvaluator")
        for name in _names(cfg.dataloader.test.get("dataset", {}).get("names")):
            validate_dataset(name, where="dataloader.test.dataset.names", evaluation=coco)
    return method


RUN_FILES = ("model_*.pth", "last_checkpoint", "metrics.json", "config.yaml", "log.txt*", "events.out.tfevents.*",
             "inference", COST_FILE, ".*.lgd-tmp", ".*.tmp")  # what a run writes into train.output_dir (--overwrite)


def check_output_dir(output_dir, *, resume=False, overwrite=False, stages=()):
    """Refuses (UsageError) a non-empty output directory unless resume or overwrite; with overwrite (and no
    resume) deletes the RUN_FILES of an earlier run there and the folders of the method's stages (names in
    `stages`: OUTPUT/<name>). Returns the deleted paths."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other: --resume continues the run in "
                         f"{output_dir}, --overwrite replaces it")
    if not output_dir or "://" in str(output_dir) or not os.path.exists(output_dir):
        return []
    if not os.path.isdir(output_dir):
        raise UsageError(f"train.output_dir={output_dir} is a file, not a directory")
    entries = sorted(os.listdir(output_dir))
    if not entries or resume:
        return []
    if not overwrite:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UsageError(f"output directory {output_dir} is not empty ({shown}): refusing to overwrite an earlier "
                         "run", hint="--resume continues it, --overwrite replaces it, or train.output_dir=NEW_DIR")
    removed = sorted({p for pattern in RUN_FILES + tuple(stages)
                      for p in glob.glob(os.path.join(glob.escape(output_dir), pattern))})
    for path in removed:
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    return removed


def _apply_fast(cfg, args):
    if getattr(args, "fast", False):
        cfg.train.amp.enabled = True
    return cfg


def worker(args, cfg=None):
    """One process of lgd-train (launched once per GPU / CPU process; cfg: the one run() checked, in a single
    process). Returns the last evaluation results."""
    if cfg is None:  # a launched process: run() checked the inputs before launching
        cfg = _apply_fast(apply_dataset_arguments(load_config(args.config_file, args.opts), args), args)
    if args.eval_only:  # writes nothing into the output directory (its config.yaml is the training's)
        setup_logger(distributed_rank=comm.get_rank())
        checkpointer = AtomicCheckpointer(None, cfg.train.output_dir)
        use_last = args.resume and checkpointer.has_checkpoint()
        return evaluate(cfg, checkpointer.get_checkpoint_file() if use_last else cfg.train.init_checkpoint)
    default_setup(cfg, args)  # writes OUTPUT/config.yaml and log.txt
    return train(cfg, backend=args.ops, resume=args.resume)


def _cpu_worker(rank, main_func, world_size, dist_url, args):
    dist.init_process_group("gloo", init_method=dist_url, world_size=world_size, rank=rank)
    comm._LOCAL_PROCESS_GROUP = dist.new_group(list(range(world_size)))  # as detectron2's launch does
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def launch_cpu(main_func, num_processes, dist_url="auto", args=()):
    """detectron2's launch for CPU processes on one machine (its own requires CUDA and NCCL): spawns
    num_processes processes in a gloo process group and calls main_func(*args) in each. dist_url "auto":
    a rendezvous file in a fresh temporary directory (no port to pick)."""
    if num_processes < 2:
        raise ValueError(f"launch_cpu: num_processes must be >= 2, got {num_processes}")
    with tempfile.TemporaryDirectory(prefix="lgd_gloo_") as tmp:
        url = f"file://{os.path.join(tmp, 'rendezvous')}" if dist_url == "auto" else dist_url
        mp.spawn(_cpu_worker, nprocs=num_processes, args=(main_func, num_processes, url, args), daemon=False)


def run(argv=None):
    """lgd-train as a function (argv: the arguments without the program name; default sys.argv[1:]): checks
    every input and the output directory before writing anything (module docstring), then trains. Returns
    the evaluation results of a single-process run (None under multi-process launch); raises on failure."""
    args = build_parser().parse_args(argv)
    if args.ops is not None:
        check_backend(args.ops)
    if not args.config_file:
        raise UsageError("--config-file is required (a LazyConfig, e.g. lgd/configs/retinanet_R_50_FPN_1x_lgd.py)",
                         hint="the bundled demo (LGD on real aerial images, no config needed) is `lgd-demo`")
    if args.overwrite and args.resume:
        raise UsageError("--resume and --overwrite contradict each other (continue the run, or replace it?)")
    cfg = _apply_fast(apply_dataset_arguments(load_config(args.config_file, args.opts), args), args)
    method = check_run_inputs(cfg, training=not args.eval_only)
    if not args.eval_only:
        stages = [stage.name for stage in method.stages()]
        for path in check_output_dir(cfg.train.output_dir, resume=args.resume, overwrite=args.overwrite,
                                     stages=stages):
            logger.info("--overwrite: removed %s", path)
    if args.num_gpus * args.num_machines <= 1:
        return worker(args, cfg)
    if torch.cuda.is_available():
        launch(worker, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    elif args.num_machines > 1:
        raise ValueError("lgd-train: --num-machines > 1 needs CUDA (CPU processes run on one machine only)")
    else:
        launch_cpu(worker, args.num_gpus, dist_url=args.dist_url, args=(args,))
    return None


def main(argv=None):
    """Console script lgd-train (with a config file): run(argv) -> exit status 0, 2 or 1 (lgd.tools.cli)."""
    return run_command("lgd-train", run, argv)


def build_eval_parser():
    parser = argparse.ArgumentParser(prog="lgd-eval", description="COCO evaluation of a checkpoint's student "
                                     "detector (LGD or plain detectron2 checkpoint) with the config's test loader")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig file")
    parser.add_argument("--checkpoint", required=True, help="LGD or detectron2 checkpoint (.pth)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="evaluate even when the checkpoint lacks some of the student's weights (left random)")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    _add_dataset_arguments(parser, train=False)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value LazyConfig overrides")
    return parser


def eval_run(argv=None):
    """lgd-eval as a function (single process): checks the config and the test dataset, then evaluates the
    checkpoint's student (evaluate). Returns the evaluation results; raises on failure."""
    args = build_eval_parser().parse_args(argv)
    cfg = apply_dataset_arguments(load_config(args.config_file, args.opts), args)
    check_run_inputs(cfg, training=False)
    setup_logger()
    setup_logger(name="lgd")
    return evaluate(cfg, args.checkpoint, allow_partial=args.allow_partial)


def eval_main(argv=None):
    """Console script lgd-eval: eval_run(argv) -> exit status 0, 2 or 1 (lgd.tools.cli)."""
    return run_command("lgd-eval", eval_run, argv)


if __name__ == "__main__":
    sys.exit(main())
