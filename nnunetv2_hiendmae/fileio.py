"""Writing files so that a crash or a kill never leaves a half-written one, and fingerprinting them.

Every file this package writes for a user to keep (checkpoints, plans, comparison tables and figures) goes through
:func:`atomic_write`: the bytes go to a temporary file in the target's folder, are flushed and fsynced, and the
temporary file is renamed over the target (atomic on POSIX), after which the folder itself is fsynced where the OS
allows, so that the rename survives a power loss too. Readers see the old file or the complete new one.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(moves: Sequence[tuple[str | os.PathLike, str | os.PathLike]]) -> None:
    """Rename each finished file onto its target, in the given order (each rename is atomic), then fsync the target
    folders: with several files, the one readers look for goes last."""
    for source, target in moves:
        os.replace(source, target)
    for folder in {Path(target).parent for _, target in moves}:
        _fsync_folder(folder)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], exclusive: bool = False) -> bool:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it into place atomically.

    ``exclusive``: write once, never replace: the file is hard-linked into place, which fails if ``path`` exists,
    atomically also on NFS (for jobs that may write the same file at the same time; the file system must allow hard
    links). Returns whether this call wrote the file (always True unless ``exclusive``).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the permissions of any new file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if not exclusive:
            publish([(tmp, path)])
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)
        _fsync_folder(path.parent)
        return True
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, exclusive: bool = False) -> bool:
    return atomic_write(path, lambda f: f.write(data), exclusive)


def atomic_write_json(path: str | os.PathLike, obj: object, exclusive: bool = False) -> bool:
    return atomic_write_bytes(path, json.dumps(obj, indent=4).encode("utf-8"), exclusive)


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
