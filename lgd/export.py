"""lgd-export: the student of an LGD checkpoint as a stock detectron2 checkpoint (LGD adds no inference cost).

    lgd-export --config-file CFG --checkpoint IN.pth --output OUT.pth [key=value ...]

(also `python -m lgd.export ...`). OUT.pth is {"model": the student's state_dict} with detectron2's own keys (the
`detector.` prefix removed; teacher, adapter and the distiller's extra state dropped), so that
`DetectionCheckpointer(instantiate(cfg.model)).load("OUT.pth")` restores the student without any LGD code.
The config builds the student to check the weights against: every key present, none left over, same shapes.
IN may also be a plain detectron2 checkpoint (re-exported as is, checked the same way).
"""
import argparse
import logging

import torch
from detectron2.config import instantiate
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from .checkpoint import atomic_write, student_state_dict
from .train_net import load_config

__all__ = ["export_student", "main"]

logger = logging.getLogger("lgd.export")


def export_student(cfg, checkpoint: str, output: str) -> dict:
    """Writes the student of `checkpoint` to `output` as {"model": state_dict} (module docstring), after
    checking it against instantiate(cfg.model). Returns the written state_dict."""
    with PathManager.open(checkpoint, "rb") as f:
        loaded = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict):
        raise ValueError(f"lgd-export: checkpoint {checkpoint!r} does not hold a dict")
    state = loaded.get("model", loaded)
    student = student_state_dict(state)
    expected = instantiate(cfg.model).state_dict()
    missing, unexpected = sorted(set(expected) - set(student)), sorted(set(student) - set(expected))
    mismatched = [k for k in expected if k in student and tuple(student[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        raise ValueError(f"lgd-export: checkpoint {checkpoint!r} does not fit the config's model: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {mismatched[:5]} (first 5 each)")
    atomic_write(output, lambda f: torch.save({"model": student}, f))
    logger.info("lgd-export: wrote %d student tensors to %s (%d non-student entries dropped)",
                len(student), output, len(state) - len(student))
    return student


def build_parser():
    parser = argparse.ArgumentParser(prog="lgd-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig of the run")
    parser.add_argument("--checkpoint", required=True, help="LGD (or detectron2) checkpoint to export")
    parser.add_argument("--output", required=True, help="where to write the student checkpoint (.pth)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value LazyConfig overrides")
    return parser


def main(argv=None):
    """Entry point of lgd-export (argv without the program name). Returns the written state_dict."""
    args = build_parser().parse_args(argv)
    setup_logger(name="lgd")
    return export_student(load_config(args.config_file, args.opts), args.checkpoint, args.output)


if __name__ == "__main__":
    main()
