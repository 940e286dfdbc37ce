"""Checkpoints of lgd-train runs: atomic writes, and one loader for both key layouts (docs/method.md §8).

A wrapper checkpoint's `model` is the state_dict of a training method's model (lgd.methods): the student under
`detector.` and the method's other parts beside it (LGD: the teacher under `teacher.`, the adapter under
`distill_loss.`, plus the distiller's extra state; another method: its teacher, peer, ...). A plain detectron2
checkpoint (the baseline's) holds the student's keys only. AtomicCheckpointer loads either into either model (a
wrapper, or the plain student detector: evaluation, baseline runs), and student_state_dict() is the student part
of any of them (lgd-export writes it as a stock detectron2 checkpoint).

Files: atomic_write writes next to the target (`.NAME.<random>.lgd-tmp`) and renames, so a reader never sees
a half-written checkpoint; the file gets the mode of any new file under the process umask (0644 under umask
0022), not mkstemp's 0600. A process killed mid-write leaves its temporary behind: remove_stale_temporaries
(called by lgd.runner.train at every start and resume) deletes them. Reading a checkpoint that is missing,
truncated or not a checkpoint (read_checkpoint, and every AtomicCheckpointer load: resume, init_checkpoint,
lgd-eval) is a CheckpointError naming the file; AtomicCheckpointer.load_checked (lgd-eval) also refuses
weights that do not fit the model (missing, or of another shape) unless allow_partial.

No code runs from a checkpoint: every load goes through read_weights_file (weights-only torch.load, or the
restricted unpickler of lgd.engine.weights_pickle for `.pkl`), never detectron2's or fvcore's plain pickle.
"""
import errno
import glob
import os
import re
import tempfile
import threading
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from detectron2.utils import comm

from ..errors import CommandError
from ..modeling.detector_drivers import build_detector_driver
from .weights_pickle import UnsafePickleError, load_weights_pickle

__all__ = ["CONFIG_HINT", "AtomicCheckpointer", "BackendChoices", "CheckpointError", "DetectorEMAState", "INIT_MODULES",
           "STUDENT_PREFIX", "atomic_write", "is_wrapper_state_dict", "read_checkpoint", "read_weights_file",
           "remove_stale_temporaries", "student_module", "student_state_dict", "WriteError"]

STUDENT_PREFIX = "detector."
# a wrapper attribute: the names of its detectors that a name-matched init checkpoint (ImageNet .pkl) initialises,
# default ("detector",), the student only (DML: both students; never a teacher copy of the detector)
INIT_MODULES = "init_checkpoint_modules"
TMP_SUFFIX = ".lgd-tmp"
# what a command says when a checkpoint does not fit its config: the run's own config holds its overrides
CONFIG_HINT = "pass the run's own config, --config-file OUTPUT/config.yaml (train.output_dir of the run that wrote it)"
UNSAFE_HINT = "configs are code, checkpoints are data: convert trusted weights to a dict of tensors or numpy arrays"
_umask_lock = threading.Lock()


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""

    def __init__(self, message: str, hint: Optional[str] = None):
        super().__init__(message)
        self.hint = hint


def _new_file_mode() -> int:
    with _umask_lock:  # the umask can only be read by setting it
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


class WriteError(CommandError):
    """A file that could not be written; the message names it and the cause, and says the old file is intact."""


# what a failed write's errno means to the user
_WRITE_CAUSES = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                 errno.EFBIG: "the file would exceed the process's file-size limit (ulimit -f)",
                 errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                 errno.EROFS: "the file system is read-only"}


