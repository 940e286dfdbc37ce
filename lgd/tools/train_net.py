"""lgd-train: trains a detectron2 detector with LGD, the baseline or a comparison method (lgd.method), from a
LazyConfig. Argument parsing only: lgd.runner checks, builds and trains (docs/method.md §8, README)."""
import contextlib
import os
import sys

from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import load_config
from ..engine.checkpoint import AtomicCheckpointer
from ..errors import UsageError
from ..runner import (apply_dataset_arguments, check_backend, check_output_dir, check_run_inputs, evaluate,
                      launch_run, train)
from ..runner.checks import remove_run_files
from ..runner.lock import output_lock
from .cli import DEBUG_HELP, console_progress, console_without_tracebacks, run_command

__all__ = ["build_parser", "main", "run"]

OPS_HELP = "lgd_ops backend: auto (the fastest built kernels), reference (pure PyTorch), cpu, cuda or triton"
EPILOG = """\
A non-empty train.output_dir needs --resume (continue its last checkpoint; the method's stages are reused or
continued) or --overwrite (delete the earlier run's files and stage folders); a folder another live run
writes to is refused (a lock, OUTPUT/.lgd-lock). Overrides come last: key=value, a key the config lacks is an
error naming the closest ones (+key=value adds one). lgd.method picks the training method (lgd, baseline,
fgfi, labelenc, dml, ban, tfkd; settings lgd.<method>.*). Several machines: the same command on each with
--num-machines M, its own --machine-rank and --dist-url tcp://HOST0:PORT (machine rank 0's address, which
checks, locks and writes train.output_dir; without CUDA, gloo CPU processes). Exit status: 0, 2 on a usage
error, 1 on any other failure (one line; --debug adds the traceback), 130 on Ctrl-C, 143 when SIGTERM or
SIGUSR1 stopped the run after the current iteration with a checkpoint (continue with --resume)."""


def add_dataset_arguments(parser, train):
    """--train-dataset (when training), --test-dataset and --dataset: COCO-format datasets given by path."""
    spec = "[NAME=]ann.json:images/"
    if train:
        parser.add_argument("--train-dataset", metavar="SPEC", help=f"train on the COCO-format dataset {spec} "
                            "(sets dataloader.train.dataset.names and the model's number of classes)")
    parser.add_argument("--test-dataset", metavar="SPEC", help=f"evaluate on the COCO-format dataset {spec}")
    parser.add_argument("--dataset", metavar="SPEC", action="append", default=[],
                        help=f"register the COCO-format dataset {spec} (repeatable)")


def build_parser():
    parser = default_argument_parser(epilog=EPILOG)
    parser.prog = "lgd-train"
    parser.add_argument("--ops", metavar="BACKEND", default=None, help=OPS_HELP + "; default: the config's lgd.backend")
    parser.add_argument("--fast", action="store_true",
                        help="the fast path, train.amp.enabled=True: autocast (bf16 where the device has it) and "
                             "channels_last; weights, losses and checkpoints stay fp32")
    parser.add_argument("--overwrite", action="store_true",
                        help="train into a non-empty train.output_dir, deleting the earlier run's files")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    add_dataset_arguments(parser, train=True)
    return parser


def setup(args):
    """The run's config: the file, its overrides, the dataset arguments and --fast."""
    cfg = apply_dataset_arguments(load_config(args.config_file, args.opts), args)
    if args.fast:
        cfg.train.amp.enabled = True
    return cfg


def worker(args, cfg=None):
    """One process of lgd-train (cfg: the one run() checked, in a single process)."""
    cfg = setup(args) if cfg is None else cfg
    if args.eval_only:  # writes nothing into the output folder
        setup_logger(distributed_rank=comm.get_rank())
        console_without_tracebacks()
        checkpointer = AtomicCheckpointer(None, cfg.train.output_dir)
        use_last = args.resume and checkpointer.has_checkpoint()
        return evaluate(cfg, checkpointer.get_checkpoint_file() if use_last else cfg.train.init_checkpoint)
    config_yaml = os.path.join(cfg.train.output_dir, "config.yaml")
    if comm.is_main_process() and os.path.islink(config_yaml):
        os.remove(config_yaml)  # the run's config.yaml replaces the link, never the file it points to
    default_setup(cfg, args)  # writes OUTPUT/config.yaml and log.txt
    for name in ("lgd", "lgd_ops"):  # the runner's and the ops' messages (auto's choices) beside detectron2's
        setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name=name)
    console_without_tracebacks()
    return train(cfg, backend=args.ops, resume=args.resume)


def run(argv=None):
    """lgd-train as a function: checks every input and the output folder, then trains. Returns the evaluation
    results of a single-process run (None when launched); raises on failure."""
    args = build_parser().parse_args(argv)
    if args.ops is not None:
        check_backend(args.ops)
    if not args.config_file:
        raise UsageError("--config-file is required (a LazyConfig, e.g. lgd/configs/retinanet_R_50_FPN_1x_lgd.py)",
                         hint="the bundled demo (LGD on real aerial images, no config needed) is `lgd-demo`")
    if args.overwrite and args.resume:
        raise UsageError("--resume and --overwrite contradict each other (continue the run, or replace it?)")
    cfg = setup(args)
    with console_progress():
        method = check_run_inputs(cfg, training=not args.eval_only)
    # the output folder is machine rank 0's: it checks and locks it (another machine may share its file system)
    owner = not args.eval_only and args.machine_rank == 0
    removed = check_output_dir(cfg.train.output_dir, resume=args.resume, overwrite=args.overwrite,
                               stages=[stage.name for stage in method.stages()]) if owner else []
    with output_lock(cfg.train.output_dir) if owner else contextlib.nullcontext():
        remove_run_files(removed)
        for path in removed:
            setup_logger(name="lgd").info("--overwrite: removed %s", path)
        one_process = args.num_gpus * args.num_machines <= 1
        return launch_run(worker, (args, cfg) if one_process else (args,), num_gpus=args.num_gpus,
                          num_machines=args.num_machines, machine_rank=args.machine_rank, dist_url=args.dist_url)


def main(argv=None):
    """Console script lgd-train: run(argv) -> exit status."""
    return run_command("lgd-train", run, argv)


if __name__ == "__main__":
    sys.exit(main())
