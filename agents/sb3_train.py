"""``rlweights train --impl sb3``: the SB3 algorithm of the same name, rlweights attached.

The same config, the same evaluation (``rlweights.agents.evaluation.evaluate``, same seeds),
the same outputs (TensorBoard events through SB3's logger, ``model.pt``, ``summary.json``) as
the native agents, so that the two can be compared run for run. Target updates go through
``rlweights.sb3.attach``, at SB3's update points (the table is in
``rlweights.sb3.patching``); clipping / max-norm through
``rlweights.sb3.WeightConstraintCallback``; drift through
``rlweights.sb3.DriftCallback``; the policy EMA is an rlweights routine stepped by an
optimizer post-hook of the policy's optimizer (after every policy step, as natively).

``model.pt`` holds the policy's weights (and the EMA's) for evaluation, plus what a resumed
run needs: SB3's optimizer states, the entropy coefficient, the stored replay transitions,
the states of the rlweights routines (target updates, EMA, plasticity, constraints),
counters and RNG states; all tensors and plain values (``weights_only=True``), never SB3's
pickled zip.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

import rlweights as rw
from rlweights.agents.config import AgentConfig, setting_of, split_patterns
from rlweights.agents.environments import route_mujoco_warnings, spaces_of
from rlweights.agents.run import Run
from rlweights.agents.signals import GracefulStop, Stopped
from rlweights.agents.target_update import TargetUpdateSpec
from rlweights.extras import EXTRA_OF, require
from rlweights.files import write_json
from rlweights.periodic import Periodic
from rlweights.targets import TargetRoutine

if TYPE_CHECKING:
    from rlweights.sb3.algorithms import Algorithm

__all__ = [
    "SB3Run",
    "buffer_state",
    "build_sb3_model",
    "check_plasticity",
    "load_buffer_state",
    "load_sb3_policy",
    "sb3_class",
    "sb3_kwargs",
    "train_sb3",
]


def sb3_kwargs(config: AgentConfig) -> dict[str, Any]:
    """SB3 constructor arguments equivalent to ``config``: every field that names its SB3
    argument (``setting``'s ``sb3``) with its value (``None``:
    SB3's default), then the ones that SB3 takes in another form."""
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        name, value = setting_of(type(config), field.name).get("sb3"), getattr(config, field.name)
        if name is not None and value is not None:
            *within, name = name.split(".")  # "policy_kwargs.n_critics": inside policy_kwargs
            into = kwargs
            for key in within:
                into = into.setdefault(key, {})
            into[name] = value
    # train_freq counts the steps of every environment, SB3's those of one
    kwargs["train_freq"] = max(config.train_freq // config.num_envs, 1)
    kwargs.setdefault("policy_kwargs", {})["net_arch"] = list(config.hidden)
    if getattr(config, "use_sde", False):
        kwargs["policy_kwargs"]["log_std_init"] = config.log_std_init
    spec = TargetUpdateSpec.parse(config.target_update)
    kwargs["tau"] = spec.tau
    if config.algo == "dqn":  # else hard:EVERY is a routine of its own, stepped with tau=1
        kwargs["target_update_interval"] = spec.every
    return kwargs


def build_sb3_model(config: AgentConfig) -> tuple[Any, Any]:
    """(model, attachment): the SB3 model for ``config`` with rlweights attached."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.noise import NormalActionNoise

    from rlweights.sb3 import attach

    route_mujoco_warnings(config.env_id)
    vec_env = make_vec_env(config.env_id, n_envs=config.num_envs, seed=config.seed)
    kwargs = sb3_kwargs(config)
    algorithm = sb3_class(config.algo)
    if _row(config.algo).acts == "actor":  # a deterministic actor explores by action noise
        n = int(np.prod(vec_env.action_space.shape))
        kwargs["action_noise"] = NormalActionNoise(
            np.zeros(n), config.exploration_noise * np.ones(n)
        )
    model = algorithm("MlpPolicy", vec_env, **kwargs)
    # None: SB3's own rule (its tau, and for DQN its target_update_interval).
    spec = TargetUpdateSpec.parse(config.target_update)
    hard = spec.kind == "hard" and not _row(config.algo).env_step_targets
    routine = spec.routine() if hard else None
    return model, attach(model, routine)


def plasticity_callback(config: AgentConfig) -> Any:
    """``rlweights.sb3.PlasticityCallback`` for the config's --reset-every, --shrink-perturb
    and --unit-sphere (None without them)."""
    if not (config.reset_every or config.shrink_perturb is not None or config.unit_sphere):
        return None
    from rlweights.sb3 import PlasticityCallback

    return PlasticityCallback(
        reset_every=config.reset_every,
        reset_layers=split_patterns(config.reset_layers),
        shrink_perturb=config.shrink_perturb,
        sp_every=config.sp_every,
        unit_sphere=split_patterns(config.unit_sphere),
    )


def check_plasticity(config: AgentConfig) -> None:
    """Raise ``ValueError`` if the plasticity patterns name no parameter of SB3's policy for
    ``config`` (checked on a model built for the purpose, before a run writes anything)."""
    callback = plasticity_callback(config)
    if callback is None:
        return
    model, attachment = build_sb3_model(config)
    try:
        callback.init_callback(model)
        callback.on_training_start({}, {})
        callback.on_training_end()
    finally:
        attachment.detach()  # SB3's own polyak_update back in place
        model.get_env().close()


def sb3_class(algo: str) -> type:
    """SB3's class of the native algorithm named ``algo`` (``"ddpg"``: ``DDPG``), or
    sb3-contrib's (``"tqc"``: ``TQC``, a row of :data:`rlweights.sb3.algorithms.ALGORITHMS`).
    Raises ``ValueError`` for an algorithm neither has (DroQ)."""
    import stable_baselines3 as sb3

    from rlweights.sb3.algorithms import ALGORITHMS

    if hasattr(sb3, algo.upper()):
        return getattr(sb3, algo.upper())
    row = next((row for row in ALGORITHMS if row.name == algo.upper()), None)
    if row is None:
        from rlweights.agents.registry import ALGOS

        raise ValueError(
            f"neither SB3 nor sb3-contrib has {algo}: --impl sb3 runs "
            f"{', '.join(a for a in ALGOS if a != algo)}; --impl sbx runs SBX's"
        )
    require(row.package, EXTRA_OF[row.package], f"--impl sb3 --algo {algo}")
    return row.cls()


def _row(algo: str) -> Algorithm:
    """The row of SB3's names for the native algorithm named ``algo``."""
    from rlweights.sb3.algorithms import algorithm_of

    return algorithm_of(sb3_class(algo))


def _policy_network(model: Any, algo: str) -> nn.Module:
    return getattr(model, _row(algo).policy)


def _policy_optimizer(model: Any, algo: str) -> torch.optim.Optimizer:
    return getattr(model, _row(algo).optimizer).optimizer


def _policy_fn(model: Any, algo: str, network: nn.Module) -> Callable:
    """Deterministic actions of ``network`` (SB3's actor / Q-network, or its EMA) in the
    environment's units."""
    acts = _row(algo).acts
    if acts == "argmax":
        return lambda obs: network(obs).argmax(-1)
    low = torch.as_tensor(model.action_space.low, device=model.device)
    high = torch.as_tensor(model.action_space.high, device=model.device)

    def act(obs: torch.Tensor) -> torch.Tensor:
        squashed = (
            network(obs, deterministic=True)
            if acts == "actor(deterministic=True)"
            else network(obs)
        )
        return low + (squashed + 1.0) * 0.5 * (high - low)  # SB3's unscale_action

    return act


_BUFFER_ARRAYS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")


def buffer_state(buffer: Any) -> dict[str, Any]:
    """An SB3 replay buffer's transitions and position as plain tensors, for a ``weights_only``
    checkpoint (``load_buffer_state`` restores them)."""
    n = buffer.buffer_size if buffer.full else buffer.pos
    state = {name: torch.from_numpy(np.array(getattr(buffer, name)[:n])) for name in _BUFFER_ARRAYS}
    state.update(pos=buffer.pos, full=buffer.full)
    return state


def load_buffer_state(buffer: Any, state: dict[str, Any]) -> None:
    """Restore ``buffer_state`` into SB3's replay buffer, validated first: the ring
    position in range, and the stored rows in the buffer's shapes and dtypes."""
    pos, full = state["pos"], state["full"]
    if not isinstance(full, bool):
        raise ValueError(f"replay buffer: full={full!r} is not a bool")
    if not (isinstance(pos, int) and not isinstance(pos, bool) and 0 <= pos < buffer.buffer_size):
        raise ValueError(f"replay buffer: pos={pos!r} outside [0, {buffer.buffer_size})")
    rows = buffer.buffer_size if full else pos
    for name in _BUFFER_ARRAYS:
        data, store = state[name], getattr(buffer, name)
        shape = (rows, *store.shape[1:])
        if not (
            isinstance(data, torch.Tensor)
            and data.numpy().dtype == store.dtype
            and tuple(data.shape) == shape
        ):
            raise ValueError(f"replay buffer: {name} must be {store.dtype} rows of shape {shape}")
    for name in _BUFFER_ARRAYS:
        getattr(buffer, name)[:rows] = state[name].numpy()
    buffer.pos, buffer.full = pos, full


def _torch_variables(model: Any) -> dict[str, torch.Tensor]:
    names = model._get_torch_save_params()[1]
    return {name: getattr(model, name).detach().clone() for name in names}


def train_sb3(
    config: AgentConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    stop: GracefulStop | None = None,
) -> dict[str, Any]:
    """Train SB3's algorithm for ``config`` with rlweights attached; returns the summary.

    Training stops at ``config.total_steps`` (SB3's ``learn`` would finish its rollout: up to
    ``train_freq`` steps more). Stop signals act as in ``rlweights.agents.train.train``.
    """
    stop = stop or GracefulStop()
    with stop:
        return SB3Run(config, Path(run_dir), resume, progress).train(stop)


class SB3Run(Run):
    """One ``--impl sb3`` run: the SB3 model with rlweights attached, the policy EMA, the
    episode returns and the outputs. SB3's ``learn`` is the loop; at each of its
    environment steps, ``on_step`` evaluates and checkpoints the step before when due."""

    impl = "sb3"

    def __init__(
        self,
        config: AgentConfig,
        run_dir: Path,
        resume: bool,
        progress: Callable[[int, dict[str, float]], None] | None,
    ):
        from stable_baselines3.common.logger import configure

        super().__init__(config, run_dir, progress)
        self.resume = resume
        self.model, self.attachment = self.build()
        self.device = self.model.device
        self.ema_routine = self.ema_hook = None
        if config.policy_ema is not None:
            policy = _policy_network(self.model, config.algo)
            self.ema_routine = rw.EMA(policy, tau=config.policy_ema)
            optimizer = _policy_optimizer(self.model, config.algo)
            self.ema_hook = optimizer.register_step_post_hook(
                lambda _o, _a, _k: self.ema_routine.update()
            )
        # made once, before restore(): a resumed run loads their schedules
        self.plasticity = plasticity_callback(config)
        self.callbacks = self.weight_callbacks()
        if resume:
            try:
                self.restore()
            except BaseException:
                self.release()
                raise
        # after restore(): a checkpoint that does not fit leaves the run folder as it was
        if resume:
            self.after_earlier_events()
        self.model.set_logger(configure(str(run_dir), ["tensorboard"]))
        self.session_start = time.perf_counter()
        self.start_steps = self.model.num_timesteps
        self.evaluations = None
        if config.eval_every:
            self.evaluations = Periodic(config.eval_every, name="eval_every")
            self.evaluations.step(self.start_steps)  # the steps of the run that is resumed
        # The last step SB3 counted, until it has stored and trained on it: (its progress
        # report, whether an evaluation is due after it); see on_step.
        self.pending: tuple[dict[str, float], bool] | None = None

    def build(self) -> tuple[Any, Any]:
        """(model, attachment) of the run (``build_sb3_model``)."""
        return build_sb3_model(self.config)

    @property
    def steps(self) -> int:
        return self.model.num_timesteps

    @property
    def session_steps(self) -> int:
        return self.model.num_timesteps - self.start_steps

    def load_training_state(self, saved: dict[str, Any]) -> None:
        model, training = self.model, saved["training"]
        model.set_parameters(training["parameters"], exact_match=True, device=model.device)
        with torch.no_grad():
            for name, value in training["variables"].items():
                getattr(model, name).copy_(value)
        self.load_routine_states(training["routines"])
        load_buffer_state(model.replay_buffer, training["buffer"])
        model.num_timesteps = saved["steps"]
        model._n_updates = training["n_updates"]
        if hasattr(model, "_n_calls"):  # DQN's count of steps, for its target updates
            model._n_calls = training["n_calls"]
        from rlweights.sb3 import DriftCallback

        for callback in self.callbacks:  # drift every N calls: those of the resumed run too
            if isinstance(callback, DriftCallback):
                callback.counter.step(model.num_timesteps // self.config.num_envs)

    def train(self, stop: GracefulStop) -> dict[str, Any]:
        from stable_baselines3.common.callbacks import CallbackList

        model = self.model
        self.stopping = stop
        try:
            if stop.requested:  # a signal while the model was being built
                self.checkpoint()
                raise Stopped(model.num_timesteps, stop.signum)
            if model.num_timesteps < self.config.total_steps:
                # first: when it ends learn, the others see the step taken back
                callbacks = [_on_step_callback(self), *self.callbacks]
                model.learn(
                    self.config.total_steps - model.num_timesteps,
                    callback=CallbackList(callbacks),
                    reset_num_timesteps=not self.resume,
                )
                self.finish_step()
            self.checkpoint()
            if stop.requested:
                raise Stopped(model.num_timesteps, stop.signum)
            train_seconds = time.perf_counter() - self.session_start - self.aside
            try:
                results = self.evaluate(interruptible=True)
            except KeyboardInterrupt:
                raise Stopped(model.num_timesteps, stop.signum, "the final evaluation") from None
            summary = self.summary(results, train_seconds)
            write_json(self.run_dir / "summary.json", summary)
            return summary
        finally:  # on a stop too
            model.logger.close()
            self.release()

    def release(self) -> None:
        """Give the model back to SB3's own target updates, remove the EMA's hook, close the
        environments: however the run ends (a stop, a checkpoint that does not fit)."""
        if self.ema_hook is not None:
            self.ema_hook.remove()
        self.attachment.detach()
        self.model.get_env().close()

    def weight_callbacks(self) -> list[Any]:
        """rlweights' SB3 callbacks, as configured: weight constraints, plasticity, drift."""
        from rlweights.sb3 import DriftCallback, WeightConstraintCallback

        config, callbacks = self.config, []
        self.constraints = None
        if config.weight_clip is not None or config.max_norm is not None:
            modules = _row(config.algo).trained
            clamp = (
                (-config.weight_clip, config.weight_clip)
                if config.weight_clip is not None
                else None
            )
            self.constraints = WeightConstraintCallback(
                modules, clamp=clamp, max_norm=config.max_norm
            )
            callbacks.append(self.constraints)
        if self.plasticity is not None:
            callbacks.append(self.plasticity)
        if config.drift_every:
            callbacks.append(DriftCallback(every=max(config.drift_every // config.num_envs, 1)))
        return callbacks

    def on_step(self, infos: Iterable[dict[str, Any]]) -> bool:
        """SB3's callback at each vectorised environment step, which SB3 calls before it
        stores the step's transitions and trains on them. First the step before, now
        complete, gets its evaluation and checkpoint (every ``eval_every`` steps) and its
        progress report. Then, on a stop signal or past ``total_steps``, this step is taken
        back (nothing of it was stored) and ``learn`` ends: every step a checkpoint counts
        is stored and trained on, as in a run without a stop. Otherwise the step's episode
        returns are kept. Returns whether ``learn`` goes on."""
        model, n = self.model, self.config.num_envs
        model.num_timesteps -= n  # the steps SB3 has completed
        self.finish_step()
        if self.stopping.requested or model.num_timesteps >= self.config.total_steps:
            return False
        model.num_timesteps += n
        info: dict[str, float] = {}
        for step_info in infos:
            if "episode" in step_info:  # SB3's Monitor wrapper
                self.episodes.append(float(step_info["episode"]["r"]))
                info["return"] = self.episodes[-1]
        due = self.evaluations is not None and self.evaluations.step(n)
        self.pending = (info, due)
        return True

    def finish_step(self) -> None:
        """The completed step's evaluation and checkpoint, when due, and progress report."""
        if self.pending is None:
            return
        (info, due), self.pending = self.pending, None
        steps = self.model.num_timesteps
        if due and steps < self.config.total_steps:
            try:
                self.evaluate(interruptible=True)
                self.checkpoint()
            except KeyboardInterrupt:  # a stop signal: learn() ends, the run checkpoints
                return
        if self.progress is not None and not self.stopping.requested:  # SIGHUP: no terminal
            self.progress(steps, info)

    def routine_states(self) -> dict[str, Any]:
        """The states of the run's stateful routines: each target pair's routine
        (``hard:EVERY``), the policy EMA, the plasticity schedules, the weight constraints'
        count."""
        states = {
            f"target_{pair.name}": pair.routine.state_dict()
            for pair in self.attachment.pairs
            if isinstance(pair.routine, TargetRoutine)
        }
        if self.ema_routine is not None:
            states["ema"] = self.ema_routine.state_dict()
        if self.plasticity is not None:
            states["plasticity"] = self.plasticity.state_dict()
        if self.constraints is not None:
            states["constraints"] = self.constraints.state_dict()
        return states

    def load_routine_states(self, states: Any) -> None:
        """Restore ``routine_states`` (each routine validates its own state)."""
        expected = set(self.routine_states())
        if not isinstance(states, dict) or set(states) != expected:
            got = sorted(states) if isinstance(states, dict) else type(states).__name__
            raise ValueError(
                f"the checkpoint's routines are {got}, this run keeps {sorted(expected)}"
            )
        for pair in self.attachment.pairs:
            if isinstance(pair.routine, TargetRoutine):
                pair.routine.load_state_dict(states[f"target_{pair.name}"])
        if self.ema_routine is not None:
            self.ema_routine.load_state_dict(states["ema"])
        if self.plasticity is not None:
            self.plasticity.load_state_dict(states["plasticity"])
        if self.constraints is not None:
            self.constraints.load_state_dict(states["constraints"])

    def policies(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        model, algo = self.model, self.config.algo
        found = {"return": _policy_fn(model, algo, _policy_network(model, algo))}
        if self.ema_routine is not None:
            found["ema_return"] = _policy_fn(model, algo, self.ema_routine.averaged)
        return found

    def record_evaluation(self, results: dict[str, np.ndarray]) -> None:
        for name, returns in results.items():
            self.model.logger.record(f"eval/{name}", float(returns.mean()))
        self.model.logger.dump(self.model.num_timesteps)

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        weights = {"policy": self.model.policy.state_dict()}
        if self.ema_routine is not None:
            weights["policy_ema"] = self.ema_routine.averaged.state_dict()
        return weights

    def trained_tensors(self) -> Iterable[torch.Tensor]:
        return self.model.policy.state_dict().values()

    def spaces(self) -> dict[str, str]:
        return spaces_of(self.model.get_env())

    def training_state(self) -> dict[str, Any]:
        model = self.model
        return {
            "parameters": model.get_parameters(),
            "variables": _torch_variables(model),
            "buffer": buffer_state(model.replay_buffer),
            "n_updates": model._n_updates,
            "n_calls": getattr(model, "_n_calls", 0),
            "routines": self.routine_states(),
        }

    def summary(self, results: dict[str, np.ndarray], train_seconds: float) -> dict[str, Any]:
        return super().summary(results, train_seconds) | {"gradient_updates": self.model._n_updates}


def _on_step_callback(run: SB3Run) -> Any:
    """The SB3 callback that hands every environment step to ``SB3Run.on_step``, which
    ends ``learn`` on a stop signal and at the asked step count (SB3 would finish its
    rollout, up to ``train_freq`` steps more). Made here: SB3 is an optional extra, imported
    only when it runs."""
    from stable_baselines3.common.callbacks import BaseCallback

    class OnStep(BaseCallback):
        def _on_step(self) -> bool:
            return run.on_step(self.locals.get("infos", ()))

    return OnStep()


def load_sb3_policy(config: AgentConfig, saved: dict[str, Any], ema: bool = False) -> Callable:
    """The deterministic policy of an ``--impl sb3`` checkpoint, for evaluation."""
    model, attachment = build_sb3_model(config)
    attachment.detach()
    weights = saved["weights"]
    if ema and "policy_ema" not in weights:
        raise ValueError("--ema: this checkpoint was trained without --policy-ema")
    try:
        model.policy.load_state_dict(weights["policy"])
        network = _policy_network(model, config.algo)
        if ema:
            network = copy.deepcopy(network)
            network.load_state_dict(weights["policy_ema"])
    except (KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"the checkpoint's SB3 weights do not fit ({first})") from None
    model.policy.set_training_mode(False)
    network.eval()
    return _policy_fn(model, config.algo, network)
