"""What a cluster does to a run, tried on lgd-train as a process (test_lgd_train_net's tiny config and data, CPU):
preemption by SIGTERM/SIGUSR1 at a random iteration then --resume gives the uninterrupted run's final weights
bit for bit (one process, and 2 gloo processes), and no failure is followed by the final evaluation."""
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("detectron2")
pytest.importorskip("pycocotools")

from detectron2.engine import HookBase  # noqa: E402

from test_cli_reliability import ENTRY_POINTS, TESTS  # noqa: E402
from test_lgd_train_net import DATASET, ROOT, argv, make_setup, overrides  # noqa: E402

MAX_ITER = 6
STOPPED = re.compile(r"^lgd-train: stopped by (SIG\w+) at iteration (\d+); resume with --resume$")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("lgd_cluster"))


def start(*args, file_size_limit=None):
    """lgd-train as a console script in a new process (as test_cli_reliability.command, without waiting),
    under a file-size limit (bytes) when given."""
    module, func = ENTRY_POINTS["lgd-train"].split(":")
    code = f"import sys; from {module} import {func}; sys.argv[0] = 'lgd-train'; sys.exit({func}())"
    env = dict(os.environ)
    path = [TESTS, ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path))
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=TESTS, env=env,
                            preexec_fn=limit if file_size_limit else None)


def run_args(setup, out, *extra):
    _, cfg_file, ann, images = setup
    return argv(cfg_file, ann, images, str(out), *extra, max_iter=MAX_ITER) + ["train.checkpointer.period=100"]


def finish(proc, timeout=400):
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def iterations_logged(out):
    try:
        with open(os.path.join(out, "metrics.json")) as f:
            return max((json.loads(line)["iteration"] for line in f if line.endswith("\n")), default=-1)
    except (OSError, ValueError):
        return -1


def stop_at_random_iteration(proc, out, signum, seed):
    """Sends `signum` (if any) to proc once metrics.json shows a random iteration in [0, MAX_ITER - 3] done."""
    after = random.Random(seed).randint(0, MAX_ITER - 3)
    deadline = time.time() + 300
    while iterations_logged(out) < after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if signum:
        proc.send_signal(signum)
    return after


def final_weights(out):
    return torch.load(os.path.join(out, "model_final.pth"), weights_only=True)["model"]


def assert_same_weights(want, got):
    assert want.keys() == got.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name


@pytest.mark.parametrize("signum,extra", [(signal.SIGTERM, ()), (signal.SIGUSR1, ("--num-gpus", "2"))],
                         ids=["SIGTERM-1-process", "SIGUSR1-2-processes"])
def test_preempted_run_resumes_bit_exact(setup, signum, extra):
    root = setup[0]
    name = signal.Signals(signum).name
    whole, split = root / f"whole_{name}", root / f"split_{name}"
    reference = start(*run_args(setup, whole, *extra))
    code, err = finish(reference)
    assert code == 0, err[-3000:]

    proc = start(*run_args(setup, split, *extra))
    after = stop_at_random_iteration(proc, str(split), signum, seed=len(extra))
    code, err = finish(proc)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 143, err[-3000:]
    match = STOPPED.match(lines[-1])
    assert match and match.group(1) == name and "Traceback" not in err, err[-3000:]
    stopped = int(match.group(2))
    assert after <= stopped < MAX_ITER - 1
    checkpoint = f"model_{stopped:07d}.pth"
    assert (split / "last_checkpoint").read_text() == checkpoint
    assert not (split / "model_final.pth").exists() and not list(split.glob(".*.lgd-tmp"))
    assert json.loads((split / "cost.json").read_text())["iterations"] == stopped + 1
    assert torch.load(split / checkpoint, weights_only=True)["trainer"]["iteration"] == stopped

    code, err = finish(start(*run_args(setup, split, "--resume", *extra)))
    assert code == 0, err[-3000:]
    assert_same_weights(final_weights(whole), final_weights(split))
    assert json.loads((split / "cost.json").read_text())["iterations"] == MAX_ITER


class PoisonAt(HookBase):
    """At `iteration`, before its step: makes the loss NaN (a NaN weight) or raises KeyboardInterrupt."""

    def __init__(self, iteration, what):
        self.iteration, self.what = iteration, what

    def before_step(self):
        if self.trainer.iter == self.iteration:
            if self.what == "ctrl-c":
                raise KeyboardInterrupt
            with torch.no_grad():
                next(self.trainer.model.parameters()).fill_(float("nan"))


@pytest.mark.parametrize("what", ["nan", "ctrl-c"])
def test_no_final_evaluation_after_a_failure_on_the_last_iteration(setup, tmp_path, monkeypatch, capsys, what):
    from lgd.config import load_config
    from lgd.data import register_coco_once
    import importlib

    runner_train = importlib.import_module("lgd.runner.train")
    from lgd.tools.cli import run_command

    root, cfg_file, ann, images = setup
    register_coco_once(DATASET, ann, images)
    evaluations = []
    monkeypatch.setattr(runner_train, "test", lambda *args: evaluations.append(args) or {})
    cfg = load_config(cfg_file, overrides(str(tmp_path / "out"), max_iter=3))
    status = run_command("lgd-train", lambda _: runner_train.train(cfg, backend="reference",
                                                                      extra_hooks=[PoisonAt(2, what)]), [])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lgd-train:")]
    assert evaluations == []
    if what == "ctrl-c":
        assert status == 130 and lines == ["lgd-train: interrupted"]
    else:
        assert status == 1 and "Loss became infinite or NaN at iteration=2" in lines[0], lines
    assert not (tmp_path / "out" / "model_final.pth").exists()


