"""lgd-eval: COCO evaluation of a checkpoint's student detector (a run's checkpoint or a plain detectron2 one)
with a config's test loader. Argument parsing only: lgd.runner evaluates."""
import argparse
import sys

from detectron2.utils.logger import setup_logger

from ..config import load_config
from ..runner import apply_dataset_arguments, check_run_inputs, evaluate
from .cli import DEBUG_HELP, console_progress, run_command
from .train_net import add_dataset_arguments

__all__ = ["build_parser", "main", "run"]


def build_parser():
    parser = argparse.ArgumentParser(prog="lgd-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE",
                        help="LazyConfig file; for a run, its own OUTPUT/config.yaml")
    parser.add_argument("--checkpoint", required=True, help="a run's or a detectron2 checkpoint (.pth)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="evaluate even when the checkpoint lacks some of the student's weights (left random)")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    add_dataset_arguments(parser, train=False)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value LazyConfig overrides")
    return parser


def run(argv=None):
    """lgd-eval as a function: checks the config and the test dataset, then evaluates. Returns the results."""
    args = build_parser().parse_args(argv)
    cfg = apply_dataset_arguments(load_config(args.config_file, args.opts), args)
    with console_progress():
        check_run_inputs(cfg, training=False)
    setup_logger()
    setup_logger(name="lgd")
    return evaluate(cfg, args.checkpoint, allow_partial=args.allow_partial)


def main(argv=None):
    """Console script lgd-eval: run(argv) -> exit status."""
    return run_command("lgd-eval", run, argv)


if __name__ == "__main__":
    sys.exit(main())
