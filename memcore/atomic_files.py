"""Atomic file writes: a reader sees the old file or the whole new one, never a part, and a
killed writer's temporaries are removed by the next write to the same path."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket

__all__ = ["atomic_write"]


def _fsync_dir(directory: str) -> None:
    # Makes the rename durable; not every platform lets a directory be opened or synced.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _file_mode(path: str) -> int:
    try:
        return os.stat(path).st_mode & 0o777  # overwriting keeps the old file's mode
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: it exists
        pass
    return True


def _remove_stale(directory: str, prefix: str) -> None:
    """Remove the temporaries of ``prefix`` whose writer, on this host, is dead."""
    pattern = re.compile(re.escape(prefix) + r"tmp-(?P<host>[A-Za-z0-9]*)-(?P<pid>\d+)-[0-9a-f]+")
    here, me = host(), os.getpid()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        m = pattern.fullmatch(name)
        if m and m["host"] == here and int(m["pid"]) != me and not _pid_alive(int(m["pid"])):
            stale = os.path.join(directory, name)
            with contextlib.suppress(OSError):  # another writer may have removed it first
                shutil.rmtree(stale) if os.path.isdir(stale) else os.unlink(stale)


def atomic_write(path, write, prefix: str | None = None) -> None:
    """Make ``path`` by ``write(tmp)`` into a temporary file beside it, flushed to disk, then
    moved into place (``os.replace``): a reader sees the old file or the whole new one, and a
    failure leaves the old file as it was and no temporary behind.

    ``tmp`` lies in a private folder ``<prefix>tmp-<host>-<pid>-<random>`` beside ``path``
    (default prefix: ``.<name>.``), which also holds whatever temporaries ``write`` makes (the
    safetensors library writes through one of its own); a later write with the same prefix
    removes the folder a killed writer left."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    prefix = "." + os.path.basename(path) + "." if prefix is None else prefix
    _remove_stale(directory, prefix)
    mode = _file_mode(path)
    scratch = os.path.join(directory, f"{prefix}tmp-{host()}-{os.getpid()}-"
                                      f"{secrets.token_hex(8)}")
    os.mkdir(scratch, 0o700)  # fails rather than share a folder (64 random bits: never)
    tmp = os.path.join(scratch, os.path.basename(path))
    try:
        open(tmp, "wb").close()
        write(tmp)
        os.chmod(tmp, mode)  # after write, which may have replaced the file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _fsync_dir(directory)


# --- reading: checks before the library sees the file --------------------------------------