def test_failed_checkpoint_write_keeps_the_previous_one(setup, tmp_path):
    """A checkpoint write over the file-size limit: one line naming the file and the cause; the previous
    checkpoint, last_checkpoint and no temporary are left."""
    _, cfg_file, ann, images = setup
    out = tmp_path / "run"
    code, err = finish(start(*argv(cfg_file, ann, images, str(out), max_iter=2)))
    assert code == 0, err[-3000:]
    before = {name: (out / name).read_bytes() for name in ("model_0000001.pth", "last_checkpoint")}
    code, err = finish(start(*argv(cfg_file, ann, images, str(out), "--resume", max_iter=4),
                             file_size_limit=2**20))
    (error,) = [line for line in err.splitlines() if line.startswith("lgd-train: error: ")]
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert error.startswith(f"lgd-train: error: cannot write {out / 'model_0000003.pth'}: ") and "file-size" in error
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not list(out.glob(".*.lgd-tmp")) and not (out / "model_0000003.pth").exists()


def test_torn_metrics_line_is_dropped_and_the_resume_goes_on(setup, tmp_path):
    _, cfg_file, ann, images = setup
    out = tmp_path / "run"
    code, err = finish(start(*argv(cfg_file, ann, images, str(out), max_iter=2)))
    assert code == 0, err[-3000:]
    with open(out / "metrics.json", "a") as f:
        f.write('{"iteration": 1, "loss_cl')  # what a full disk leaves
    code, err = finish(start(*argv(cfg_file, ann, images, str(out), "--resume", max_iter=4)))
    assert code == 0, err[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [row["iteration"] for row in rows if "total_loss" in row][-2:] == [2, 3]
    assert json.loads((out / "cost.json").read_text())["iterations"] == 4
    assert f"{out / 'metrics.json'}: removed its torn last line" in (out / "log.txt").read_text()


def test_read_metrics_skips_a_line_that_is_not_a_row(tmp_path):
    import logging

    from lgd.runner.cost import read_metrics

    (tmp_path / "metrics.json").write_text('{"iteration": 0, "time": 1.0}\n{"iter\n{"iteration": 1, "time": 2.0}\n')
    warnings = []
    handler = logging.Handler(logging.WARNING)  # our own: detectron2's setup_logger stops propagation to caplog
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("lgd.runner.cost").addHandler(handler)
    try:
        rows = read_metrics(str(tmp_path))
    finally:
        logging.getLogger("lgd.runner.cost").removeHandler(handler)
    assert [row["time"] for row in rows] == [1.0, 2.0]
    assert warnings == [f"{tmp_path / 'metrics.json'}: line 2 is not a metrics row (torn by an interrupted write?): "
                        "skipped"]


HOLD_LOCK = """
import sys, time
from lgd.runner.lock import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def hold_lock(folder):
    """A process holding folder's lock (until killed)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + ([os.environ["PYTHONPATH"]]
                                                                if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_one_live_run_per_output_folder(setup, tmp_path):
    from lgd.errors import UsageError
    from lgd.runner.lock import output_lock

    _, cfg_file, ann, images = setup
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        with pytest.raises(UsageError, match=re.escape(f"output directory {out} is in use by another run (pid "
                                                       f"{holder.pid} on ")):
            with output_lock(str(out)):
                pass
        code, err = finish(start(*argv(cfg_file, ann, images, str(out), "--resume", max_iter=1)))
        (error,) = [line for line in err.splitlines() if line.startswith("lgd-train: error: ")]
        assert code == 2 and f"{out} is in use by another run (pid {holder.pid}" in error, err[-2000:]
        assert os.listdir(out) == [".lgd-lock"]  # nothing written
    finally:
        holder.kill()  # as kill -9: the OS releases the lock
        holder.wait()
    with output_lock(str(out)):  # a dead process's lock never blocks
        assert (out / ".lgd-lock").read_text().startswith(f"pid {os.getpid()} on ")


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_two_machines(setup, out, *extra, signum=None):
    """lgd-train as two "machines" of one CPU process each on loopback (gloo, --num-machines 2, --machine-rank
    0 and 1, --dist-url tcp://127.0.0.1:PORT) into one folder; with signum, both get it at a random iteration.
    Returns [(status, stderr)] of machine 0 and 1; never waits longer than finish()'s timeout."""
    url = f"tcp://127.0.0.1:{free_port()}"
    procs = [start(*run_args(setup, out, "--num-machines", "2", "--machine-rank", str(rank), "--dist-url", url,
                             *extra)) for rank in (0, 1)]
    try:
        if signum:
            stop_at_random_iteration(procs[0], str(out), None, seed=2)
            for proc in procs:
                proc.send_signal(signum)
        return [finish(proc) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def test_two_machines_match_one_machine_and_resume_exactly(setup):
    root = setup[0]
    one, two, split = root / "one_machine", root / "two_machines", root / "two_machines_split"
    code, err = finish(start(*run_args(setup, one, "--num-gpus", "2")))
    assert code == 0, err[-3000:]
    for code, err in on_two_machines(setup, two):
        assert code == 0, err[-3000:]
    assert_same_weights(final_weights(one), final_weights(two))

    stopped = on_two_machines(setup, split, signum=signal.SIGTERM)
    for code, err in stopped:
        assert code == 143 and STOPPED.match(err.strip().splitlines()[-1]), err[-3000:]
    assert not (split / "model_final.pth").exists()
    for code, err in on_two_machines(setup, split, "--resume"):
        assert code == 0, err[-3000:]
    assert_same_weights(final_weights(one), final_weights(split))
