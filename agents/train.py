"""The training loop of the native agents: ``train`` and the run it drives, one method per phase
of an environment step (collect, gradient steps, learners' sync, logging, evaluation and
checkpoint). The run folder holds ``config.json``, TensorBoard events, ``model.pt`` and, when
the run finishes, ``summary.json``."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rlweights.agents.agent import OffPolicyAgent
from rlweights.agents.config import AgentConfig
from rlweights.agents.environments import make_envs, spaces_of
from rlweights.agents.registry import build_agent
from rlweights.agents.replay import ReplayBuffer
from rlweights.agents.run import Run
from rlweights.agents.seeding import seed_everything
from rlweights.agents.signals import GracefulStop, Stopped
from rlweights.checks import check_int
from rlweights.files import write_json
from rlweights.periodic import Periodic

if TYPE_CHECKING:
    from rlweights.agents.parallel import Learners

__all__ = ["Monitor", "train"]


Monitor = Callable[[int, OffPolicyAgent], dict[str, float]]
"""What ``train(monitor=...)`` calls: ``monitor(steps, agent)`` returns values to log, by tag."""


def train(
    config: AgentConfig,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    monitor: Monitor | None = None,
    monitor_every: int = 1000,
    stop: GracefulStop | None = None,
) -> tuple[OffPolicyAgent, dict[str, Any]]:
    """Train a native agent; returns it and the run's summary.

    With ``run_dir``: TensorBoard events (``charts/``, ``losses/``, ``eval/``, ``drift/``),
    ``model.pt`` at every evaluation and at the end, ``summary.json`` at the end. With
    ``resume=True`` the run continues from ``run_dir/model.pt`` (weights, optimizers,
    routines, replay buffer, counters, RNG); the environments restart their episodes.
    ``progress(steps, info)`` is called after every environment step. Ctrl-C, SIGTERM or
    SIGHUP stops at the next step, writes the checkpoint and raises ``Stopped``; an
    evaluation stops at once (the final one after the final checkpoint, another one without
    its results); while the environments are made, before the next one (``KeyboardInterrupt``,
    no checkpoint). ``stop``: a ``GracefulStop`` already installed by the caller (from
    before the run is built).
    ``monitor(steps, agent)`` is called every ``monitor_every`` environment steps (and at the
    end) and returns ``{tag: value}`` measurements, written to TensorBoard with the run's
    other scalars (e.g. the error of a Q-function against known optimal values).

    With ``config.average_every > 0`` (under torchrun, see ``rlweights.agents.parallel``)
    this process is one of several learners that average their weights every
    ``average_every`` environment steps; only rank 0 evaluates and writes to ``run_dir``, and
    only rank 0's summary has the evaluation results.
    """
    check_int(monitor_every, "monitor_every", "train")
    stop = stop or GracefulStop()
    if not config.average_every:
        run = _Run(config, run_dir, resume, progress, monitor, monitor_every, stop=stop)
        return run.train(stop)
    if resume:
        raise ValueError(
            "resuming a run of parallel learners is not supported: its checkpoint holds rank "
            "0's learner only; evaluate or average it, or start a new run"
        )
    from rlweights.agents.parallel import Learners

    learners = Learners(config)
    try:
        run_dir = run_dir if learners.rank == 0 else None
        run = _Run(config, run_dir, False, progress, monitor, monitor_every, learners, stop)
        return run.train(stop)
    finally:
        learners.close()


class _Run(Run):
    """One native training run: the environments, the agent, its replay buffer, the counters
    and the outputs. ``train`` is the loop; each of its steps is one method."""

    impl = "native"

    def __init__(
        self,
        config: AgentConfig,
        run_dir: str | Path | None,
        resume: bool,
        progress: Callable[[int, dict[str, float]], None] | None,
        monitor: Monitor | None,
        monitor_every: int,
        learners: Learners | None = None,
        stop: GracefulStop | None = None,
    ):
        super().__init__(config, run_dir, progress)
        cfg = config
        # A stop signal while the environments are made stops the run before the next one.
        self.stopping = stop or GracefulStop()
        self.monitor, self.learners = monitor, learners
        self.rank0 = learners is None or learners.rank == 0
        self.seed = cfg.seed if learners is None else learners.seed(cfg)
        seed_everything(self.seed)
        self.envs = make_envs(cfg.env_id, cfg.num_envs, lambda: self.stopping.requested)
        self.agent = build_agent(cfg, self.envs)
        if learners is not None:
            learners.start(self.agent)
        self.buffer = ReplayBuffer(
            min(cfg.buffer_size, cfg.total_steps),
            self.envs.single_observation_space.shape,
            self.envs.single_action_space.shape,
            self.agent.device,
            action_dtype=torch.int64 if cfg.algo == "dqn" else torch.float32,
            seed=self.seed,
        )
        self.action_space = self.envs.single_action_space
        self.action_space.seed(self.seed)
        self.device = self.agent.device
        self.steps = 0
        if resume:
            self.restore()
        self.writer = self.drift = None
        if self.run_dir is not None:
            self.open_outputs(resume)
        # What happens every N environment steps, counted from the run's current step.
        intervals = {
            "train": cfg.train_freq,
            "log_losses": max(cfg.train_freq, 100),
            "sync": cfg.average_every if learners is not None else 0,
            "monitor": monitor_every if monitor is not None else 0,
            "drift": cfg.drift_every if self.drift is not None else 0,
            "evaluate": cfg.eval_every if self.rank0 else 0,
        }
        self.every = {name: Periodic(n, name=name) for name, n in intervals.items() if n}
        for counter in self.every.values():
            counter.step(self.steps)  # the steps done before (by the run that is resumed)
        self.due: set[str] = set()  # what is due at this step
        self.monitored_at: int | None = None
        self.info: dict[str, float] = {}  # for progress(): last return, last evaluation, rate
        self.session_start = time.perf_counter()
        self.session_steps = 0
        self.aside = 0.0
        self.drift_seconds = 0.0
        # Episodes restart on resume; a fresh, deterministic seed per resume point.
        self.obs, _ = self.envs.reset(seed=self.seed + self.steps)

    def load_training_state(self, saved: dict[str, Any]) -> None:
        training = saved["training"]
        self.agent.load_weights(saved["weights"])
        self.agent.load_training_state(training["agent"])
        self.buffer.load_state_dict(training["buffer"])
        self.action_space.np_random.bit_generator.state = training["action_space_rng"]
        self.steps = saved["steps"]

    def open_outputs(self, resume: bool) -> None:
        """The TensorBoard writer (events past the resumed step are dropped) and the drift
        logger."""
        from torch.utils.tensorboard import SummaryWriter

        # Events of the checkpoint's own step were written before it (the evaluation at that
        # step too): only later ones, which the resumed run writes again, are dropped.
        purge = self.steps + 1 if resume else None
        if resume:
            self.after_earlier_events()
        self.writer = SummaryWriter(str(self.run_dir), purge_step=purge)
        if self.config.drift_every:
            from rlweights.drift import DriftMonitor
            from rlweights.tensorboard import DriftLogger

            drift_monitor = DriftMonitor(*self.agent.drift_pairs)
            self.drift = DriftLogger(self.writer, drift_monitor, config=self.config.to_dict())

    def train(self, stop: GracefulStop) -> tuple[OffPolicyAgent, dict[str, Any]]:
        """The loop: one step of the environments, then each step of the algorithm that is
        due; at the end, the final checkpoint, evaluation and summary."""
        self.stopping = stop
        with stop:
            while self.steps < self.config.total_steps:
                if stop.requested:
                    self.stop()
                self.collect()
                self.run_gradient_steps()
                self.sync_learners()
                self.log()
                self.evaluate_and_checkpoint()
                self.report()
            return self.finish()

    def collect(self) -> None:
        """One step of the vectorised environments: random actions until learning starts,
        then the agent's; the transitions go to the replay buffer, and every counter counts
        the step (``due``: the names of the counters that fired)."""
        cfg = self.config
        if self.steps < cfg.learning_starts:
            actions = np.stack([self.action_space.sample() for _ in range(cfg.num_envs)])
            drawn = torch.as_tensor(actions, device=self.agent.device)
            actions = self.agent.warmup_actions(drawn).cpu().numpy()
        else:
            obs = torch.as_tensor(self.obs, dtype=torch.float32, device=self.agent.device)
            actions = self.agent.act(obs, self.steps).cpu().numpy()
        next_obs, rewards, terminated, truncated, infos = self.envs.step(actions)
        real_next = next_obs
        done = terminated | truncated
        if done.any():
            real_next = self.end_episodes(next_obs, done, infos)
        self.buffer.add(self.obs, actions, rewards, real_next, terminated)
        self.obs = next_obs
        self.steps += cfg.num_envs
        self.session_steps += cfg.num_envs
        self.due = {name for name, counter in self.every.items() if counter.step(cfg.num_envs)}

    def end_episodes(self, next_obs: np.ndarray, done: np.ndarray, infos: dict) -> np.ndarray:
        """Record the returns of the episodes that ended; the next observations with each
        ended episode's final observation (the vector env has already reset those)."""
        real_next = next_obs.copy()
        for i in np.flatnonzero(done):
            real_next[i] = infos["final_obs"][i]
        final = infos["final_info"]
        for i in np.flatnonzero(final["_episode"]):
            self.episodes.append(float(final["episode"]["r"][i]))
            self.info["return"] = self.episodes[-1]
            if self.writer is not None:
                at = self.steps + self.config.num_envs
                self.writer.add_scalar("charts/episodic_return", self.episodes[-1], at)
                self.writer.add_scalar("charts/episodic_length", final["episode"]["l"][i], at)
        return real_next

    def run_gradient_steps(self) -> None:
        """The agent's per-environment-step routine (DQN's target update), then, once learning
        has started, ``gradient_steps`` gradient steps every ``train_freq`` environment steps."""
        cfg = self.config
        self.agent.on_env_step()
        last = self.steps >= cfg.total_steps  # nothing trains after it: no reset there
        self.plasticity(self.agent.plasticity_step(cfg.num_envs, skip=last))
        if "train" not in self.due or self.steps <= cfg.learning_starts:
            return
        for batch in self.buffer.batches(cfg.gradient_steps, cfg.batch_size):
            losses = self.agent.train_step(batch)
        if self.writer is not None and "log_losses" in self.due:
            for name, value in losses.items():
                self.writer.add_scalar(f"losses/{name}", value.item(), self.steps)

    def plasticity(self, fired: dict[str, list[str]]) -> None:
        """After a reset or shrink-and-perturb: ``plasticity/reset`` (or ``shrink_perturb``)
        is the number of parameter tensors touched, a point on the chart at each event; after
        a reset, the drift charts measure ``init_distance`` from the new initialisation."""
        for kind, names in fired.items():
            if self.writer is not None:
                self.writer.add_scalar(f"plasticity/{kind}", len(names), self.steps)
            if kind == "reset" and self.drift is not None:
                watched = self.drift.monitor.modules
                by_network: dict[str, list[str]] = {}
                for name in names:
                    network, _, tensor = name.partition(".")
                    if network in watched:
                        by_network.setdefault(network, []).append(tensor)
                self.drift.monitor.reset(by_network)

    def sync_learners(self) -> None:
        """Parallel learners: average the weights across them."""
        if "sync" in self.due:
            moved = self.learners.sync_weights()
            if self.writer is not None and moved is not None:
                self.writer.add_scalar("distributed/distance_to_average", moved.item(), self.steps)

    def log(self) -> None:
        """The monitor's measurements and the weight drift, when due."""
        if "monitor" in self.due:
            self.observe()
        if "drift" in self.due:
            tick = time.perf_counter()
            self.drift.log(self.steps)
            self.drift_seconds += time.perf_counter() - tick

    def observe(self) -> None:
        for tag, value in self.monitor(self.steps, self.agent).items():
            if self.writer is not None:
                self.writer.add_scalar(tag, value, self.steps)
        self.monitored_at = self.steps

    def evaluate_and_checkpoint(self) -> None:
        """Every ``eval_every`` environment steps before the end (the end has its own)."""
        if "evaluate" not in self.due or self.steps >= self.config.total_steps:
            return
        try:
            results = self.evaluate(interruptible=True)
        except KeyboardInterrupt:  # a stop signal: this step's checkpoint, no evaluation
            self.stop()
        self.info["eval"] = float(results["return"].mean())
        self.checkpoint()

    def policies(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        return self.agent.evaluated_policies()

    def record_evaluation(self, results: dict[str, np.ndarray]) -> None:
        if self.writer is not None:
            for name, returns in results.items():
                self.writer.add_scalar(f"eval/{name}", float(returns.mean()), self.steps)

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.agent.weights_state()

    def trained_tensors(self) -> list[torch.Tensor]:
        return [w for net in self.agent.networks.values() for w in net.state_dict().values()]

    def spaces(self) -> dict[str, str]:
        return spaces_of(self.envs)

    def training_state(self) -> dict[str, Any]:
        return {
            "agent": self.agent.training_state(),
            "buffer": self.buffer.state_dict(),
            "action_space_rng": self.action_space.np_random.bit_generator.state,
        }

    def report(self) -> None:
        # After a stop signal nothing is drawn: SIGHUP may have closed the terminal.
        if self.progress is not None and not self.stopping.requested:
            elapsed = time.perf_counter() - self.session_start - self.aside
            self.info["steps_per_second"] = self.session_steps / max(elapsed, 1e-9)
            self.progress(self.steps, self.info)

    def stop(self) -> None:
        """A stop signal: checkpoint, close, and raise ``Stopped`` naming the step."""
        self.checkpoint()
        self.close()
        raise Stopped(self.steps, self.stopping.signum)

    def close(self) -> None:
        self.envs.close()
        if self.writer is not None:
            self.writer.close()

    def finish(self) -> tuple[OffPolicyAgent, dict[str, Any]]:
        """The last monitor call, the final checkpoint (first: a stop signal during the
        evaluation loses nothing), the final evaluation and the summary."""
        train_seconds = time.perf_counter() - self.session_start - self.aside
        if self.monitor is not None and self.monitored_at != self.steps:
            self.observe()
        if not self.rank0:
            self.envs.close()
            summary = {"rank": self.learners.rank, "steps": self.steps}
            return self.agent, summary | {"averages": self.learners.averages}
        self.checkpoint()
        try:
            results = self.evaluate(interruptible=True)
        except KeyboardInterrupt:
            self.close()
            raise Stopped(self.steps, self.stopping.signum, "the final evaluation") from None
        self.envs.close()
        summary = self.summary(results, train_seconds)
        if self.run_dir is not None:
            write_json(self.run_dir / "summary.json", summary)
            self.writer.close()
        return self.agent, summary

    def summary(self, results: dict[str, np.ndarray], train_seconds: float) -> dict[str, Any]:
        summary = super().summary(results, train_seconds)
        summary |= {
            "train_seconds": train_seconds,
            "drift_seconds": self.drift_seconds,
            "gradient_updates": self.agent.gradient_updates,
            "target_updates": int(self.agent.target_routine.updates),
        }
        if self.learners is not None:
            summary.update(processes=self.learners.world, averages=self.learners.averages)
        return summary
