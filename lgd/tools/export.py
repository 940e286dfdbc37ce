"""lgd-export: the student of an lgd-train checkpoint (LGD or any lgd.methods method) as a stock detectron2
checkpoint (the methods add no inference cost).

    lgd-export --config-file CFG --checkpoint IN.pth --output OUT.pth [--overwrite] [--debug] [key=value ...]

(also `python -m lgd.tools.export ...`). OUT.pth is {"model": the student's state_dict} with detectron2's own keys (the
`detector.` prefix removed; teacher, adapter and the distiller's extra state dropped), so that
`DetectionCheckpointer(instantiate(cfg.model)).load("OUT.pth")` restores the student without any LGD code.
The config builds the student to check the weights against: every key present, none left over, same shapes.
IN may also be a plain detectron2 checkpoint (re-exported as is, checked the same way).

OUT is never overwritten silently: an existing OUT (IN itself included) is refused unless --overwrite (the
write is atomic, so even OUT = IN with --overwrite never leaves a half-written file). Exit status and the
one-line failures (an unreadable or truncated IN names the file): lgd.tools.cli. The Python API: run(argv) and
export_student(cfg, checkpoint, output, overwrite=False) return the written state_dict; main(argv) is the
console script and returns the exit status.
"""
import argparse
import logging
import os
import sys

import torch
from detectron2.config import instantiate
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from ..engine.checkpoint import CheckpointError, atomic_write, read_checkpoint, student_state_dict
from .cli import DEBUG_HELP, UsageError, run_command
from .train_net import load_config

__all__ = ["check_output", "export_student", "main", "run"]

logger = logging.getLogger("lgd.tools.export")


def check_output(checkpoint: str, output: str, overwrite: bool = False) -> None:
    """UsageError when `output` exists (or is `checkpoint` itself) and not overwrite, or is a directory."""
    if os.path.isdir(output):
        raise UsageError(f"--output {output} is a directory; give the file to write, e.g. {output}/student.pth")
    if overwrite or not os.path.exists(output):
        return
    same = os.path.exists(checkpoint) and os.path.samefile(checkpoint, output)
    what = "is the input checkpoint itself" if same else "exists"
    raise UsageError(f"--output {output} {what}: refusing to overwrite it",
                     hint="choose another --output, or pass --overwrite to replace it")


def export_student(cfg, checkpoint: str, output: str, overwrite: bool = False) -> dict:
    """Writes the student of `checkpoint` to `output` as {"model": state_dict} (module docstring), after
    checking it against instantiate(cfg.model); an existing `output` only with overwrite. Returns the written
    state_dict."""
    check_output(checkpoint, output, overwrite)
    if "://" in checkpoint:
        with PathManager.open(checkpoint, "rb") as f:
            loaded = torch.load(f, map_location="cpu", weights_only=True)
    else:
        loaded = read_checkpoint(checkpoint)
    if not isinstance(loaded, dict):
        raise CheckpointError(f"checkpoint {checkpoint} holds a {type(loaded).__name__}, expected a dict")
    state = loaded.get("model", loaded)
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"checkpoint {checkpoint} holds no model weights")
    student = student_state_dict(state)
    expected = instantiate(cfg.model).state_dict()
    missing, unexpected = sorted(set(expected) - set(student)), sorted(set(student) - set(expected))
    mismatched = [k for k in expected if k in student and tuple(student[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        raise CheckpointError(f"checkpoint {checkpoint} does not fit the config's model: {len(missing)} missing "
                              f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, {len(mismatched)} "
                              f"of another shape {mismatched[:5]} (first 5 each)",
                              hint="use the config (and overrides) of the run that wrote the checkpoint")
    atomic_write(output, lambda f: torch.save({"model": student}, f))
    logger.info("lgd-export: wrote %d student tensors to %s (%d non-student entries dropped)",
                len(student), output, len(state) - len(student))
    return student


def build_parser():
    parser = argparse.ArgumentParser(prog="lgd-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig of the run")
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
