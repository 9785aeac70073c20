"""What a native run and an ``--impl sb3`` run share: the summary of a run, and the base class
that restores, evaluates, checkpoints and summarises."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from rlweights.agents.checkpoint import load_checkpoint, restoring, save_checkpoint
from rlweights.agents.config import AgentConfig
from rlweights.agents.evaluation import EVAL_SEED_OFFSET, evaluate
from rlweights.agents.seeding import rng_state, set_rng_state
from rlweights.agents.signals import GracefulStop

__all__ = ["Run", "run_summary"]


def run_summary(
    config: AgentConfig,
    impl: str,
    steps: int,
    results: dict[str, np.ndarray],
    session_steps: int,
    train_seconds: float,
    wall_seconds: float,
    episodes: list[float],
    weights: Iterable[torch.Tensor] = (),
) -> dict[str, Any]:
    """What ``summary.json`` holds for every run, native or SB3: the final evaluation
    (``results``: returns per policy), the speed of this session, the training episodes.
    The run ``diverged`` if a return or one of the trained ``weights`` is NaN or infinite
    (a Q-network of NaN weights still acts, by argmax, and can return a finite sum)."""
    summary: dict[str, Any] = {
        "algo": config.algo,
        "impl": impl,
        "env_id": config.env_id,
        "seed": config.seed,
        "steps": steps,
        "final_eval_return": float(results["return"].mean()),
        "final_eval_std": float(results["return"].std()),
        "eval_episodes": config.eval_episodes,
        "steps_per_second": session_steps / train_seconds if session_steps else None,
        "wall_seconds": wall_seconds,
        "episodes": len(episodes),
        "mean_last_10_train_returns": float(np.mean(episodes[-10:])) if episodes else None,
    }
    if "ema_return" in results:
        summary["final_ema_eval_return"] = float(results["ema_return"].mean())
    # NaN or infinite returns (the weights diverged) are written as null in summary.json.
    summary["diverged"] = not all(np.isfinite(r).all() for r in results.values()) or not all(
        bool(torch.isfinite(w).all()) for w in weights if w.is_floating_point()
    )
    return summary


class Run:
    """One training run, native or SB3: its config, run folder, episode returns and clock.
    Restoring, evaluating, checkpointing and summarising are written here once; a subclass
    says what differs between the two: its step count (``steps``), the steps trained in this
    process (``session_steps``), the device its policies act on (``device``), and the methods
    below that raise ``NotImplementedError``.

    The checkpoint (``run_dir/model.pt``) holds ``algo``, ``impl``, ``config``, ``spaces``,
    ``steps``, ``weights`` and ``training``: the subclass's ``training_state`` plus the
    global RNG states, the episode returns and the wall-clock seconds so far."""

    impl: ClassVar[str]
    steps: int
    session_steps: int
    device: torch.device | str

    def __init__(
        self,
        config: AgentConfig,
        run_dir: str | Path | None,
        progress: Callable[[int, dict[str, float]], None] | None,
    ):
        self.config = config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress = progress
        self.episodes: list[float] = []  # every training episode's return
        self.wall_before = 0.0  # wall-clock seconds of the run before this process
        self.session_start = time.perf_counter()
        self.aside = 0.0  # seconds spent evaluating and checkpointing (not training)
        self.stopping = GracefulStop()  # the one the run is trained with replaces it

    # What a subclass provides.

    def policies(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The deterministic policies evaluated, by result name (``return``, ``ema_return``)."""
        raise NotImplementedError

    def record_evaluation(self, results: dict[str, np.ndarray]) -> None:
        """Log an evaluation's mean returns (``eval/NAME``) at the current step."""
        raise NotImplementedError

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """The state dicts that evaluation loads, by network."""
        raise NotImplementedError

    def trained_tensors(self) -> Iterable[torch.Tensor]:
        """The tensors whose non-finite values mark the run as diverged."""
        raise NotImplementedError

    def spaces(self) -> dict[str, str]:
        """The observation and action spaces, as ``spaces_of``
        writes them."""
        raise NotImplementedError

    def training_state(self) -> dict[str, Any]:
        """What a resumed run needs besides the weights, the RNG states and the episodes."""
        raise NotImplementedError

    def load_training_state(self, saved: dict[str, Any]) -> None:
        """Restore the checkpoint ``saved`` (already validated as a file)."""
        raise NotImplementedError

    # Written once for both.

    def restore(self) -> None:
        """Continue from ``run_dir/model.pt``: what does not fit this run is one
        ``CheckpointError``."""
        if self.run_dir is None:
            raise ValueError("resume=True needs the run directory")
        path = self.run_dir / "model.pt"
        saved = load_checkpoint(path, resume=True)
        training = saved["training"]
        with restoring(path):
            self.load_training_state(saved)
            set_rng_state(training["rng"])
        self.episodes = list(training["episodes"])
        self.wall_before = training["wall_seconds"]

    def evaluate(self, interruptible: bool = False) -> dict[str, np.ndarray]:
        """Deterministic episodes of each of ``policies`` on the evaluation seeds;
        ``interruptible``: a stop signal ends it (``KeyboardInterrupt``)."""
        tick = time.perf_counter()
        cfg = self.config
        interrupted = (lambda: self.stopping.requested) if interruptible else None
        seed = cfg.seed + EVAL_SEED_OFFSET
        results = {
            name: evaluate(policy, cfg.env_id, cfg.eval_episodes, seed, self.device, interrupted)
            for name, policy in self.policies().items()
        }
        self.record_evaluation(results)
        self.aside += time.perf_counter() - tick
        return results

    def after_earlier_events(self) -> None:
        """Before a resumed run opens its TensorBoard event file: wait, if need be, for the
        clock's next second after the newest event file in the run folder. TensorBoard reads
        a folder's event files in name order, and a name begins with the second the file was
        made: a file made in the same second (a run resumed at once, in the same process)
        could sort before the earlier one, and its events would read as the older ones."""
        if self.run_dir is None:
            return
        seconds = [
            int(stamp)
            for path in self.run_dir.glob("events.out.tfevents.*")
            if (stamp := path.name.split(".")[3]).isdigit()
        ]
        wait = max(seconds, default=0) + 1 - time.time()
        if wait > 0:
            time.sleep(wait)

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.session_start

    def checkpoint(self) -> None:
        """``run_dir/model.pt`` (atomically): the weights and all that a resumed run needs."""
        if self.run_dir is None:
            return
        tick = time.perf_counter()
        training = {
            **self.training_state(),
            "rng": rng_state(),
            "episodes": list(self.episodes),
            "wall_seconds": self.wall_seconds(),
        }
        state = {
            "algo": self.config.algo,
            "impl": self.impl,
            "config": self.config.to_dict(),
            "spaces": self.spaces(),
            "steps": self.steps,
            "weights": self.weights(),
            "training": training,
        }
        save_checkpoint(self.run_dir / "model.pt", state)
        self.aside += time.perf_counter() - tick

    def summary(self, results: dict[str, np.ndarray], train_seconds: float) -> dict[str, Any]:
        """What ``summary.json`` holds (``run_summary``)."""
        return run_summary(
            self.config,
            self.impl,
            self.steps,
            results,
            self.session_steps,
            train_seconds,
            self.wall_seconds(),
            self.episodes,
            self.trained_tensors(),
        )
