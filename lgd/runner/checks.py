"""What a run reads and writes, checked before it writes anything: the method and its stages, the schedule,
the backend, the fast path, the datasets, the initial checkpoint and the output folder. A failed check leaves
an earlier run's files untouched."""
import glob
import json
import os
import shutil

import lgd_ops

from ..data.register import DatasetError, parse_coco_spec, register_coco_by_path, validate_coco_json, validate_dataset
from ..errors import CommandError, UsageError
from ..methods import build_method, stage_checkpoint
from .build import build_schedule, fast_path
from .cost import COST_FILE
from .lock import LOCK_FILE
from .train import method_stages

__all__ = ["RUN_FILES", "apply_dataset_arguments", "check_backend", "check_output_dir", "check_run_inputs",
           "remove_run_files", "set_num_classes"]

# what a run writes into train.output_dir: what --overwrite deletes
RUN_FILES = ("model_*.pth", "last_checkpoint", "metrics.json", "config.yaml", "log.txt*", "events.out.tfevents.*",
             "inference", COST_FILE, ".*.lgd-tmp")
# detectron2's ImageNet weights that the configs' train.init_checkpoint names (lgd/configs/_lgd_config.py:
# DEPTHS, DCN_BACKBONES), by file name: where a missing local copy comes from
IMAGENET_WEIGHTS = {name: f"https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/{org}/{name}"
                    for org, name in (("MSRA", "R-50.pkl"), ("MSRA", "R-101.pkl"), ("FAIR", "X-101-32x8d.pkl"))}


def _num_categories(json_file, image_root):
    try:
        with open(json_file) as f:
            return len(json.load(f)["categories"])
    except Exception:  # noqa: BLE001 - let the validation name the problem
        validate_coco_json(json_file, image_root, training=True)
        raise


def set_num_classes(cfg, num_classes):
    """Sets the number of classes of a model-zoo detector config (model, model.head or model.roi_heads)."""
    model, found = cfg.model, False
    for node in (model, model.get("head"), model.get("roi_heads")):
        if node is not None and "num_classes" in node:
            node.num_classes, found = num_classes, True
    if not found:
        raise ValueError("set_num_classes: the config's model has no num_classes key (model, model.head or "
                         "model.roi_heads); set it with a key=value override instead")


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


def _names(names):
    return [names] if isinstance(names, str) else [str(n) for n in (names or ())]


def check_backend(name, where="--ops"):
    """A UsageError unless `name` is one of lgd_ops' backend names."""
    try:
        with lgd_ops.use_backend(name):
            pass
    except ValueError as exc:
        raise UsageError(f"{where}: {str(exc).split(': ', 1)[-1]}") from exc


def _check_numbers(cfg):
    """UsageError naming the key when one of the numbers lgd.runner.build_optimizer reads is not a number."""
    opt, clip = cfg.optimizer, cfg.train.get("clip_gradients", {}) or {}
    values = {"optimizer.lr": opt.get("lr"), "optimizer.momentum": opt.get("momentum"),
              "optimizer.weight_decay": opt.get("weight_decay"),
              "optimizer.params.weight_decay_norm": opt.get("params", {}).get("weight_decay_norm", 0.0),
              "train.clip_gradients.clip_value": clip.get("clip_value", 1.0)}
    for key, value in values.items():
        if value is None and key == "optimizer.params.weight_decay_norm":
            continue
        try:
            float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{key}={value!r} must be a number") from None


def check_run_inputs(cfg, *, training=True, produced=()):
    """Checks what a run reads. When training: the method and its settings, each stage's config in turn, the
    schedule, the backend, the fast path, the training datasets and a local train.init_checkpoint (or one in
    `produced`, written by a stage before); always the test datasets when there is an evaluator. Returns the
    run's TrainingMethod (None when not training)."""
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
        _check_numbers(cfg)
        check_backend(str(cfg.lgd.get("backend", "auto")), where="lgd.backend")
        try:
            fast_path(cfg)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        for name in _names(cfg.dataloader.train.get("dataset", {}).get("names")):
            validate_dataset(name, where="dataloader.train.dataset.names", training=True)
        init = cfg.train.get("init_checkpoint", "")
        if init and "://" not in str(init) and not os.path.isfile(init) and init not in produced:
            source = IMAGENET_WEIGHTS.get(os.path.basename(str(init)))
            raise FileNotFoundError(f"train.init_checkpoint: file not found: {init}"
                                    + (f" (detectron2's ImageNet weights, from {source})" if source else ""))
    evaluator = cfg.dataloader.get("evaluator")
    if evaluator is not None:
        target = evaluator.get("_target_") if hasattr(evaluator, "get") else None
        coco = target is COCOEvaluator or str(target).endswith("COCOEvaluator")
        for name in _names(cfg.dataloader.test.get("dataset", {}).get("names")):
            validate_dataset(name, where="dataloader.test.dataset.names", evaluation=coco)
    return method


def check_output_dir(output_dir, *, resume=False, overwrite=False, stages=()):
    """Refuses (UsageError) a non-empty output folder (its lock file aside) unless resume or overwrite. Returns
    what overwrite deletes there (remove_run_files): the RUN_FILES of the earlier run and its stage folders
    (`stages`); writes nothing."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other: --resume continues the run in "
                         f"{output_dir}, --overwrite replaces it")
    if not output_dir or "://" in str(output_dir) or not os.path.exists(output_dir):
        return []
    if not os.path.isdir(output_dir):
        raise UsageError(f"train.output_dir={output_dir} is a file, not a directory")
    entries = sorted(e for e in os.listdir(output_dir) if e != LOCK_FILE)
    if not entries or resume:
        return []
    if not overwrite:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UsageError(f"output directory {output_dir} is not empty ({shown}): refusing to overwrite an earlier "
                         "run", hint="--resume continues it, --overwrite replaces it, or train.output_dir=NEW_DIR")
    return sorted({p for pattern in RUN_FILES + tuple(stages)
                   for p in glob.glob(os.path.join(glob.escape(output_dir), pattern))})


def remove_run_files(paths):
    """Deletes the files and folders check_output_dir returned (lgd-train does, holding the folder's lock)."""
    for path in paths:
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
