"""lgd-train: end-to-end LGD training / evaluation of a detectron2 RetinaNet (LGD_SPEC §8), LazyConfig based.

    lgd-train --config-file lgd/configs/retinanet_R_50_FPN_1x_lgd.py [--num-gpus N] [--ops fused|reference]
              [--resume] [--eval-only] [--register-coco NAME JSON IMAGE_ROOT ...] [key=value ...]

(also `python -m lgd.train_net ...`). Options are detectron2's default_argument_parser's (--num-machines,
--machine-rank, --dist-url as well) plus:
  --ops fused|reference   lgd_ops backend: "fused" = "auto" (compiled kernels when built), "reference" = pure
                          PyTorch. Default: the config's lgd.backend.
  --register-coco NAME JSON IMAGE_ROOT   register a COCO-format dataset (detectron2's register_coco_instances)
                          before anything is built, in every worker; repeatable. Point the config at it with
                          e.g. dataloader.train.dataset.names=NAME dataloader.test.dataset.names=NAME.
  key=value               LazyConfig overrides (LazyConfig.apply_overrides), after all the options.
The config must define model, dataloader (train, test, evaluator), optimizer (lr, momentum, weight_decay), train
(detectron2's common/train.py keys) and lgd (see lgd/configs/retinanet_R_50_FPN_1x_lgd.py).

What it does: model = LGDDistiller(instantiate(cfg.model)), two SGD optimizers (student + adapter at
optimizer.lr, teacher at lgd.teacher_lr), LGDTrainer (LGDAMPTrainer when train.amp.enabled), hooks:
the LGD schedule hooks, IterationTimer, PeriodicCheckpointer (atomic writes), EvalHook (COCO evaluation of the
STUDENT detector every train.eval_period and at the end), PeriodicWriter (CommonMetricPrinter with ETA,
JSONWriter to OUTPUT/metrics.json). --resume continues from OUTPUT/last_checkpoint; --eval-only evaluates the
student of train.init_checkpoint (or, with --resume, of the last checkpoint) and returns the results.

Schedule rule (build_schedule): the lgd.* iteration counts (steps, warmup_iters, distill_start_iter,
backbone_freeze_iters) are written for lgd.max_iter iterations (90k for 1x). If train.max_iter == lgd.max_iter
they are used as written; otherwise each is scaled by train.max_iter / lgd.max_iter and rounded (the rule of
lgd.trainer.scale_schedule; LR steps kept strictly inside (0, max_iter)), so a short run keeps the proportions
of the paper's schedule. cfg.lr_multiplier is not used.

Checkpoints: `model` holds the whole LGDDistiller (student under `detector.`); train.init_checkpoint may also
be a plain detectron2 checkpoint of the student (keys without `detector.`) or detectron2://... ImageNet weights.
"""
import dataclasses
import logging
import os
import tempfile

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_argument_parser, default_setup, hooks, launch
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter

from .distiller import LGDDistiller
from .op_report import OpReport
from .trainer import LGDAMPTrainer, LGDSchedule, LGDTrainer, build_lgd_hooks, build_lgd_optimizers

__all__ = ["AtomicCheckpointer", "build_parser", "build_schedule", "do_test", "main"]

