"""Checkpoints of LGD runs: atomic writes, and one loader for both key layouts (LGD_SPEC §8).

An LGD checkpoint's `model` is the whole LGDDistiller's state_dict: the student under `detector.`, the teacher
under `teacher.`, the adapter under `distill_loss.` (plus the distiller's extra state). A plain detectron2
checkpoint holds the student's keys only. AtomicCheckpointer loads either into either model (an LGDDistiller,
or the plain student detector: evaluation, baseline runs), and student_state_dict() is the student part of
any of them (lgd-export writes it as a stock detectron2 checkpoint).
"""
import os
import tempfile
from typing import Callable, Dict

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .distiller import LGDDistiller, _hooks_for

__all__ = ["AtomicCheckpointer", "DetectorEMAState", "STUDENT_PREFIX", "atomic_write", "is_lgd_state_dict",
           "student_state_dict"]

STUDENT_PREFIX = "detector."
_LGD_PREFIXES = (STUDENT_PREFIX, "teacher.", "distill_loss.")


def atomic_write(path: str, write: Callable) -> None:
    """Calls write(f) on a temporary file next to `path`, then renames it to `path`: readers never see a
    truncated file, even if the process dies mid-write."""
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


def is_lgd_state_dict(state: Dict) -> bool:
    """Whether a model state_dict is an LGDDistiller's (keys under detector. / teacher. / distill_loss.)."""
    return any(k.startswith(_LGD_PREFIXES) for k in state)


def student_state_dict(state: Dict) -> Dict:
    """The student detector's state_dict (stock detectron2 keys) of an LGD or plain detectron2 state_dict."""
    if not is_lgd_state_dict(state):
        return dict(state)
    return {k[len(STUDENT_PREFIX):]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose files are written atomically: fvcore's Checkpointer.save writes the target
    file in place (PathManager.open(path, "wb")), so a crash mid-write leaves a truncated checkpoint that
    last_checkpoint points to. Here local files go through atomic_write.

    Loading adapts the checkpoint's key layout to the model: a plain detectron2 checkpoint loads into an
    LGDDistiller's student (`detector.` prefixed), an LGD checkpoint into a plain detector (its student part)."""

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
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        if not self._is_local():
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write(os.path.join(self.save_dir, "last_checkpoint"), lambda f: f.write(last_filename_basename.encode()))

    def _load_file(self, filename):
        loaded = super()._load_file(filename)
        state = loaded.get("model")
        if not isinstance(state, dict) or not state or loaded.get("matching_heuristics", False):
            return loaded
        lgd_model = isinstance(self.model, LGDDistiller)
        if lgd_model and not is_lgd_state_dict(state):
            loaded["model"] = {STUDENT_PREFIX + k: v for k, v in state.items()}  # a plain student checkpoint
        elif not lgd_model and is_lgd_state_dict(state):
            loaded["model"] = student_state_dict(state)
        return loaded


class DetectorEMAState:
    """Checkpointable (state_dict / load_state_dict) of a plain detector's EMA loss normalizers (RetinaNet and
    FCOS loss_normalizer): plain attributes that its state_dict lacks, so a resumed baseline run would restart
    them. LGDDistiller keeps the same attributes in its own extra state."""

    def __init__(self, detector):
        self.detector = detector
        try:
            self.names = tuple(_hooks_for(detector).ema_attributes)
        except ValueError:  # a detector LGD does not support: no EMA attributes known
            self.names = ()

    def state_dict(self):
        return {name: float(getattr(self.detector, name)) for name in self.names if hasattr(self.detector, name)}

    def load_state_dict(self, state):
        for name in self.names:
            if name in state:
                setattr(self.detector, name, float(state[name]))
            elif hasattr(self.detector, name):
                delattr(self.detector, name)
