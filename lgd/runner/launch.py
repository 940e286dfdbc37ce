"""Launching a run's processes: detectron2's launch on GPUs, and N gloo processes on a CPU-only machine (its own
launch requires CUDA and NCCL)."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch
from detectron2.utils import comm

__all__ = ["launch_cpu", "launch_run"]


def _cpu_worker(rank, main_func, world_size, dist_url, args):
    dist.init_process_group("gloo", init_method=dist_url, world_size=world_size, rank=rank)
    comm._LOCAL_PROCESS_GROUP = dist.new_group(list(range(world_size)))  # as detectron2's launch does
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def launch_cpu(main_func, num_processes, dist_url="auto", args=()):
    """Spawns num_processes CPU processes in one gloo group and calls main_func(*args) in each. dist_url "auto":
    a rendezvous file in a fresh temporary folder (no port to pick)."""
    if num_processes < 2:
        raise ValueError(f"launch_cpu: num_processes must be >= 2, got {num_processes}")
    with tempfile.TemporaryDirectory(prefix="lgd_gloo_") as tmp:
        url = f"file://{os.path.join(tmp, 'rendezvous')}" if dist_url == "auto" else dist_url
        mp.spawn(_cpu_worker, nprocs=num_processes, args=(main_func, num_processes, url, args), daemon=False)


def launch_run(main_func, args, *, num_gpus=1, num_machines=1, machine_rank=0, dist_url="auto"):
    """main_func(*args) in this process for one process in all, else in each launched process (GPUs with CUDA,
    CPU processes without). Returns main_func's result in a single process, None otherwise."""
    if num_gpus * num_machines <= 1:
        return main_func(*args)
    if torch.cuda.is_available():
        launch(main_func, num_gpus, num_machines=num_machines, machine_rank=machine_rank, dist_url=dist_url,
               args=args)
    elif num_machines > 1:
        raise ValueError("--num-machines > 1 needs CUDA (CPU processes run on one machine only)")
    else:
        launch_cpu(main_func, num_gpus, dist_url=dist_url, args=args)
    return None
