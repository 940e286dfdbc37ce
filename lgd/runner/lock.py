"""One run per output folder: an advisory lock (flock) on OUTPUT/.lgd-lock, held while a run writes there.

Two runs into one folder (two --resume, or a --resume beside a running job) interleave their logs and metrics
and leave a config.yaml that does not describe the checkpoints. The OS releases a flock when its process
dies, however it dies, so a lock left by a dead process never blocks; the file stays (removing it would race
with a process about to lock it) and holds the pid and host of the last run that locked it.
"""
import contextlib
import fcntl
import os
import socket

from ..errors import UsageError

__all__ = ["LOCK_FILE", "output_lock"]

LOCK_FILE = ".lgd-lock"


@contextlib.contextmanager
def output_lock(output_dir):
    """Creates output_dir if needed and holds its lock while open; UsageError naming the folder and the other
    process (pid, host) when a live run holds it. A remote folder (a URL) is not locked."""
    if not output_dir or "://" in str(output_dir):
        yield
        return
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"train.output_dir={output_dir} is a file, not a directory")
    os.makedirs(output_dir, exist_ok=True)
    fd = os.open(os.path.join(output_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid unknown"
            raise UsageError(f"output directory {output_dir} is in use by another run ({holder})",
                             hint="wait for it to finish, or train into another train.output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
