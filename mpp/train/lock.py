"""One run per run directory: an exclusive lock held while a run trains there.

``RUN/.lock`` is locked with ``flock`` (advisory, exclusive, non-blocking) by the main process for the run's life and
records who holds it (PID, host, start time). The kernel drops the lock when the process ends however it ends (kill -9
included), so a lock file left by a dead run is stale by construction: the next run takes it over and says whose it
was. A second run into the same directory while the first lives stops at once with one line naming the holder.
Guarantees: on local file systems, complete; on NFS, ``flock`` is emulated with POSIX locks by Linux clients (NFSv4:
coordinated by the server) and works across machines; on file systems without locking (some FUSE mounts) the lock
cannot be taken and the run says so and continues unlocked.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from mpp.runtime import ConfigError

LOCK = ".lock"
_HELD: set[RunDirLock] = set()  # taken by this process and not yet let go: locks_released_after() ends a command's


class RunDirLock:
    """The exclusive lock of a run directory (main process only; other processes hold nothing)."""

    def __init__(self, run_dir: Path, say: Callable[[str], None] = print) -> None:
        self.path = Path(run_dir) / LOCK
        self.say = say
        self.handle: IO[str] | None = None

    def acquire(self) -> RunDirLock:
        """Take the lock or raise :class:`ConfigError` naming the run that holds it."""
        if os.environ.get("RANK", "0") != "0":
            return self
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise ConfigError(
                    f"{self.path.parent} is in use by another run ({holder}); wait for it, or choose another output_dir"
                ) from None
            self.say(f"  note: cannot lock {self.path} ({err.strerror}); running without the one-run-per-dir guard")
            return self
        handle.seek(0)
        previous = handle.read().strip()
        if previous:
            self.say(f"  note: took over the lock of a run that is gone ({previous})")
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%F %T")}))
        handle.flush()
        self.handle = handle
        _HELD.add(self)
        return self

    def release(self) -> None:
        """Empty the record and drop the lock."""
        if self.handle is not None:
            self.handle.seek(0)
            self.handle.truncate()
            self.handle.flush()
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None
        _HELD.discard(self)

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextmanager
def locks_released_after() -> Iterator[None]:
    """Let go of every lock taken inside the block when it ends, whether it returned or raised (a command's run).

    The kernel would drop them at process exit anyway; a command run in-process (tests, notebooks) must not leave its
    run directory locked against the next command into it.
    """
    before = set(_HELD)
    try:
        yield
    finally:
        for lock in list(_HELD - before):
            lock.release()
