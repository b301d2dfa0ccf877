"""One pretraining per output folder: a lock file naming the run that holds it (host, process id, start time).

A re-queued cluster job started while the first is still alive must not train into the same folder (both would write
the same checkpoints). The lock is created atomically (``O_EXCL``); a lock left by a process that is gone (same
host, process id not alive) is taken over with a note; a lock held by a live process, or by another host (whose
processes cannot be checked from here), refuses the run in one line that names the holder. Under torchrun, rank 0
holds it for the whole run.
"""
from __future__ import annotations

import json
import os
import socket
from datetime import datetime
from pathlib import Path

from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.fileio import atomic_write_json

LOCK = "pretraining.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and {"host", "pid", "started"} <= holder.keys() else None


class RunLock:
    """``with RunLock(folder) as lock:`` holds ``folder/pretraining.lock``; ``lock.note`` says whether a stale lock
    was taken over. Raises :class:`UserError` if a live run holds it."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "started": datetime.now().isoformat(timespec="seconds")}
        self.note: str | None = None

    def __enter__(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self._take_over()
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
        return self

    def _take_over(self) -> None:
        holder = _read(self.path)
        if holder is not None and (holder["host"] != self.me["host"] or _alive(int(holder["pid"]))):
            where = "this host" if holder["host"] == self.me["host"] else f"host {holder['host']}"
            raise UserError(f"{self.path.parent} is in use by another pretraining (pid {holder['pid']} on {where}, "
                            f"started {holder['started']}): wait for it to end or choose another -o (if that run is "
                            f"gone, delete {self.path})")
        atomic_write_json(self.path, self.me)
        if _read(self.path) != self.me:  # another run took it over at the same moment
            raise UserError(f"{self.path.parent} was taken by another pretraining just now: choose another -o")
        gone = f"pid {holder['pid']}, started {holder['started']}" if holder else "unreadable"
        self.note = f"took over the lock of a run that is gone ({gone})"

    def __exit__(self, *exc) -> None:
        if _read(self.path) == self.me:
            self.path.unlink(missing_ok=True)
