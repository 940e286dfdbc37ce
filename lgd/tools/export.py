"""lgd-export: the student of a run's checkpoint as a stock detectron2 checkpoint, which detectron2 loads
without lgd (the methods add no inference cost). An existing --output is never replaced without --overwrite.
Argument parsing only: lgd.runner.export_student checks and writes."""
import argparse
import os
import sys

from detectron2.utils.logger import setup_logger

from ..config import load_config
from ..errors import UsageError
from ..runner import export_student
from .cli import DEBUG_HELP, run_command

__all__ = ["build_parser", "check_output", "main", "run"]


def check_output(checkpoint: str, output: str, overwrite: bool = False) -> None:
    """UsageError when `output` exists (a dangling symlink included; or is `checkpoint` itself) and not
    overwrite, is a directory, or its folder does not exist."""
    if os.path.isdir(output):
        raise UsageError(f"--output {output} is a directory; give the file to write, e.g. {output}/student.pth")
    folder = os.path.dirname(output) or "."
    if not os.path.isdir(folder):
        raise UsageError(f"--output {output}: folder {folder} does not exist", hint=f"create it: mkdir -p {folder}")
    if overwrite or not os.path.lexists(output):
        return
    same = os.path.exists(checkpoint) and os.path.exists(output) and os.path.samefile(checkpoint, output)
    what = "is the input checkpoint itself" if same else "exists"
    raise UsageError(f"--output {output} {what}: refusing to overwrite it",
                     hint="choose another --output, or pass --overwrite to replace it")


def build_parser():
    parser = argparse.ArgumentParser(prog="lgd-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE",
                        help="LazyConfig of the run: its own OUTPUT/config.yaml")
    parser.add_argument("--checkpoint", required=True, help="LGD (or detectron2) checkpoint to export")
    parser.add_argument("--output", required=True, help="where to write the student checkpoint (.pth)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value LazyConfig overrides")
    return parser


def run(argv=None):
    """lgd-export as a function (argv without the program name). Returns the written state_dict; raises."""
    args = build_parser().parse_args(argv)
    check_output(args.checkpoint, args.output, args.overwrite)  # before the (slow) config and model
    cfg = load_config(args.config_file, args.opts)
    setup_logger(name="lgd")
    return export_student(cfg, args.checkpoint, args.output, overwrite=args.overwrite)


def main(argv=None):
    """Console script lgd-export: run(argv) -> exit status 0, 2 or 1 (lgd.tools.cli); nothing else printed."""
    return run_command("lgd-export", run, argv)


if __name__ == "__main__":
    sys.exit(main())