def atomic_write(path: str, write: Callable) -> None:
    """Calls write(f) on a temporary file next to `path`, then renames it to `path`: readers never see a
    truncated file, even if the process dies mid-write. The file gets the umask's mode (module docstring).
    On failure the temporary is removed and `path` is left as it was: a WriteError names the file and the
    cause (disk full, file-size limit, permission), and Ctrl-C during the write stays a KeyboardInterrupt."""
    directory = os.path.dirname(path) or "."
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=TMP_SUFFIX)
        os.fchmod(fd, _new_file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        failure = _write_failure(path, exc)
        if failure is exc:
            raise
        raise failure from exc


def _write_failure(path: str, exc: BaseException) -> BaseException:
    """What a failed atomic_write raises: torch.save reports a failed write as "unexpected pos", with the
    OSError or KeyboardInterrupt that caused it in the exception's context."""
    chain, seen = exc, []
    while chain is not None and chain not in seen:
        seen.append(chain)
        chain = chain.__cause__ or chain.__context__
    if any(isinstance(e, KeyboardInterrupt) for e in seen):
        return KeyboardInterrupt()
    oserror = next((e for e in seen if isinstance(e, OSError)), None)
    if oserror is None:
        return exc
    cause = _WRITE_CAUSES.get(oserror.errno, oserror.strerror or str(oserror))
    return WriteError(f"cannot write {path}: {cause} ({type(oserror).__name__}: {oserror.strerror or oserror}); "
                      "the file it would replace is unchanged")


def remove_stale_temporaries(directory: str) -> list:
    """Deletes the temporaries atomic_write leaves in `directory` when a process dies mid-write (call it when
    no other process writes there: at the start of a run). Returns the removed paths."""
    if not directory or "://" in str(directory) or not os.path.isdir(directory):
        return []
    stale = glob.glob(os.path.join(glob.escape(directory), ".*" + TMP_SUFFIX))
    for path in stale:
        os.remove(path)
    return stale


def read_checkpoint(path: str) -> Dict:
    """The dict in a local checkpoint file (read_weights_file); CheckpointError naming the file when it is
    missing, unreadable, truncated, not a dict, or names code (module docstring)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}" if not os.path.exists(path)
                              else f"checkpoint is not a file: {path}")
    try:
        loaded = read_weights_file(path)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors of a truncated or foreign file vary
        raise _read_error(path, exc) from exc
    if not isinstance(loaded, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(loaded).__name__}, expected a dict of weights")
    return loaded


def read_weights_file(path: str):
    """What a weight file holds, code never run: `.pkl` through load_weights_pickle, laid out as detectron2
    reads it (its model zoo's {"model", "__author__"}, or a Caffe2/ImageNet blob dict as name-matched
    weights); `.pyth` (pycls) as name-matched weights; anything else torch.load(weights_only=True), which
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD does not override when passed explicitly."""
    if path.endswith(".pkl"):
        data = load_weights_pickle(path)
        if not isinstance(data, dict) or ("model" in data and "__author__" in data):
            return data
        blobs = data.get("blobs", data)  # detection models keep their weights under blobs, ImageNet ones do not
        return {"model": {k: v for k, v in blobs.items() if not k.endswith("_momentum")}, "__author__": "Caffe2",
                "matching_heuristics": True}
    with open(path, "rb") as f:
        data = torch.load(f, map_location="cpu", weights_only=True)
    if path.endswith(".pyth") and isinstance(data, dict) and "model_state" in data:
        state = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
        return {"model": state, "__author__": "pycls", "matching_heuristics": True}
    return data


_TORCH_REFUSED = re.compile(r"GLOBAL (\S+)")


def _read_error(path: str, exc: BaseException) -> CheckpointError:
    """The CheckpointError of a checkpoint that failed to load: the global it was refused for, else the reason."""
    if isinstance(exc, UnsafePickleError):
        return CheckpointError(f"checkpoint {exc}", hint=UNSAFE_HINT)
    refused = _TORCH_REFUSED.search(str(exc)) if "Weights only load failed" in str(exc) else None
    if refused:
        return CheckpointError(f"checkpoint {path} needs {refused.group(1)}, which is not weights: refused before "
                               "anything in it ran (torch.load weights_only=True)", hint=UNSAFE_HINT)
    return CheckpointError(f"checkpoint {path} cannot be read: {_reason(exc)}",
                           hint="a truncated file (interrupted copy or save?) or not a checkpoint")


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # torch.load's long weights_only notice: keep the unpickler's reason
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else "(no message)"
    return f"{type(exc).__name__}: {first[:160]}"


def student_module(model: nn.Module) -> nn.Module:
    """The student of a training method's model: its `detector` (LGDDistiller, any wrapper) or, for a plain
    detector (the baseline), the model itself."""
    detector = getattr(model, "detector", None)
    return detector if isinstance(detector, nn.Module) else model


def is_wrapper_state_dict(state: Dict) -> bool:
    """Whether a model state_dict is a wrapper's (the student's keys under detector.), not a plain detector's."""
    return any(k.startswith(STUDENT_PREFIX) for k in state)


