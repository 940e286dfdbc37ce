"""The student of a run's checkpoint written as a stock detectron2 checkpoint: {"model": its state_dict} with
detectron2's own keys (the wrapper's `detector.` prefix removed, teacher and adapters dropped), checked against
the config's model: every key present, none left over, same shapes."""
import logging
import os

import torch
from detectron2.config import instantiate
from detectron2.utils.file_io import PathManager

from ..engine.checkpoint import CONFIG_HINT, CheckpointError, atomic_write, read_checkpoint, student_state_dict

__all__ = ["export_student"]

logger = logging.getLogger(__name__)


def export_student(cfg, checkpoint: str, output: str, overwrite: bool = False) -> dict:
    """Writes the student of `checkpoint` to `output` as {"model": state_dict} (module docstring), after
    checking it against instantiate(cfg.model); an existing `output` only with overwrite. Returns the written
    state_dict."""
    if os.path.lexists(output) and not overwrite:
        raise FileExistsError(f"{output} exists: refusing to overwrite it")
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
                              hint=CONFIG_HINT)
    atomic_write(output, lambda f: torch.save({"model": student}, f))
    logger.info("lgd-export: wrote %d student tensors to %s (%d non-student entries dropped)",
                len(student), output, len(state) - len(student))
    return student
