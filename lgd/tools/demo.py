"""lgd-demo, the main job's command: LGD on real aerial tree images in about ten minutes on 2 CPU cores, and the
comparison of training methods on that data. It parses and checks its arguments, then runs lgd.demo.session;
run(argv) is the Python API (returns summary.json's content, raises), main(argv) the console script."""
import argparse
import os
import sys

import torch

from ..demo.deepforest import DEMO_FOLDS
from ..demo.run import DEMO_CONFIG, MODES
from ..demo.session import run_demo
from ..errors import UsageError
from ..methods import method_names
from ..runner import check_backend
from .cli import DEBUG_HELP, run_command
from .train_net import OPS_HELP

__all__ = ["build_parser", "main", "passive_openmp", "run"]

DESCRIPTION = "LGD on the deepforest tree tiles with a small RetinaNet (MobileNetV2): trained, evaluated, plotted"
EPILOG = f"""examples:
  lgd-demo                                   LGD on the deepforest tree tiles, evaluated and plotted
  lgd-demo --compare --seeds 0 1 2           baseline vs LGD, same budget and seeds: the AP table
  lgd-demo --compare --seeds 0 1 2 3 4 5 --folds 0 1   the same, validated on two held-out source images
  lgd-demo --methods baseline lgd fgfi labelenc        the paper's comparison systems, with their training cost
  lgd-demo --resume                          continue an interrupted run (or comparison)

Options first, key=value overrides of the demo config last (e.g. --seeds 0 1 --iters 100 train.log_period=5);
the config: {DEMO_CONFIG}.

The output folder holds each run (<method>_seed<S>[_fold<F>]/: checkpoints, metrics.json, run.json), summary.json,
curves.png (losses and AP over iterations), predictions.png (validation tiles with the ground truth and the
student's boxes scoring >= 0.5; one column per method, same tiles and seed), with several methods compare.json and
compare.png (mean ± standard error of AP and AP50, the paired difference to the baseline, each method's training
cost), and log.txt (detectron2's log and the evaluations' tables; the console shows a progress bar and one line per
evaluation). An earlier run
there is reused or continued with --resume, started afresh with --overwrite; otherwise the demo refuses (exit 2).

Budget: on CPU 600 iterations of batch 4 at 400 px on the fast path (bf16 autocast + channels_last; --fp32 for
fp32 NCHW), on CUDA 2000 of batch 16; the LGD schedule scales with --iters. As a console script on a machine
without CUDA, lgd-demo restarts itself once with OMP_WAIT_POLICY=PASSIVE unless an OpenMP wait policy is set, so
that a busy machine slows it in proportion. Exit status 0, 2 (usage) or 1 (failure), as every lgd command."""


def build_parser():
    parser = argparse.ArgumentParser(prog="lgd-demo", description=DESCRIPTION, epilog=EPILOG,
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
                             "split; lgd.demo.deepforest.DEMO_FOLDS); default: the fixed split")
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
    for fold in args.folds or ():
        if not 0 <= fold < len(DEMO_FOLDS):
            raise UsageError(f"--folds: each fold must be in [0, {len(DEMO_FOLDS)}), got {fold}")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other (reuse the runs, or replace them?)")


def run(argv=None):
    """The demo as a function (argv without the program name): summary.json's content, or an exception."""
    args = build_parser().parse_args(argv)
    _check_arguments(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    methods = list(dict.fromkeys(args.methods)) if args.methods else list(MODES) if args.compare else ["lgd"]
    seeds = args.seeds if args.seeds is not None else ([0, 1, 2] if len(methods) > 1 else [0])
    return run_demo(args.output_dir, methods=methods, seeds=seeds, folds=args.folds, compare=args.compare,
                    data=args.data, cache_dir=args.cache_dir, backend=args.ops, resume=args.resume,
                    overwrite=args.overwrite, verbose=args.verbose,
                    command="lgd-demo " + " ".join(argv if argv is not None else sys.argv[1:]),
                    iters=args.iters, batch_size=args.batch_size, image_size=args.image_size, workers=args.workers,
                    pretrained=not args.no_pretrained, fast=not args.fp32, overrides=args.opts)


OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}  # what lgd-demo runs with unless the environment sets an OpenMP policy
_REEXEC_MARK = "LGD_DEMO_OPENMP"


def passive_openmp(argv=None):
    """Restarts the console script (argv None) once, before any work, with OPENMP_ENV on a machine without CUDA
    unless an OpenMP wait policy is set: with spin-waiting idle threads, a 2-thread step on a machine where another
    process takes a core runs 5-10x slower, with passive waiting in proportion to the lost core."""
    if (argv is not None or torch.cuda.is_available() or os.environ.get(_REEXEC_MARK)
            or any(os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))):
        return
    env = dict(os.environ, **OPENMP_ENV, **{_REEXEC_MARK: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "lgd.tools.demo", *sys.argv[1:]], env)


def main(argv=None):
    """Console script lgd-demo: run(argv) -> exit status 0, 2 or 1 (lgd.tools.cli), first with passive OpenMP
    waiting (passive_openmp)."""
    passive_openmp(argv)
    return run_command("lgd-demo", run, argv)


if __name__ == "__main__":
    sys.exit(main())
