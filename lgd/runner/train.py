"""Training and evaluating a run: the method's stages, then the run itself on detectron2's trainer with lgd's
hooks, atomic checkpoints, exact resume, periodic evaluation of the student and the cost record."""
import copy
import glob
import logging
import os
import re
import time

import torch
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter
from detectron2.utils.file_io import PathManager

from ..engine.checkpoint import (AtomicCheckpointer, BackendChoices, DetectorEMAState, remove_stale_temporaries,
                                 student_module)
from ..data.register import NamedImageErrors
from ..engine.hooks import IterationSeed, build_lr_hook
from ..errors import CommandError
from ..methods import build_method, stage_checkpoint
from .build import (build_model, build_optimizer, build_schedule, build_train_loader, build_trainer, data_seed,
                    ddp_kwargs, fast_path, run_device)
from .cost import METRICS_FILE, drop_torn_tail, reset_peak_memory, write_cost
from .stopping import EvalAfterSuccess, StopOnSignal, stop_signals

__all__ = ["evaluate", "method_stages", "test", "train", "train_stages"]

logger = logging.getLogger(__name__)
STAGE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def test(cfg, detector):
    """COCO evaluation (cfg.dataloader.evaluator) of the student detector on cfg.dataloader.test; {} when the
    config has no evaluator."""
    if cfg.dataloader.get("evaluator") is None:
        return {}
    evaluator = instantiate(cfg.dataloader.evaluator)
    results = inference_on_dataset(detector, instantiate(cfg.dataloader.test), evaluator)
    if comm.is_main_process() and results:
        print_csv_format(results)
    return results


def evaluate(cfg, checkpoint, allow_partial=False):
    """test() of the student detector with the weights of `checkpoint`, a wrapper's (its student) or a plain
    detectron2 one. A checkpoint lacking any student weight, or with one of another shape, is a CheckpointError
    unless allow_partial."""
    if not checkpoint:
        raise ValueError("evaluate: checkpoint must name a checkpoint file, got an empty path")
    detector = build_model(cfg, build_method(cfg, "baseline"))
    AtomicCheckpointer(detector).load_checked(checkpoint, allow_partial=allow_partial)
    return test(cfg, detector.eval())


def method_stages(cfg, method):
    """[(stage, its config)] of the method's stages, each config a copy of stage.cfg training into
    OUTPUT/<stage.name>. A stage name must be a folder name used once."""
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
    """Trains the method's stages in order, each into OUTPUT/<stage>: a finished one is reused, a partial one
    continued. Returns {stage name: its final checkpoint}."""
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


def _naming_image_errors(cfg):
    """A copy of cfg whose training mapper names the file, dataset and image id of an image it cannot read."""
    if cfg.dataloader.train.get("mapper") is None:
        return cfg
    cfg = copy.deepcopy(cfg)
    loader = cfg.dataloader.train
    names = loader.get("dataset", {}).get("names")
    names = names if isinstance(names, str) else ", ".join(map(str, names or ()))
    loader.mapper = L(NamedImageErrors)(mapper=loader.mapper, datasets=names)
    return cfg


def _periodic_checkpointer(checkpointer, cfg):
    """detectron2's PeriodicCheckpointer hook knowing the checkpoints already in the folder, so that
    train.checkpointer.max_to_keep applies across resumes (its own list starts empty in every process)."""
    hook = hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
    if hook.max_to_keep is not None:
        hook.recent_checkpoints = sorted(glob.glob(os.path.join(glob.escape(cfg.train.output_dir),
                                                                "model_[0-9]*.pth")))
    return hook


def _load_trainer_state(trainer, state, loaded_from):
    try:
        trainer.load_state_dict(state)
    except ValueError as exc:
        raise CommandError(f"checkpoint {loaded_from}: its optimizer state does not fit this run's parameter "
                           f"groups ({exc})", hint="resume with the config (and overrides) of the run that "
                           "wrote it, e.g. the same optimizer.params.weight_decay_norm") from exc


