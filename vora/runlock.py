"""One training run per ``output_dir``: an exclusive lock held by rank 0 for the whole run.

The lock is ``fcntl.flock`` on ``output_dir/.vora-run.lock``, kept open until the process ends. The kernel drops
the lock when its holder dies (also on ``kill -9``), so a lock left by a dead run is simply taken over; no PID
guessing is needed for that. The file's body names the holder (PID, host, start time, command) so that a second
run can say who is in the way. A clean exit empties the body; a body found non-empty by the next holder means
the previous run died, and is logged.

A forked child of the holder (a DataLoader worker, an orphaned training process whose launcher was killed) keeps
the lock while it lives: the next run is refused and names the PID in the body.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time

from .checkpoint import pid_alive

logger = logging.getLogger("vora.train")

LOCK_FILE = ".vora-run.lock"


class RunLockError(RuntimeError):
    """Another live run holds ``output_dir``."""


def _describe(holder: dict) -> str:
    if not holder:
        return "a process that has not written its name yet"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    cmd = holder.get("command") or ""
    cmd = cmd if len(cmd) <= 200 else cmd[:197] + "..."
    return f"PID {holder.get('pid')} on host {holder.get('host')} (started {when}: {cmd})"


class RunLock:
    """``RunLock(output_dir).acquire()`` … ``release()``; ``acquire`` raises :class:`RunLockError` when another live
    run holds ``output_dir``, ``OSError`` when ``output_dir`` cannot be created or written."""

    def __init__(self, output_dir: str, run_id: str = ""):
        self.output_dir = os.path.abspath(output_dir)
        self.path = os.path.join(self.output_dir, LOCK_FILE)
        self.run_id = run_id
        self._fd: int | None = None

    def _read(self, fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 1 << 16)
        try:
            body = json.loads(raw.decode()) if raw.strip() else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = {}
        return body if isinstance(body, dict) else {}

    def acquire(self) -> "RunLock":
        os.makedirs(self.output_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise  # a filesystem without flock: say so rather than run unprotected
                holder = self._read(fd)
                who = _describe(holder)
                pid = holder.get("pid")
                if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
                    # The lock outlived its taker: a process it forked holds the descriptor.
                    who += f"; PID {pid} is gone but a process it started holds the lock (see: fuser {self.path})"
                raise RunLockError(
                    f"{self.output_dir} is in use by another vora-train run: {who}. Wait for it to end or "
                    f"stop that process (every process of it), or use another train.output_dir") from None
            previous = self._read(fd)
            if previous:
                same_host = previous.get("host") == socket.gethostname()
                alive = isinstance(previous.get("pid"), int) and same_host and pid_alive(previous["pid"])
                logger.warning("%s: taking over the lock of a run that ended without releasing it: %s%s", self.path,
                               _describe(previous), "" if alive or not same_host else " (no longer running)")
            body = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                    "command": " ".join(sys.argv), "run_id": self.run_id}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(body) + "\n").encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the body (a clean end) and drop the lock. The file stays: deleting it would let a waiting run lock
        an unlinked file while a third one creates a new one."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
