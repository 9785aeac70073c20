"""Stop signals: Ctrl-C, SIGTERM and SIGHUP stop a run at the next step, after its checkpoint."""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["STOP_SIGNALS", "GracefulStop", "Stopped"]


STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
"""The signals that stop a run: what a user, a scheduler (SLURM, Kubernetes, docker stop, timeout)
or a closed terminal sends."""


class Stopped(KeyboardInterrupt):
    """A run stopped on a signal after writing its checkpoint: ``steps`` is the checkpoint's
    step, ``during`` what was running ("training" or "the final evaluation")."""

    def __init__(self, steps: int, signum: int | None, during: str = "training"):
        super().__init__(f"step {steps}")
        self.steps, self.signum, self.during = steps, signum, during


class GracefulStop:
    """The first SIGINT (Ctrl-C), SIGTERM or SIGHUP asks the run to stop at the next step (it
    then checkpoints); a second one of the same signal acts at once, as without rlweights
    (Ctrl-C raises ``KeyboardInterrupt``, the others end the process). A signal that the
    process ignores (``nohup``) stays ignored. Re-entrant; only installed in the main thread.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None  # the first signal received
        self._previous: dict[int, Any] = {}
        self._depth = 0

    def __enter__(self) -> GracefulStop:
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                signum = getattr(signal, name, None)  # Windows has no SIGHUP
                if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.signum = self.signum or signum
        signal.signal(signum, self._previous[signum])

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if not self._depth:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)
            self._previous = {}