def train(cfg, *, method=None, backend=None, resume=False, extra_hooks=()):
    """Trains cfg's method (default build_method(cfg, backend=backend)): its stages first, then the run from
    train.init_checkpoint, or from OUTPUT/last_checkpoint with resume=True, to train.max_iter. extra_hooks come
    after lgd's. SIGTERM or SIGUSR1 stops it after the current iteration with a checkpoint (lgd.runner.stopping:
    Preempted). Returns the last evaluation results ({} without an evaluator, or off the main process)."""
    with stop_signals() as received:
        return _train(cfg, method, backend, resume, extra_hooks, received)


def _train(cfg, method, backend, resume, extra_hooks, received):
    schedule = build_schedule(cfg)
    method = method or build_method(cfg, backend=backend)
    checkpoints = train_stages(cfg, method, backend)
    started = time.perf_counter()
    logger.info("Method: %s; schedule: %s", method.name, schedule)
    device = run_device(cfg)
    fast = fast_path(cfg, device)
    (logger.warning if fast.fallback else logger.info)("Precision and memory format: %s", fast.describe())
    seed_all_rng(data_seed(cfg))  # the model's initialisation follows train.seed
    model = build_model(cfg, method, checkpoints)
    logger.info("Model:\n%s", model)
    output_dir = cfg.train.output_dir
    if comm.is_main_process():
        for path in remove_stale_temporaries(output_dir):
            logger.info("removed %s, left by an interrupted checkpoint write", path)
    # weights first, so that the data loader can start where the checkpoint stopped
    detector = student_module(model)
    extra = {"detector_ema": DetectorEMAState(detector), "lgd_ops_auto": BackendChoices()}
    initial = AtomicCheckpointer(model, output_dir, **extra)
    resumed = resume and initial.has_checkpoint()
    loaded = initial.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    trainer_state = loaded.get("trainer") if resumed else None
    start_iter = trainer_state["iteration"] + 1 if trainer_state else 0

    trainer = build_trainer(create_ddp_model(model, **ddp_kwargs(cfg, device)),
                            build_train_loader(_naming_image_errors(cfg), start_iter),
                            build_optimizer(cfg, model, method), fast)
    if trainer_state:
        _load_trainer_state(trainer, trainer_state, loaded_from=initial.get_checkpoint_file())

    checkpointer = AtomicCheckpointer(model, output_dir, trainer=trainer, **extra)
    stop = StopOnSignal(received, checkpointer)
    results = {}

    def test_and_keep():
        results.clear()
        results.update(test(cfg, detector))
        return results

    main = comm.is_main_process()
    if main:
        PathManager.mkdirs(output_dir)
        drop_torn_tail(output_dir)  # before the JSONWriter appends to it
        reset_peak_memory(device)
    writers = [CommonMetricPrinter(schedule.max_iter), JSONWriter(os.path.join(output_dir, METRICS_FILE)),
               TensorboardXWriter(output_dir)] if main else []
    # the method's hooks after the timer (a report's own work is not step time), before the writers (their
    # scalars reach metrics.json)
    trainer.register_hooks([IterationSeed(data_seed(cfg)), build_lr_hook(schedule), hooks.IterationTimer()]
                           + method.hooks(schedule) + [
        hooks.CallbackHook(after_step=lambda _: extra["detector_ema"].gather()),  # each rank's, before a save
        hooks.CallbackHook(after_step=lambda t: extra["lgd_ops_auto"].agree() if t.iter == t.start_iter else None),
        _periodic_checkpointer(checkpointer, cfg) if main else None,
        EvalAfterSuccess(cfg.train.eval_period, test_and_keep),
        stop,  # before the writers: detectron2's printer divides by zero writing one iteration twice in warmup
        hooks.PeriodicWriter(writers, period=cfg.train.log_period) if main else None,
    ] + list(extra_hooks))
    # TorchScript's profiling executor swaps a scripted function (detectron2's focal loss) for a re-derived graph
    # after its first calls in a process, rounding differently: unoptimized, a resumed run stays bit-exact
    try:
        with torch.jit.optimized_execution(False):
            trainer.train(start_iter, schedule.max_iter)
    finally:  # a failed or interrupted run records what it spent too (a resumed run adds to it)
        if main:
            done = min(trainer.iter, schedule.max_iter) if stop.stopped_at is None else stop.stopped_at + 1
            write_cost(cfg, method.name, done, schedule.max_iter,
                       time.perf_counter() - started, device, stages=list(checkpoints), resume=resume)
    return results
