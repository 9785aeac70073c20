"""The training loop shared by the native agents, evaluation, checkpoints and resuming.

A run directory holds ``config.json``, TensorBoard events, ``model.pt`` (written atomically at
every evaluation, at the end and on Ctrl-C; loads with ``torch.load(weights_only=True)``) and,
when the run finishes, ``summary.json``. ``model.pt`` carries the weights of every network
and what a resumed run needs: optimizers, rlweights routines, the stored replay transitions,
counters and RNG states.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import rlweights.envs as _rlweights_envs  # noqa: F401  (registers the rlweights/ environments)
import torch
from rlweights.agents.common import (
    AgentConfig,
    OffPolicyAgent,
    ReplayBuffer,
    rng_state,
    seed_everything,
    set_rng_state,
)
from rlweights.agents.dqn import DQN, DQNConfig
from rlweights.agents.sac import SAC, SACConfig
from rlweights.agents.td3 import TD3, TD3Config

from rlweights.files import atomic_write, write_json

if TYPE_CHECKING:
    from rlweights.agents.parallel import Learners

__all__ = [
    "ALGOS",
    "CHECKPOINT_FORMAT",
    "PRESETS",
    "CheckpointError",
    "build_agent",
    "evaluate",
    "load_checkpoint",
    "make_config",
    "make_envs",
    "train",
]

ALGOS: dict[str, tuple[type[AgentConfig], type[OffPolicyAgent]]] = {
    "dqn": (DQNConfig, DQN),
    "sac": (SACConfig, SAC),
    "td3": (TD3Config, TD3),
}

# rl-baselines3-zoo's hyperparameters for the longer runs (LunarLander, with gymnasium[box2d]).
PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("dqn", "LunarLander-v3"): {
        "total_steps": 100_000,
        "learning_rate": 6.3e-4,
        "batch_size": 128,
        "buffer_size": 50_000,
        "learning_starts": 0,
        "target_update": "hard:250",
        "train_freq": 4,
        "gradient_steps": 4,
        "exploration_fraction": 0.12,
        "exploration_final_eps": 0.1,
    },
    ("sac", "LunarLanderContinuous-v3"): {
        "total_steps": 500_000,
        "learning_rate": 7.3e-4,
        "target_update": "polyak:0.01",
        "learning_starts": 10_000,
        "hidden": (400, 300),
    },
    ("td3", "LunarLanderContinuous-v3"): {"total_steps": 300_000},
}

CHECKPOINT_FORMAT = "rlweights-agent"
CHECKPOINT_VERSION = 1
EVAL_SEED_OFFSET = 1_000_000  # evaluation episodes never reuse a training seed


class CheckpointError(ValueError):
    """A file that is not a readable rlweights checkpoint (corrupt, foreign, wrong version)."""


def make_config(algo: str, env_id: str | None = None, **overrides: Any) -> AgentConfig:
    """The algorithm's config: its defaults, the zoo preset for ``env_id`` if there is one,
    then ``overrides`` (``None`` values are ignored). Raises ``ValueError`` on bad values."""
    if algo not in ALGOS:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {', '.join(ALGOS)}")
    values: dict[str, Any] = {}
    if env_id is not None:
        values["env_id"] = env_id
        values.update(PRESETS.get((algo, env_id), {}))
    values.update({key: value for key, value in overrides.items() if value is not None})
    return ALGOS[algo][0](**values)


def make_envs(env_id: str, num_envs: int) -> gym.vector.SyncVectorEnv:
    """``num_envs`` copies with episode statistics and same-step autoreset (the final
    observation of an episode comes in ``infos["final_obs"]``, so every transition is real)."""

    def make() -> gym.Env:
        return gym.wrappers.RecordEpisodeStatistics(gym.make(env_id))

    return gym.vector.SyncVectorEnv(
        [make] * num_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )


def build_agent(config: AgentConfig, envs: gym.vector.VectorEnv) -> OffPolicyAgent:
    return ALGOS[config.algo][1](config, envs.single_observation_space, envs.single_action_space)


def evaluate(
    policy: Callable[[torch.Tensor], torch.Tensor],
    env_id: str,
    episodes: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Returns of ``episodes`` episodes with the deterministic ``policy``, run side by side
    (one environment per episode, seeded ``seed``, ``seed + 1``, ...)."""
    envs = make_envs(env_id, episodes)
    try:
        obs, _ = envs.reset(seed=seed)
        returns = np.zeros(episodes)
        done = np.zeros(episodes, dtype=bool)
        while not done.all():
            with torch.no_grad():
                actions = policy(torch.as_tensor(obs, dtype=torch.float32, device=device))
            obs, rewards, terminated, truncated, _ = envs.step(actions.cpu().numpy())
            returns += np.where(done, 0.0, rewards)
            done |= terminated | truncated
    finally:
        envs.close()
    return returns


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no code from the file ever runs) and
    check that it is an rlweights checkpoint. Raises :class:`CheckpointError`."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, truncated file, pickled code refused, ...
        # The first sentence of torch's message ("Weights only load failed", "failed finding
        # central directory", ...) names the problem; the rest is advice for other cases.
        reason = str(exc).strip().split("\n")[0].split(". ")[0] or type(exc).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an rlweights training checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {state.get('version')}, this rlweights reads "
            f"version {CHECKPOINT_VERSION}"
        )
    return state