logger = logging.getLogger("lgd.train_net")
OPS_BACKENDS = {"fused": "auto", "reference": "reference"}


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose files are written atomically: fvcore's Checkpointer.save writes the target
    file in place (PathManager.open(path, "wb")), so a crash mid-write leaves a truncated checkpoint that
    last_checkpoint points to. Here local files go to a temporary file in the same directory, then os.replace.
    Also loads plain detectron2 student checkpoints (no `detector.` prefix) into model.detector."""

    def _atomic_write(self, path, write):
        directory = os.path.dirname(path) or "."
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path), suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def _is_local(self):
        return "://" not in str(self.save_dir)

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        if not self._is_local():
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to {}".format(save_file))
        self._atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        if not self._is_local():
            return super().tag_last_checkpoint(last_filename_basename)
        self._atomic_write(os.path.join(self.save_dir, "last_checkpoint"),
                           lambda f: f.write(last_filename_basename.encode()))

    def _load_file(self, filename):
        loaded = super()._load_file(filename)
        state = loaded.get("model")
        if (isinstance(self.model, LGDDistiller) and isinstance(state, dict) and state
                and not loaded.get("matching_heuristics", False)
                and not any(k.startswith(("detector.", "teacher.", "distill_loss.")) for k in state)):
            loaded["model"] = {"detector." + k: v for k, v in state.items()}  # a plain student checkpoint
        return loaded


def build_parser():
    parser = default_argument_parser(epilog=__doc__.split("\n\n")[1] if __doc__ else None)
    parser.prog = "lgd-train"
    parser.add_argument("--ops", choices=sorted(OPS_BACKENDS), default=None,
                        help="lgd_ops backend: fused (= auto) or reference (default: the config's lgd.backend)")
    parser.add_argument("--register-coco", nargs=3, action="append", default=[],
                        metavar=("NAME", "JSON", "IMAGE_ROOT"), help="register a COCO-format dataset (repeatable)")
    return parser


def build_schedule(cfg) -> LGDSchedule:
    """The LGDSchedule of cfg.lgd for train.max_iter iterations (module docstring: schedule rule)."""
    lgd, max_iter = cfg.lgd, int(cfg.train.max_iter)
    ref_iter = int(lgd.max_iter)
    if max_iter < 1 or ref_iter < 1:
        raise ValueError(f"lgd-train: max_iter must be >= 1 (train.max_iter={max_iter}, lgd.max_iter={ref_iter})")
    ref = LGDSchedule(ref_iter, tuple(int(s) for s in lgd.steps), int(lgd.distill_start_iter),
                      int(lgd.backbone_freeze_iters), int(lgd.warmup_iters), float(lgd.warmup_factor))
    if max_iter == ref_iter:
        return ref

    def scale(n):
        return int(round(n * max_iter / ref_iter))

    steps = tuple(sorted({min(max(scale(s), 1), max_iter - 1) for s in ref.steps})) if max_iter > 1 else ()
    return dataclasses.replace(ref, max_iter=max_iter, steps=steps, distill_start_iter=scale(ref.distill_start_iter),
                               backbone_freeze_iters=scale(ref.backbone_freeze_iters),
                               warmup_iters=scale(ref.warmup_iters))


def do_test(cfg, detector):
    """COCO evaluation (cfg.dataloader.evaluator) of the student detector on cfg.dataloader.test."""
    if "evaluator" not in cfg.dataloader:
        return {}
    evaluator = instantiate(cfg.dataloader.evaluator)
    results = inference_on_dataset(detector, instantiate(cfg.dataloader.test), evaluator)
    if comm.is_main_process() and results:
        print_csv_format(results)
    return results


def _device(cfg):
    device = str(cfg.train.get("device", "cuda"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("lgd-train: train.device=%s but CUDA is not available; using cpu", device)
        device = "cpu"
    return device


def _build_model(cfg, args, device):
    backend = OPS_BACKENDS[args.ops] if args.ops else str(cfg.lgd.get("backend", "auto"))
    detector = instantiate(cfg.model)
    model = LGDDistiller(detector, backend=backend, distill_weight=float(cfg.lgd.get("distill_weight", 1.0)))
    return model.to(device)


def _register_datasets(args):
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    for name, json_file, image_root in args.register_coco:
        if name not in DatasetCatalog.list():
            register_coco_instances(name, {}, json_file, image_root)


def worker(args):
    """One process of lgd-train (launched once per GPU). Returns the last evaluation results (dict)."""
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    default_setup(cfg, args)
    _register_datasets(args)
    device = _device(cfg)
    model = _build_model(cfg, args, device)
    logger.info("LGD model:\n%s", model)

    if args.eval_only:
        AtomicCheckpointer(model, cfg.train.output_dir).resume_or_load(cfg.train.init_checkpoint,
                                                                       resume=args.resume)
        return do_test(cfg, model.detector.eval())

    optimizers = build_lgd_optimizers(model, lr=float(cfg.optimizer.lr), momentum=float(cfg.optimizer.momentum),
                                      weight_decay=float(cfg.optimizer.weight_decay),
                                      weight_decay_norm=float(cfg.optimizer.params.get("weight_decay_norm", 0.0)))
    teacher_lr = cfg.lgd.get("teacher_lr", None)
    if teacher_lr is not None:
        for group in optimizers[1].param_groups:
            group["lr"] = float(teacher_lr)
    # backbone freezing toggles requires_grad after DDP is built: DDP must tolerate unused parameters
    ddp_kwargs = dict(cfg.train.get("ddp", {}))
    ddp_kwargs["find_unused_parameters"] = True
    ddp_model = create_ddp_model(model, **ddp_kwargs)
    train_loader = instantiate(cfg.dataloader.train)
    clip = cfg.lgd.get("clip_grad_norm", None)
    if cfg.train.amp.enabled:
        device_type = "cuda" if device.startswith("cuda") else "cpu"
        trainer = LGDAMPTrainer(ddp_model, train_loader, optimizers, clip_grad_norm=clip,
                                grad_scaler=torch.amp.GradScaler(device_type), device_type=device_type,
                                dtype=None if device_type == "cuda" else torch.bfloat16)
    else:
        trainer = LGDTrainer(ddp_model, train_loader, optimizers, clip_grad_norm=clip)

    schedule = build_schedule(cfg)
    logger.info("LGD schedule: %s", schedule)
    checkpointer = AtomicCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    results = {}

    def test_and_keep():
        results.clear()
        results.update(do_test(cfg, model.detector))
        return results

    trainer.register_hooks(build_lgd_hooks(schedule) + [
        hooks.IterationTimer(),
        OpReport(int(cfg.lgd.get("op_report_period", 1000))),  # lgd/op_report.py; after the timer: not in `time`
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
        hooks.EvalHook(cfg.train.eval_period, test_and_keep),
        hooks.PeriodicWriter([CommonMetricPrinter(schedule.max_iter),
                              JSONWriter(os.path.join(cfg.train.output_dir, "metrics.json"))],
                             period=cfg.train.log_period) if comm.is_main_process() else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, schedule.max_iter)
    return results


def main(argv=None):
    """Entry point of lgd-train (argv: the arguments without the program name; default sys.argv[1:]).
    Returns the evaluation results of a single-process run (None under multi-process launch)."""
    args = build_parser().parse_args(argv)
    if args.num_gpus * args.num_machines <= 1:
        return worker(args)
    launch(worker, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
    return None


if __name__ == "__main__":
    main()
