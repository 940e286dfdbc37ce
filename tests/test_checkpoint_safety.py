"""No code runs from a checkpoint (lgd.engine.weights_pickle, lgd.engine.checkpoint.read_weights_file).

A crafted checkpoint whose unpickling calls os.mkdir(MARKER) goes through every path that loads one (lgd-eval,
lgd-export, train.init_checkpoint, --eval-only, --resume, FGFI's teacher, LabelEnc step 2, BAN's teacher), as
a plain pickle (.pkl, what detectron2's model zoo publishes) and as a torch.save file (.pth), with and without
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1: each is refused with one message naming the file and the global, and
MARKER is never created. Real detectron2-style .pkl weights (numpy arrays, any pickle protocol, numpy < 2's
module names) still load."""
import os
import pickle
import re

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")
pytest.importorskip("pycocotools")

from lgd.engine.checkpoint import AtomicCheckpointer, CheckpointError, read_checkpoint  # noqa: E402
from lgd.engine.weights_pickle import UnsafePickleError, load_weights_pickle  # noqa: E402
from lgd.tools import eval_net, export, train_net  # noqa: E402
from test_cli_reliability import command, failure_lines  # noqa: E402
from test_lgd_train_net import DATASET, argv, make_setup  # noqa: E402


class Payload:
    """Unpickling it calls os.mkdir(path): what a crafted checkpoint would run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def write_payload(path, marker, fmt):
    data = {"model": {"w": Payload(marker)}, "__author__": "x"}
    if fmt == "pickle":
        with open(path, "wb") as f:
            pickle.dump(data, f)
    else:
        torch.save(data, path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("lgd_safety"))


def spec(setup):
    _, _, ann, images = setup
    return f"{DATASET}={ann}:{images}"


def train_argv(setup, out, *extra):
    _, cfg_file, ann, images = setup
    return argv(cfg_file, ann, images, str(out), *extra, max_iter=1)


def load_paths(setup, tmp, checkpoint):
    """{path name: a call loading `checkpoint` through it}."""
    cfg_file = setup[1]
    resume_out = tmp / "resumed"

    def resume():
        resume_out.mkdir()
        os.link(checkpoint, resume_out / os.path.basename(checkpoint))
        (resume_out / "last_checkpoint").write_text(os.path.basename(checkpoint))
        train_net.run(train_argv(setup, resume_out, "--resume"))

    return {
        "eval": lambda: eval_net.run(["--config-file", cfg_file, "--checkpoint", checkpoint, "--test-dataset",
                                      spec(setup), "train.device=cpu"]),
        "export": lambda: export.run(["--config-file", cfg_file, "--checkpoint", checkpoint, "--output",
                                      str(tmp / "student.pth")]),
        "init": lambda: train_net.run(train_argv(setup, tmp / "init", f"train.init_checkpoint={checkpoint}")),
        "eval_only": lambda: train_net.run(train_argv(setup, tmp / "eval_only", "--eval-only",
                                                      f"train.init_checkpoint={checkpoint}")),
        "resume": resume,
        "fgfi_teacher": lambda: train_net.run(train_argv(setup, tmp / "fgfi", "lgd.method=fgfi",
                                                         f"lgd.fgfi.teacher_checkpoint={checkpoint}")),
        "labelenc_step2": lambda: train_net.run(train_argv(setup, tmp / "labelenc", "lgd.method=labelenc",
                                                           f"lgd.labelenc.step1_checkpoint={checkpoint}")),
        "ban_generation": lambda: train_net.run(train_argv(setup, tmp / "ban", "lgd.method=ban",
                                                           "lgd.ban.generation=2",
                                                           f"lgd.ban.teacher_checkpoint={checkpoint}")),
    }


PATHS = ["eval", "export", "init", "eval_only", "resume", "fgfi_teacher", "labelenc_step2", "ban_generation"]


@pytest.mark.parametrize("force_unsafe", [False, True], ids=["default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"])
@pytest.mark.parametrize("fmt", ["pickle", "torch"])
@pytest.mark.parametrize("path", PATHS)
def test_no_load_path_runs_a_checkpoints_code(setup, tmp_path, monkeypatch, path, fmt, force_unsafe):
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = str(tmp_path / "code_ran")
    checkpoint = write_payload(tmp_path / ("payload.pkl" if fmt == "pickle" else "payload.pth"), marker, fmt)
    with pytest.raises(CheckpointError) as info:
        load_paths(setup, tmp_path, checkpoint)[path]()
    assert not os.path.exists(marker), f"{path} ran the checkpoint's code"
    message = str(info.value)
    assert os.path.basename(checkpoint) in message and "posix.mkdir" in message and "not weights" in message, message
    assert "\n" not in message


def test_refusal_is_one_line_from_the_command(setup, tmp_path):
    marker = str(tmp_path / "code_ran")
    checkpoint = write_payload(tmp_path / "payload.pkl", marker, "pickle")
    proc = command("lgd-eval", "--config-file", setup[1], "--checkpoint", checkpoint, "--test-dataset",
                   spec(setup), "train.device=cpu", env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert proc.returncode == 1 and not os.path.exists(marker)
    assert "posix.mkdir" in failure_lines(proc, "lgd-eval")[0]


def test_unsafe_global_refused_before_anything_is_built(tmp_path):
    marker = str(tmp_path / "code_ran")
    path = write_payload(tmp_path / "x.pkl", marker, "pickle")
    with pytest.raises(UnsafePickleError) as info:
        load_weights_pickle(path)
    assert info.value.name == "posix.mkdir" and info.value.path == path and not os.path.exists(marker)


def student(seed):
    from test_lgd_distiller import make_distiller

    return make_distiller(seed=seed).detector


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_detectron2_style_pkl_still_loads(tmp_path, protocol):
    src, dst = student(0), student(1)
    weights = {k: v.numpy().copy() for k, v in src.state_dict().items()}
    path = tmp_path / "model_zoo.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}, f,
                    protocol=protocol)
    AtomicCheckpointer(dst).load_checked(str(path))
    for name, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[name], value), name


def test_caffe2_blobs_with_numpy1_names_load(tmp_path):
    """A Caffe2/ImageNet-style blob dict as numpy < 2 pickled it (numpy.core.multiarray), with a numpy scalar."""
    blobs = {"conv1_w": np.arange(6, dtype=np.float32).reshape(2, 3), "conv1_w_momentum": np.zeros(1),
             "lr": np.float32(0.1)}
    data = pickle.dumps({"blobs": blobs}, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in data
    path = tmp_path / "R-50.pkl"
    path.write_bytes(data)
    loaded = read_checkpoint(str(path))
    assert loaded["matching_heuristics"] and loaded["__author__"] == "Caffe2"
    assert sorted(loaded["model"]) == ["conv1_w", "lr"]  # momentum blobs dropped, as detectron2 does
    np.testing.assert_array_equal(loaded["model"]["conv1_w"], blobs["conv1_w"])


class FailingFile:
    """A file whose third write raises `exc` (what a full disk or Ctrl-C does to torch.save mid-write)."""

    def __init__(self, f, exc):
        self.f, self.exc, self.writes = f, exc, 0

    def write(self, data):
        self.writes += 1
        if self.writes == 3:
            raise self.exc
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def failed_save(tmp_path, exc):
    from lgd.engine.checkpoint import atomic_write

    target = tmp_path / "model_0000001.pth"
    target.write_bytes(b"the previous checkpoint")
    with pytest.raises(BaseException) as info:
        atomic_write(str(target), lambda f: torch.save({"w": torch.zeros(10000)}, FailingFile(f, exc)))
    assert target.read_bytes() == b"the previous checkpoint"
    assert sorted(os.listdir(tmp_path)) == ["model_0000001.pth"]  # no temporary left
    return str(target), info.value


@pytest.mark.parametrize("code, cause", [(28, "the disk is full"), (27, "file-size limit"),
                                         (13, "permission denied")])
def test_failed_write_names_the_file_and_the_cause(tmp_path, code, cause):
    from lgd.engine.checkpoint import WriteError

    target, error = failed_save(tmp_path, OSError(code, os.strerror(code)))
    assert isinstance(error, WriteError)
    assert str(error).startswith(f"cannot write {target}: ") and cause in str(error)
    assert "unexpected pos" not in str(error) and "unchanged" in str(error)


def test_ctrl_c_during_a_save_stays_an_interrupt(tmp_path):
    _, error = failed_save(tmp_path, KeyboardInterrupt())
    assert isinstance(error, KeyboardInterrupt)


def test_file_size_limit_for_real(tmp_path):
    import resource

    from lgd.engine.checkpoint import WriteError, atomic_write

    target = tmp_path / "big.pth"
    target.write_bytes(b"old")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        with pytest.raises(WriteError, match="file-size limit"):
            atomic_write(str(target), lambda f: torch.save({"w": torch.zeros(100000)}, f))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["big.pth"]


@pytest.mark.parametrize("name", ["cut.pkl", "cut.pth"])
def test_truncated_checkpoint_is_one_line_naming_it(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".pkl"):
        path.write_bytes(pickle.dumps({"model": {"w": np.zeros(100)}})[:60])
    else:
        torch.save({"model": {"w": torch.zeros(100)}}, path)
        path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=f"checkpoint {re.escape(str(path))} cannot be read: ") as info:
        read_checkpoint(str(path))
    assert "\n" not in str(info.value)
