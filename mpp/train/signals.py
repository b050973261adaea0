"""Stop cleanly on SIGTERM, SIGINT and SIGUSR1: finish the step, checkpoint, say how to resume, exit 128 + signal.

SLURM (``--signal``), Kubernetes and preemptible cloud machines send SIGTERM (or SIGUSR1) some time before they kill a
job; Ctrl-C sends SIGINT. While :func:`mpp.train.engine.fit` runs, the first such signal only sets a flag: the
current optimiser step finishes, every process learns of it at the same step (a tiny all-reduce of the flag when
there are several processes), the engine writes a checkpoint and raises :class:`~mpp.runtime.StopSignalError`, which the
command turns into one line and exit code 128 + the signal number (143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1).
A second signal restores the default action and re-sends itself: the process ends at once.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

import torch

HANDLED = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None)


class StopSignals:
    """A context that holds the first stop signal until the step ends (main thread only; elsewhere a no-op)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # a second signal: no more waiting
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum

    def agreed(self, accelerator: Any) -> int | None:
        """The signal any process received (all processes get the same answer at the same step), else ``None``."""
        if accelerator.num_processes == 1:
            return self.received
        flags = accelerator.gather(torch.tensor([self.received or 0], device=accelerator.device))
        return int(flags.max().item()) or None
