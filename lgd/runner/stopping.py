"""How a run stops early: preemption (SIGTERM, or SIGUSR1 which some schedulers send first) finishes the current
iteration, writes a checkpoint and stops with exit status 143; no failure or interruption is followed by the
final evaluation.

A cluster scheduler sends SIGTERM before it kills a job. stop_signals() records the signal instead of dying;
StopOnSignal, after each iteration, agrees with the other processes (the first signal any of them got) so every
rank stops at the same iteration, saves a checkpoint there (atomically, on the main process) and raises
Preempted, which the command reports as one line, after train() has written cost.json.
"""
import contextlib
import signal
import threading

from detectron2.engine import HookBase, hooks
from detectron2.utils import comm

from ..errors import CommandError

__all__ = ["PREEMPTED_EXIT", "STOP_SIGNALS", "EvalAfterSuccess", "Preempted", "StopOnSignal", "stop_signals"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPTED_EXIT = 128 + signal.SIGTERM  # 143, what a shell reports for a job ended by SIGTERM


class Preempted(CommandError):
    """A run stopped by a signal after saving its checkpoint (exit status 143)."""

    exit_code = PREEMPTED_EXIT

    @classmethod
    def at(cls, signum, iteration):
        return cls(f"stopped by {signal.Signals(signum).name} at iteration {iteration}; resume with --resume")


class _Received:
    signum = 0


_active = []  # the open stop_signals() recorder: a nested one shares it


@contextlib.contextmanager
def stop_signals():
    """While open, SIGTERM and SIGUSR1 are recorded (the first one: .signum) rather than ending the process; the
    previous handlers come back on exit. Nested, it yields the enclosing recorder (a signal received before an
    inner run started still stops it). Off the main thread, where Python cannot set handlers, nothing changes."""
    if _active:
        yield _active[-1]
        return
    received = _Received()
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def record(signum, frame):
        received.signum = received.signum or signum

    previous = {s: signal.signal(s, record) for s in STOP_SIGNALS}
    _active.append(received)
    try:
        yield received
    finally:
        _active.pop()
        for s, handler in previous.items():
            signal.signal(s, handler)


class StopOnSignal(HookBase):
    """After each iteration: when any process received a stop signal, saves `checkpointer`'s checkpoint of this
    iteration (main process) and raises Preempted on every process. `stopped_at` is that iteration."""

    def __init__(self, received, checkpointer):
        self.received, self.checkpointer = received, checkpointer
        self.stopped_at = None

    def after_step(self):
        signum = self.received.signum
        if comm.get_world_size() > 1:  # every rank stops at the same iteration
            signum = max(comm.all_gather(signum))
        if not signum:
            return
        iteration = self.trainer.iter
        if comm.is_main_process():
            self.checkpointer.save(f"model_{iteration:07d}", iteration=iteration)
        comm.synchronize()
        self.stopped_at = iteration
        raise Preempted.at(signum, iteration)


class EvalAfterSuccess(hooks.EvalHook):
    """detectron2's EvalHook whose final evaluation runs only when training finished: its own runs it also after
    a failure (a NaN loss, Ctrl-C, a signal) on the last iteration, and reports that evaluation's error instead.
    detectron2's trainer leaves `iter` at max_iter only after the last iteration succeeded."""

    def after_train(self):
        if self.trainer.iter >= self.trainer.max_iter:
            self._do_eval()
        del self._func
