"""No process outlives the run that started it.

Megatron's dist-checkpoint writer (``filesystem_async``) collects write results through a queue served by a
``multiprocessing`` Manager: a spawned process that re-imports the main module (~1 GB resident) and lives
for the rest of the run, with a resource tracker beside it. If the run is killed (SIGKILL, OOM killer, a
scheduler's preemption), both stayed alive. ``install_checkpoint_queue`` hands Megatron a queue from a
forked Manager started with ``PR_SET_PDEATHSIG``: the kernel ends it the moment its parent dies. The write
workers Megatron forks for each save get the same signal (killed mid-write, one was seen sleeping forever).
"""

import ctypes
import multiprocessing as mp
import os
import signal
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """In a child process: the kernel sends SIGKILL when the parent dies (Linux); exit now if it already has."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(0)


def install_checkpoint_queue() -> None:
    """Give Megatron's async writer a results queue whose Manager dies with this process, and its forked
    write workers the same death signal (once per process)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    writer = filesystem_async.FileSystemWriterAsync
    write, parent = writer.write_preloaded_data, os.getpid()

    def write_preloaded_data(*args, **kwargs):  # in a worker forked from this process (or, unforked, here)
        if os.getpid() != parent:  # only a forked worker: here it would set our own death signal and exit
            die_with_parent(parent)
        return write(*args, **kwargs)

    writer.write_preloaded_data = staticmethod(write_preloaded_data)
    from multiprocessing.managers import SyncManager

    # Forked, not spawned: the server only relays results, and a fork starts at once without re-importing the
    # main module (Megatron's spawned one holds ~1 GB and needs seconds before it could set the signal).
    server = SyncManager(ctx=mp.get_context("fork"))
    server.start(initializer=die_with_parent, initargs=(os.getpid(),))
    filesystem_async._results_queue = server.Queue()
    install_checkpoint_queue.manager = server  # kept alive for the process's lifetime


def process_age() -> float | None:
    """Seconds since this process started, from ``/proc`` (Linux); None where that cannot be read."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()  # after the command name: field 3 on
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return round(uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"), 2)  # field 22: start time in ticks
    except (OSError, ValueError, IndexError):
        return None
