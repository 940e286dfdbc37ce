"""Launching a run's processes: detectron2's launch on GPUs, and gloo processes on CPU-only machines (its own
launch requires CUDA and NCCL), on one machine or several (--num-machines, --machine-rank, --dist-url).

Preemption across processes: the launching process forwards SIGTERM/SIGUSR1 to its children (a scheduler may
signal only it), each child stops as lgd.runner.stopping says and exits 143 after its local rank 0 wrote the
Preempted line to a file the launcher reads, so the command prints that one line and exits 143 too.
"""
import gc
import multiprocessing
import os
import signal
import sys
import tempfile
import threading

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch
from detectron2.utils import comm

from .stopping import STOP_SIGNALS, Preempted, stop_signals

__all__ = ["launch_cpu", "launch_run"]


def _cpu_worker(local_rank, main_func, num_processes, num_machines, machine_rank, dist_url, args):
    world_size = num_processes * num_machines
    dist.init_process_group("gloo", init_method=dist_url, world_size=world_size,
                            rank=machine_rank * num_processes + local_rank)
    for machine in range(num_machines):  # every process creates every group, as detectron2's launch does
        group = dist.new_group(list(range(machine * num_processes, (machine + 1) * num_processes)))
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def launch_cpu(main_func, num_processes, num_machines=1, machine_rank=0, dist_url="auto", args=()):
    """Spawns num_processes CPU processes on this machine, ranks machine_rank * num_processes + (0, 1, ...) of
    one gloo group of num_processes * num_machines, and calls main_func(*args) in each. dist_url "auto" (one
    machine only): a rendezvous file in a fresh temporary folder (no port to pick)."""
    if num_processes * num_machines < 2:
        raise ValueError(f"launch_cpu: needs 2 processes or more in all, got {num_processes} x {num_machines}")
    if dist_url == "auto" and num_machines > 1:
        raise ValueError("--dist-url must name the rendezvous of several machines, e.g. tcp://HOST:PORT of "
                         "machine rank 0")
    with tempfile.TemporaryDirectory(prefix="lgd_gloo_") as tmp:
        url = f"file://{os.path.join(tmp, 'rendezvous')}" if dist_url == "auto" else dist_url
        mp.spawn(_cpu_worker, nprocs=num_processes, daemon=False,
                 args=(main_func, num_processes, num_machines, machine_rank, url, args))


def _child(main_func, report, *args):
    """main_func(*args) in a launched process, stop signals recorded from its start (the launcher's SIGTERM to
    the others, once one exited, included); a Preempted run exits 143, local rank 0 leaving its line in
    `report`."""
    with stop_signals():
        try:
            return main_func(*args)
        except Preempted as exc:
            message = str(exc)
    # Outside the except block, so the run's frames (its DDP model and reducer) are released before the process
    # group is torn down; and only once every rank is done (the main process's checkpoint and cost.json written),
    # so no rank closes its connections while another still uses them (gloo aborts the process then).
    gc.collect()
    if comm.get_local_rank() == 0:
        with open(report, "w") as f:
            f.write(message)
    comm.synchronize()
    sys.exit(Preempted.exit_code)


def _forward(signum, frame):
    for child in multiprocessing.active_children():
        os.kill(child.pid, signum)


def launch_run(main_func, args, *, num_gpus=1, num_machines=1, machine_rank=0, dist_url="auto"):
    """main_func(*args) in this process for one process in all, else in each launched process (GPUs with CUDA,
    CPU processes without). Returns main_func's result in a single process, None otherwise; Preempted when the
    launched processes stopped on a signal."""
    if num_gpus * num_machines <= 1:
        return main_func(*args)
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = {s: signal.signal(s, _forward) for s in STOP_SIGNALS} if main_thread else {}
    try:
        with tempfile.TemporaryDirectory(prefix="lgd_launch_") as tmp:
            report = os.path.join(tmp, "preempted")
            try:
                if torch.cuda.is_available():
                    launch(_child, num_gpus, num_machines=num_machines, machine_rank=machine_rank,
                           dist_url=dist_url, args=(main_func, report, *args))
                else:
                    launch_cpu(_child, num_gpus, num_machines=num_machines, machine_rank=machine_rank,
                               dist_url=dist_url, args=(main_func, report, *args))
            except mp.ProcessExitedException as exc:
                if exc.exit_code != Preempted.exit_code:
                    raise
                with open(report) if os.path.isfile(report) else open(os.devnull) as f:
                    raise Preempted(f.read() or "stopped by a signal; resume with --resume") from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return None
