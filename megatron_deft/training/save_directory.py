"""One run per ``--save`` directory, and the debris of interrupted saves cleared at start.

Two runs saving into one directory overwrite each other's checkpoints (a relaunch while the
previous run's workers still live does this by accident: killing torchrun's process group leaves
its workers running in their own sessions). Rank 0 therefore holds an exclusive ``flock`` on
``SAVE/.lock`` for the whole run; the operating system releases it when the process exits or is
killed, so a stale lock never needs removing by hand. The file names the holder (host and pid)
for the message a second run stops with.
"""

import fcntl
import logging
import os
import shutil
import socket

import torch.distributed as dist

from megatron_deft.training.checkpointing import (
    TRACKER,
    CheckpointError,
    checkpoint_dir,
    read_tracker,
)

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
_LEFTOVER_SUFFIXES = (".partial", ".stale")


def claim(directory):
    """Rank 0 locks --save for the whole run and removes what interrupted saves left there;
    returns the lock file (None on other ranks or without --save). A directory locked by another
    run (or not writable) stops every rank with rank 0's one line. Collective."""
    if not directory:
        return None
    lock, message = None, [None]
    if dist.get_rank() == 0:
        try:
            lock = lock_save_directory(directory)
            removed = remove_leftovers(directory)
            if removed:
                logger.info(f"removed what interrupted saves left in {directory}: {removed}")
        except CheckpointError as error:
            message = [str(error)]
        except OSError as error:  # e.g. not writable: every rank must hear of it
            message = [f"--save {directory}: {error}"]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        if lock is not None:
            lock.close()
        raise CheckpointError(message[0])
    return lock


def lock_save_directory(directory: str):
    """Take the run's exclusive lock on ``directory`` (created if absent); returns the open lock
    file, which holds the lock until closed or the process ends. Raises CheckpointError naming
    the holder when another process has it."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_FILE)
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not written its name yet"
        handle.close()
        raise CheckpointError(
            f"--save {directory} is in use by another run ({holder}, lock {path}); stop that "
            "run or save elsewhere"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
    handle.flush()
    return handle


def remove_leftovers(directory: str) -> list:
    """Remove ``iter_N.partial`` / ``iter_N.stale`` directories and a temporary tracker that
    interrupted saves left; keeps the ``.stale`` copy that is the only one of the tracker's
    iteration (see ``existing_checkpoint_dir``). Call with the lock held. Returns the removed
    names."""
    tracked = read_tracker(directory)
    keep = set()
    if tracked is not None and not os.path.isdir(checkpoint_dir(directory, tracked)):
        keep.add(os.path.basename(checkpoint_dir(directory, tracked)) + ".stale")
    removed = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        leftover = name.startswith("iter_") and name.endswith(_LEFTOVER_SUFFIXES)
        if leftover and name not in keep and os.path.isdir(path):
            shutil.rmtree(path)
            removed.append(name)
        elif name == TRACKER + ".tmp":
            os.remove(path)
            removed.append(name)
    return removed