def config_from_checkpoint(state: dict[str, Any], **overrides: Any) -> AgentConfig:
    saved = dict(state["config"])
    algo = saved.pop("algo")
    saved.update({key: value for key, value in overrides.items() if value is not None})
    return make_config(algo, **saved)


class _GracefulStop:
    """The first Ctrl-C asks the loop to stop at the next step (it then checkpoints); a
    second one interrupts at once. Only installed in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


Monitor = Callable[[int, OffPolicyAgent], dict[str, float]]


def _crossed(previous: int, now: int, every: int) -> bool:
    return every > 0 and now // every > previous // every


def train(
    config: AgentConfig,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    monitor: Monitor | None = None,
    monitor_every: int = 1000,
) -> tuple[OffPolicyAgent, dict[str, Any]]:
    """Train a native agent; returns it and the run's summary.

    With ``run_dir``: TensorBoard events (``charts/``, ``losses/``, ``eval/``, ``drift/``),
    ``model.pt`` at every evaluation and at the end, ``summary.json`` at the end. With
    ``resume=True`` the run continues from ``run_dir/model.pt`` (weights, optimizers,
    routines, replay buffer, counters, RNG); the environments restart their episodes.
    ``progress(steps, info)`` is called after every environment step. Ctrl-C stops at the
    next step, writes the checkpoint and raises ``KeyboardInterrupt``.
    ``monitor(steps, agent)`` is called every ``monitor_every`` environment steps (and at the
    end) and returns ``{tag: value}`` measurements, written to TensorBoard with the run's
    other scalars (e.g. the error of a Q-function against known optimal values).

    With ``config.average_every > 0`` (under torchrun, see :mod:`agents.parallel`) this
    process is one of several learners that average their weights every ``average_every``
    environment steps; only rank 0 evaluates and writes to ``run_dir``, and only rank 0's
    summary has the evaluation results.
    """
    if isinstance(monitor_every, bool) or not isinstance(monitor_every, int) or monitor_every < 1:
        raise ValueError(f"train: monitor_every must be an int >= 1, got {monitor_every!r}")
    watch = (monitor, monitor_every) if monitor is not None else None
    if not config.average_every:
        return _train(config, run_dir, resume, progress, None, watch)
    if resume:
        raise ValueError(
            "resuming a run of parallel learners is not supported: its checkpoint holds rank "
            "0's learner only; evaluate or average it, or start a new run"
        )
    from rlweights.agents.parallel import Learners

    learners = Learners(config)
    try:
        run_dir = run_dir if learners.rank == 0 else None
        return _train(config, run_dir, False, progress, learners, watch)
    finally:
        learners.close()


def _train(
    config: AgentConfig,
    run_dir: str | Path | None,
    resume: bool,
    progress: Callable[[int, dict[str, float]], None] | None,
    learners: Learners | None,
    watch: tuple[Monitor, int] | None,
) -> tuple[OffPolicyAgent, dict[str, Any]]:
    cfg = config
    run_dir = Path(run_dir) if run_dir is not None else None
    device = torch.device(cfg.device)
    rank0 = learners is None or learners.rank == 0
    seed = cfg.seed if learners is None else learners.seed(cfg)
    seed_everything(seed)
    envs = make_envs(cfg.env_id, cfg.num_envs)
    agent = build_agent(cfg, envs)
    if learners is not None:
        learners.start(agent)
    buffer = ReplayBuffer(
        min(cfg.buffer_size, cfg.total_steps),
        envs.single_observation_space.shape,
        envs.single_action_space.shape,
        device,
        action_dtype=torch.int64 if cfg.algo == "dqn" else torch.float32,
        seed=seed,
    )
    action_space = envs.single_action_space
    action_space.seed(seed)
    steps, episodes, wall_before = 0, [], 0.0
    if resume:
        if run_dir is None:
            raise ValueError("resume=True needs the run directory")
        saved = load_checkpoint(run_dir / "model.pt")
        agent.load_weights(saved["weights"])
        training = saved["training"]
        agent.load_training_state(training["agent"])
        buffer.load_state_dict(training["buffer"])
        set_rng_state(training["rng"])
        action_space.np_random.bit_generator.state = training["action_space_rng"]
        steps, episodes = saved["steps"], list(training["episodes"])
        wall_before = training["wall_seconds"]

    writer = drift = None
    if run_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir), purge_step=steps if resume else None)
        if cfg.drift_every:
            from rlweights.drift import DriftMonitor
            from rlweights.tensorboard import DriftLogger

            drift = DriftLogger(writer, DriftMonitor(*agent.drift_pairs), config=cfg.to_dict())

    def policies() -> dict[str, Callable]:
        found = {"return": agent.policy}
        if agent.policy_ema is not None:
            ema = agent.networks[f"{agent.policy_name}_ema"]
            found["ema_return"] = lambda obs: agent.policy(obs, ema)
        return found

    def run_eval(at: int) -> dict[str, np.ndarray]:
        seed = cfg.seed + EVAL_SEED_OFFSET
        results = {
            name: evaluate(fn, cfg.env_id, cfg.eval_episodes, seed, device)
            for name, fn in policies().items()
        }
        if writer is not None:
            for name, returns in results.items():
                writer.add_scalar(f"eval/{name}", float(returns.mean()), at)
        return results

    session_start = time.perf_counter()
    session_steps = 0
    aside = 0.0  # seconds spent evaluating and checkpointing (not training)
    drift_seconds = 0.0

    def checkpoint() -> None:
        if run_dir is None:
            return
        training = {
            "agent": agent.training_state(),
            "buffer": buffer.state_dict(),
            "rng": rng_state(),
            "action_space_rng": action_space.np_random.bit_generator.state,
            "episodes": episodes,
            "wall_seconds": wall_before + time.perf_counter() - session_start,
        }
        save_checkpoint(
            run_dir / "model.pt",
            {
                "algo": cfg.algo,
                "impl": "native",
                "config": cfg.to_dict(),
                "steps": steps,
                "weights": agent.weights_state(),
                "training": training,
            },
        )

    def observe(at: int) -> None:
        for tag, value in watch[0](at, agent).items():
            if writer is not None:
                writer.add_scalar(tag, value, at)

    info: dict[str, float] = {}
    losses: dict[str, torch.Tensor] = {}
    # Episodes restart on resume; a fresh, deterministic seed per resume point.
    obs, _ = envs.reset(seed=seed + steps)
    with _GracefulStop() as stop:
        while steps < cfg.total_steps:
            if stop.requested:
                checkpoint()
                envs.close()
                if writer is not None:
                    writer.close()
                raise KeyboardInterrupt(f"step {steps}")
            if steps < cfg.learning_starts:
                actions = np.stack([action_space.sample() for _ in range(cfg.num_envs)])
            else:
                obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
                actions = agent.act(obs_t, steps).cpu().numpy()
            next_obs, rewards, terminated, truncated, infos = envs.step(actions)
            real_next = next_obs
            done = terminated | truncated
            if done.any():
                real_next = next_obs.copy()
                for i in np.flatnonzero(done):
                    real_next[i] = infos["final_obs"][i]
                final = infos["final_info"]
                for i in np.flatnonzero(final["_episode"]):
                    episodes.append(float(final["episode"]["r"][i]))
                    info["return"] = episodes[-1]
                    if writer is not None:
                        at = steps + cfg.num_envs
                        writer.add_scalar("charts/episodic_return", episodes[-1], at)
                        writer.add_scalar("charts/episodic_length", final["episode"]["l"][i], at)
            buffer.add(obs, actions, rewards, real_next, terminated)
            obs = next_obs
            previous, steps = steps, steps + cfg.num_envs
            session_steps += cfg.num_envs
            agent.on_env_step()
            if steps > cfg.learning_starts and _crossed(previous, steps, cfg.train_freq):
                for _ in range(cfg.gradient_steps):
                    losses = agent.update(buffer.sample(cfg.batch_size))
                if writer is not None and _crossed(previous, steps, max(cfg.train_freq, 100)):
                    for name, value in losses.items():
                        writer.add_scalar(f"losses/{name}", value.item(), steps)
            if learners is not None and _crossed(previous, steps, cfg.average_every):
                moved = learners.average()
                if writer is not None and moved is not None:
                    writer.add_scalar("distributed/distance_to_average", moved.item(), steps)
            if watch is not None and _crossed(previous, steps, watch[1]):
                observe(steps)
            if drift is not None and _crossed(previous, steps, cfg.drift_every):
                tick = time.perf_counter()
                drift.log(steps)
                drift_seconds += time.perf_counter() - tick
            if rank0 and _crossed(previous, steps, cfg.eval_every) and steps < cfg.total_steps:
                tick = time.perf_counter()
                results = run_eval(steps)
                info["eval"] = float(results["return"].mean())
                checkpoint()
                aside += time.perf_counter() - tick
            if progress is not None:
                elapsed = time.perf_counter() - session_start - aside
                info["steps_per_second"] = session_steps / max(elapsed, 1e-9)
                progress(steps, info)
    train_seconds = time.perf_counter() - session_start - aside
    if watch is not None and steps % watch[1]:  # the end, unless just observed
        observe(steps)
    if not rank0:
        envs.close()
        return agent, {"rank": learners.rank, "steps": steps, "averages": learners.averages}
    results = run_eval(steps)
    envs.close()
    wall = wall_before + time.perf_counter() - session_start
    summary: dict[str, Any] = {
        "algo": cfg.algo,
        "impl": "native",
        "env_id": cfg.env_id,
        "seed": cfg.seed,
        "steps": steps,
        "final_eval_return": float(results["return"].mean()),
        "final_eval_std": float(results["return"].std()),
        "eval_episodes": cfg.eval_episodes,
        "steps_per_second": session_steps / train_seconds if session_steps else None,
        "wall_seconds": wall,
        "train_seconds": train_seconds,
        "drift_seconds": drift_seconds,
        "episodes": len(episodes),
        "mean_last_10_train_returns": float(np.mean(episodes[-10:])) if episodes else None,
        "gradient_updates": agent.gradient_updates,
        "target_updates": agent.target_update.updates,
    }
    if learners is not None:
        summary.update(processes=learners.world, averages=learners.averages)
    if "ema_return" in results:
        summary["final_ema_eval_return"] = float(results["ema_return"].mean())
    if run_dir is not None:
        checkpoint()
        write_json(run_dir / "summary.json", summary)
        writer.close()
    return agent, summary
