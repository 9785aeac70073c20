"""Training runs side by side: one child process per run, a few at a time, each with a given
number of torch threads. Behind ``rlweights train --seeds`` and ``rlweights bench-learning``.

A stop signal (Ctrl-C, SIGTERM, SIGHUP) to this process reaches the running children, which
stop as ``rlweights train`` stops (a checkpoint, then exit code 128 + signal), and no further
run starts; ``SideBySide.run`` then returns what each run did.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = ["Finished", "SideBySide"]


@dataclass
class Finished:
    """What one child did: its exit code (None: never started, a stop came first) and its
    output."""

    index: int
    returncode: int | None
    stdout: str = ""
    stderr: str = ""


class SideBySide:
    """Run commands as child processes, at most ``workers`` at a time, each with
    ``OMP_NUM_THREADS`` (and MKL's) set to ``threads``."""

    def __init__(self, workers: int, threads: int):
        self.workers = max(int(workers), 1)
        self.environ = os.environ | {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
        }
        self.stopped: int | None = None  # the signal that stopped the runs
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()

    def _one(self, index: int, command: Sequence[str]) -> Finished:
        with self._lock:
            if self.stopped is not None:
                return Finished(index, None)
            child = subprocess.Popen(
                list(command),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=self.environ,
            )
            self._running.add(child)
        try:
            stdout, stderr = child.communicate()
        finally:
            with self._lock:
                self._running.discard(child)
        return Finished(index, child.returncode, stdout, stderr)

    def _stop(self, signum: int, frame: object) -> None:
        """Forward the signal to the running children (a terminal's Ctrl-C reached them
        already: they stop on the first one); start no more."""
        with self._lock:
            first = self.stopped is None
            self.stopped = signum
            running = list(self._running)
        if first and signum != signal.SIGINT:
            for child in running:
                child.send_signal(signum)

    def run(
        self,
        commands: Sequence[Sequence[str]],
        on_done: Callable[[Finished], None] | None = None,
    ) -> list[Finished]:
        """Run every command; ``on_done`` sees each as it ends. Returns them in order."""
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.getsignal(s) for s in handled} if main else {}
        for signum, handler in previous.items():
            if handler is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
                signal.signal(signum, self._stop)
        results: list[Finished] = []
        try:
            with ThreadPoolExecutor(self.workers) as pool:
                futures = [pool.submit(self._one, i, c) for i, c in enumerate(commands)]
                for future in futures:
                    done = future.result()
                    results.append(done)
                    if on_done is not None and done.returncode is not None:
                        on_done(done)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return results
