"""What a run is built from its config: device, fast path, schedule, model, optimizer, loader and trainer.

As detectron2's engine/defaults.py does for its tools, this is the one place a command or a benchmark gets a
run's parts, so that every command trains and evaluates the same model the same way.
"""
import logging

import torch
from detectron2.config import instantiate
from detectron2.data import build_detection_train_loader
from detectron2.engine import SimpleTrainer

from ..data.register import drop_degenerate_boxes
from ..data.samplers import ResumableTrainingSampler
from ..engine.optim import GradientClip
from ..engine.schedule import LGDSchedule
from ..engine.trainer import AMPTrainer, resolve_fast_path, use_channels_last
from ..methods import build_method, stage_checkpoint

__all__ = ["build_model", "build_optimizer", "build_schedule", "build_train_loader", "build_trainer", "data_seed",
           "ddp_kwargs", "fast_path", "run_device"]

logger = logging.getLogger(__name__)


def run_device(cfg):
    """train.device, or the CPU (with a warning) when it names CUDA and CUDA is not available."""
    device = str(cfg.train.get("device", "cuda"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("train.device=%s but CUDA is not available; using cpu", device)
        device = "cpu"
    return device


def data_seed(cfg):
    """train.seed, or 0 when it is unset or negative: unlike detectron2, the data order is fixed by default."""
    seed = int(cfg.train.get("seed", -1))
    return seed if seed >= 0 else 0


def fast_path(cfg, device=None):
    """The run's FastPath (lgd.engine.trainer) of train.amp (enabled, precision, channels_last) on `device`
    (default: run_device)."""
    amp = cfg.train.get("amp", {}) or {}
    return resolve_fast_path(bool(amp.get("enabled", False)), amp.get("precision", "bf16"),
                             amp.get("channels_last", None), run_device(cfg) if device is None else device)


def build_schedule(cfg) -> LGDSchedule:
    """cfg.lgd.schedule scaled to train.max_iter, so a short run keeps the proportions of the paper's schedule."""
    schedule = {k: (tuple(int(x) for x in v) if k == "steps" else v) for k, v in dict(cfg.lgd.schedule).items()}
    return LGDSchedule(**schedule).scaled(int(cfg.train.max_iter))


def build_model(cfg, method=None, checkpoints=None):
    """The method's model around instantiate(cfg.model) on the run's device, channels_last on the fast path.
    method: the run's TrainingMethod (default build_method(cfg)); checkpoints: {stage name: final checkpoint},
    default each stage's under train.output_dir."""
    method = method or build_method(cfg)
    if checkpoints is None:
        checkpoints = {stage.name: stage_checkpoint(cfg.train.output_dir, stage.name) for stage in method.stages()}
    device = run_device(cfg)
    model = method.build(instantiate(cfg.model), dict(checkpoints)).to(device)
    return use_channels_last(model) if fast_path(cfg, device).channels_last else model


def build_optimizer(cfg, model, method=None):
    """The method's optimizer with optimizer.lr / momentum / weight_decay / params.weight_decay_norm (unset: the
    same as weight_decay, as in the authors' configs) and gradient clipping train.clip_gradients.clip_type at
    train.clip_gradients.clip_value (detectron2's SOLVER.CLIP_GRADIENTS; clip_type None: off)."""
    opt, clip = cfg.optimizer, cfg.train.get("clip_gradients", {}) or {}
    norm_decay = opt.get("params", {}).get("weight_decay_norm", None)
    kind = clip.get("clip_type", "value")
    kwargs = dict(lr=float(opt.lr), momentum=float(opt.momentum), weight_decay=float(opt.weight_decay),
                  weight_decay_norm=None if norm_decay is None else float(norm_decay),
                  clip=None if kind is None else GradientClip(str(kind), float(clip.get("clip_value", 1.0))))
    return (method or build_method(cfg)).build_optimizer(model, **kwargs)


def build_train_loader(cfg, start_iter=0):
    """cfg.dataloader.train. When it is detectron2's build_detection_train_loader, its sampler is a
    ResumableTrainingSampler started at start_iter, so a resumed run sees the batches an uninterrupted one
    would, and boxes of width or height <= 0 are dropped (lgd.data.register's rule)."""
    loader_cfg = cfg.dataloader.train
    if loader_cfg.get("_target_") is not build_detection_train_loader or loader_cfg.get("sampler") is not None:
        logger.warning("dataloader.train is not a plain build_detection_train_loader; "
                       "a resumed run will not see the same data order")
        return instantiate(loader_cfg)
    kwargs = {k: instantiate(loader_cfg[k]) for k in loader_cfg if k != "_target_"}
    if isinstance(kwargs["dataset"], list):
        filter_empty = loader_cfg.dataset.get("filter_empty", True) if hasattr(loader_cfg.dataset, "get") else True
        kwargs["dataset"] = drop_degenerate_boxes(kwargs["dataset"], drop_empty_images=bool(filter_empty))[0]
    batch = int(kwargs["total_batch_size"])
    kwargs["sampler"] = ResumableTrainingSampler(len(kwargs["dataset"]), seed=data_seed(cfg), start=start_iter * batch)
    return build_detection_train_loader(**kwargs)


def ddp_kwargs(cfg, device):
    """train.ddp with find_unused_parameters (backbone freezing toggles requires_grad after DDP is built)."""
    kwargs = dict(cfg.train.get("ddp", {}))
    kwargs["find_unused_parameters"] = True
    if device == "cpu":
        kwargs["device_ids"] = None  # a CPU module takes no device ids
    return kwargs


def build_trainer(model, loader, optimizer, fast):
    """detectron2's SimpleTrainer, or lgd's AMPTrainer when the fast path runs autocast."""
    if fast.dtype is None:
        return SimpleTrainer(model, loader, optimizer)
    return AMPTrainer(model, loader, optimizer, device_type=fast.device_type, dtype=fast.dtype)