def student_state_dict(state: Dict) -> Dict:
    """The student detector's state_dict (stock detectron2 keys) of a wrapper's or a plain detectron2 state_dict."""
    if not is_wrapper_state_dict(state):
        return dict(state)
    return {k[len(STUDENT_PREFIX):]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose files are written atomically: fvcore's Checkpointer.save writes the target
    file in place (PathManager.open(path, "wb")), so a crash mid-write leaves a truncated checkpoint that
    last_checkpoint points to. Here local files go through atomic_write.

    Loading adapts the checkpoint's key layout to the model: a plain detectron2 checkpoint loads into a
    wrapper's student (`detector.` prefixed), a wrapper's checkpoint into a plain detector (its student part),
    and name-matched weights (detectron2's matching heuristics: ImageNet .pkl files) into a wrapper's student
    only (or the detectors its `init_checkpoint_modules` names), never into its other parts: a teacher that is a
    copy of the detector would match every key too."""

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

    def load_checked(self, path: str, allow_partial: bool = False) -> Dict:
        """Loads the model weights of `path` (a local file or a detectron2:// URL): CheckpointError naming the
        file when it cannot be read, holds no weights, or (unless allow_partial) when any of the model's
        weights is missing from it or has another shape. Checkpointables are not loaded. Returns the rest."""
        local = path if os.path.isfile(path) or "://" not in path else self.path_manager.get_local_path(path)
        if not os.path.isfile(local):
            read_checkpoint(local)  # raises, naming the file
        loaded = self._load_file(local)
        state = loaded.get("model") if isinstance(loaded, dict) else None
        if not isinstance(state, dict) or not state:
            raise CheckpointError(f"checkpoint {path} holds no model weights (expected a dict with a 'model' entry)")
        expected = len(self.model.state_dict())
        incompatible = self._load_model(loaded)
        missing, shapes = list(incompatible.missing_keys), list(incompatible.incorrect_shapes)
        if (missing or shapes) and not allow_partial:
            parts = []
            if missing:
                parts.append(f"{len(missing)} of the model's {expected} weights are missing ({_first(missing)})")
            if shapes:
                parts.append(f"{len(shapes)} have another shape (" + _first(
                    [f"{k}: {tuple(c)} in the checkpoint, {tuple(m)} in the model" for k, c, m in shapes]) + ")")
            raise CheckpointError(f"checkpoint {path} does not fit the model: " + "; ".join(parts),
                                  hint=CONFIG_HINT + "; --allow-partial evaluates anyway with the missing "
                                       "weights left random")
        self._log_incompatible_keys(incompatible)
        return loaded

    def _load_file(self, filename):
        loaded = read_checkpoint(filename)
        if "model" not in loaded:  # a bare state_dict
            loaded = {"model": loaded}
        elif "__author__" in loaded:
            self.logger.info("Reading a file from '%s'", loaded["__author__"])
        state = loaded.get("model")
        if not isinstance(state, dict) or not state:
            return loaded
        wrapper = student_module(self.model) is not self.model
        if loaded.get("matching_heuristics", False):
            if wrapper:  # e.g. ImageNet weights: matched to each detector that starts from them, one at a time
                self._convert_ndarray_to_tensor(state)
                matched = {}
                for name in getattr(self.model, INIT_MODULES, ("detector",)):
                    aligned = align_and_update_state_dicts(getattr(self.model, name).state_dict(), dict(state),
                                                           c2_conversion=loaded.get("__author__", None) == "Caffe2")
                    matched.update({f"{name}.{k}": v for k, v in aligned.items()})
                loaded.update(model=matched, matching_heuristics=False)
            return loaded
        if wrapper and not is_wrapper_state_dict(state):
            loaded["model"] = {STUDENT_PREFIX + k: v for k, v in state.items()}  # a plain student checkpoint
        elif not wrapper and is_wrapper_state_dict(state):
            loaded["model"] = student_state_dict(state)
        return loaded


def _first(items, n=3):
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


class BackendChoices:
    """Checkpointable of lgd_ops' auto choices (the backend measured fastest per op, device, dtype and layout),
    so that a resumed run runs the same kernels as the run it continues and stays bit-exact."""

    def state_dict(self):
        import lgd_ops

        return {"choices": lgd_ops.auto_choices()}

    def load_state_dict(self, state):
        import lgd_ops

        lgd_ops.set_auto_choices(state.get("choices", {}))

    def agree(self):
        """Every process adopts the main process's choices (call it in every process, after the first step).
        Each process measures on its own first calls, and only the main process's choices reach a checkpoint:
        a process that had chosen otherwise would run other kernels after a resume than before."""
        import lgd_ops

        if comm.get_world_size() > 1:
            lgd_ops.set_auto_choices(comm.all_gather(lgd_ops.auto_choices())[0])


class DetectorEMAState:
    """Checkpointable (state_dict / load_state_dict) of a detector's EMA loss normalizers (RetinaNet and FCOS
    loss_normalizer): plain attributes that its state_dict lacks, so a resumed run would restart them. The one
    mechanism for every run: the student of any training method (student_module), the baseline's detector.
    Each process's normalizer follows its own images, and only the main process saves: gather() (every
    process, before a save) puts every rank's values into the checkpoint, and each rank resumes its own."""

    def __init__(self, detector):
        self.detector = detector
        try:
            self.names = tuple(build_detector_driver(detector).ema_attributes)
        except ValueError:  # a detector LGD does not support: no EMA attributes known
            self.names = ()
        self.ranks = None

    def _local(self):
        return {name: float(getattr(self.detector, name)) for name in self.names if hasattr(self.detector, name)}

    def gather(self):
        """Collects every rank's values (a collective call: every process calls it at the same iteration)."""
        if self.names and comm.get_world_size() > 1:
            self.ranks = comm.all_gather(self._local())

    def state_dict(self):
        return dict(self._local(), ranks=self.ranks) if self.ranks else self._local()

    def load_state_dict(self, state):
        ranks = state.get("ranks")
        if ranks and len(ranks) == comm.get_world_size():
            state = ranks[comm.get_rank()]
        for name in self.names:
            if name in state:
                setattr(self.detector, name, float(state[name]))
            elif hasattr(self.detector, name):
                delattr(self.detector, name)
