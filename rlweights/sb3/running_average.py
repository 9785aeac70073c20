"""``PolicyAveragingCallback``: an EMA / SWA copy of an SB3 policy, updated after every step
of the optimizer that trains the acting network, evaluated next to the online policy and
saved as a normal SB3 model."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from stable_baselines3.common.callbacks import BaseCallback
from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

import rlweights as rw
from rlweights.checks import check_choice, check_fraction, check_int
from rlweights.files import atomic_write
from rlweights.periodic import Periodic
from rlweights.sb3.algorithms import ALGORITHMS, algorithm_of
from rlweights.sb3.patching import algorithm_names, refresh_batch_norm_stats

__all__ = ["PolicyAveragingCallback"]

Average = Literal["ema", "swa"]


def _acting_optimizer(model: Any) -> Optimizer:
    """The optimizer whose steps move the network that chooses ``model``'s actions."""
    from stable_baselines3.common.base_class import BaseAlgorithm

    names = ", ".join(row.name for row in ALGORITHMS)
    if not isinstance(model, BaseAlgorithm):
        raise TypeError(
            f"PolicyAveragingCallback works with Stable-Baselines3 models ({names}), "
            f"got {type(model).__name__}"
        )
    row = algorithm_of(model)
    if row is not None:
        return getattr(model, row.optimizer).optimizer
    raise TypeError(
        f"PolicyAveragingCallback does not know which optimizer trains the policy of "
        f"{type(model).__name__}; it supports {names} (and their subclasses, e.g. DDPG)."
    )


class PolicyAveragingCallback(BaseCallback):
    """Keep an averaged copy of an SB3 policy, evaluate it next to the online policy, save it.

    ``average="ema"``: exponential moving average, ``avg <- avg + tau * (online - avg)``
    (``rlweights.EMA``; ``warmup=True`` for its TensorFlow-style warm-up; torch/timm
    ``decay`` is ``1 - tau``). ``average="swa"``: uniform mean of the weights seen after the
    first ``start`` gradient steps (``rlweights.SWA``). Either way ``every=k`` averages
    at every k-th gradient step. The average is made over the whole ``model.policy`` (actor,
    critics and their targets), so it has the policy's ``state_dict`` and saves as a normal
    model; it is frozen (no grad, eval mode, in no optimizer) and lives in flat storage, so an
    update is one fused pass per buffer.

    When it updates: after every optimizer step of the network that acts (a step post-hook
    on ``actor.optimizer`` for SAC, TD3/DDPG, TQC, CrossQ; on ``policy.optimizer`` for DQN,
    QR-DQN, PPO, A2C, RecurrentPPO; each algorithm's ``optimizer`` in
    :data:`rlweights.sb3.algorithms.ALGORITHMS`). That is the averaging
    of the SWA/EMA literature (one snapshot per gradient step of the policy), independent of
    ``train_freq``, ``gradient_steps``, ``learning_starts``, ``policy_delay`` (TD3's actor
    steps every ``policy_delay``-th update) or PPO's epochs and minibatches, which an update
    at ``_on_step`` (one per environment step, including steps with no training) would
    count wrong. The hook is removed when ``learn`` ends and the average carries over to the
    next ``learn`` call.

    Evaluation: every ``eval_freq`` calls of ``_on_step`` (vectorised environment steps, as
    SB3's ``EvalCallback``), if ``eval_env`` (a Gymnasium env, a VecEnv or an env id) is
    given, both policies play ``n_eval_episodes`` episodes with ``evaluate_policy`` on the
    same episodes (``eval_env`` is seeded with ``eval_seed`` before each), through their
    ``policy.predict`` (so DQN's exploration plays no part). Recorded through SB3's logger,
    and so in the model's TensorBoard run (``tensorboard_log=``), at ``num_timesteps``:
    ``eval/online_mean_reward``, ``eval/online_std_reward``, ``eval/averaged_mean_reward``,
    ``eval/averaged_std_reward``; ``evaluations`` keeps ``(timesteps, online mean, averaged
    mean)``. ``rlweights/averaged_updates`` is recorded after every update of the average
    (and at each rollout end, before training starts), so each dump of the logger shows the
    count of that moment.

    With ``attach`` on the same model, the flat layouts ``attach`` made for the target
    pairs are kept (the policy is then not flattened as a whole, and the average is updated
    on the grouped ``torch._foreach_*`` path); attach before ``learn``.

    ```python
    >>> averaging = PolicyAveragingCallback("ema", tau=0.005, eval_env="Pendulum-v1")
    >>> model.learn(50_000, callback=averaging)
    >>> averaging.save_averaged("sac_ema")  # sac_ema.zip: SAC.load acts with the average

    ```
    """

    def __init__(
        self,
        average: Average = "ema",
        tau: float | None = None,
        *,
        warmup: bool = False,
        start: int = 0,
        every: int = 1,
        eval_env: Any = None,
        eval_freq: int = 10_000,
        n_eval_episodes: int = 5,
        deterministic: bool = True,
        eval_seed: int = 0,
        verbose: int = 0,
    ):
        super().__init__(verbose)
        name = "PolicyAveragingCallback"
        check_choice(average, ("ema", "swa"), "average", name)
        check_int(start, "start", name, minimum=0)
        if average == "ema":
            # The EMA's step toward the online weights; 0 would never move the average.
            tau = 0.005 if tau is None else tau
            tau = check_fraction(tau, "tau", name, zero=False, tensor=False)
            if start:
                raise ValueError(f"{name}: start={start} is SWA's; use average='swa' or drop it")
        else:
            if tau is not None:
                raise ValueError(
                    f"{name}: tau={tau!r} is the EMA's step; SWA averages uniformly. Drop tau "
                    "or use average='ema'."
                )
            if warmup:
                raise ValueError(f"{name}: warmup is the EMA's; use average='ema' or drop it")
        self.average = average
        self.tau = tau
        self.warmup = bool(warmup)
        self.start = start
        # every and start go to the average's counter, made when training starts.
        self.every = check_int(every, "every", name)
        self.eval_counter = Periodic(check_int(eval_freq, "eval_freq", name), name=name)
        self.n_eval_episodes = check_int(n_eval_episodes, "n_eval_episodes", name)
        self.eval_seed = check_int(eval_seed, "eval_seed", name, minimum=0)
        self.deterministic = deterministic
        self.eval_env = _vec_env(eval_env)
        self.evaluations: list[tuple[int, float, float]] = []
        self.averager: rw.EMA | rw.SWA | None = None
        self._pending: dict[str, Any] | None = None
        self._hook: RemovableHandle | None = None

    # -- the average -------------------------------------------------------------------------

    def _make_averager(self) -> rw.EMA | rw.SWA:
        policy = self.model.policy
        if self.average == "ema":
            averager = rw.EMA(policy, self.tau, warmup=self.warmup, every=self.every)
        else:
            averager = rw.SWA(policy, start=self.start, every=self.every)
        # The deep copy took the policy's optimizers along (bound to the copy's parameters,
        # with copies of their state): the average is never trained, so drop them.
        for module in averager.averaged.modules():
            for attr, value in list(vars(module).items()):
                if isinstance(value, Optimizer):
                    setattr(module, attr, None)
        # make_target may have flattened the online policy: refresh SB3's cached BatchNorm
        # lists.
        try:
            row = algorithm_names(self.model)
        except ValueError:  # no target networks, so no cached lists
            pass
        else:
            refresh_batch_norm_stats(self.model, row)
        return averager

    def _on_training_start(self) -> None:
        optimizer = _acting_optimizer(self.model)
        if self.averager is None:
            self.averager = self._make_averager()
            if self._pending is not None:
                self.load_state_dict(self._pending)
                self._pending = None
        elif self.averager.module is not self.model.policy:
            raise ValueError(
                "PolicyAveragingCallback: this callback already averages another model's "
                "policy; make one callback per model (carry an average over with "
                "state_dict() / load_state_dict())."
            )
        self._remove_hook()  # a learn() that raised never reached _on_training_end
        self._hook = optimizer.register_step_post_hook(self._update)

    def _update(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.averager.update()
        # the count of this moment: SB3 dumps its logger during the next rollout
        self.logger.record("rlweights/averaged_updates", self.averager.updates)

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _on_training_end(self) -> None:
        self._remove_hook()

    def _on_rollout_end(self) -> None:
        self.logger.record("rlweights/averaged_updates", self.averager.updates)

    def _started(self) -> rw.EMA | rw.SWA:
        if self.averager is None:
            raise RuntimeError(
                "PolicyAveragingCallback: nothing is averaged yet; the average is made when "
                "training starts (model.learn(..., callback=this))."
            )
        return self.averager

    @property
    def averaged(self) -> nn.Module:
        """The averaged policy (an SB3 policy: ``averaged.predict(obs)``); frozen, eval mode."""
        return self._started().averaged

    # -- evaluation --------------------------------------------------------------------------

    @property
    def eval_freq(self) -> int:
        """Evaluate every ``eval_freq`` calls of ``_on_step``."""
        return self.eval_counter.every

    def _on_step(self) -> bool:
        if self.eval_counter.step() and self.eval_env is not None:
            self.evaluate()
        return True

    def evaluate(self) -> dict[str, float]:
        """Evaluate the online and the averaged policy now, on the same episodes; record the
        results and dump the logger at ``num_timesteps``. Returns ``{tag: value}``."""
        from stable_baselines3.common.evaluation import evaluate_policy
        from stable_baselines3.common.vec_env import sync_envs_normalization

        if self.eval_env is None:
            raise ValueError("PolicyAveragingCallback: evaluate() needs eval_env=")
        averaged = self.averaged
        if self.model.get_vec_normalize_env() is not None:
            sync_envs_normalization(self.training_env, self.eval_env)
        values = {}
        for name, policy in (("online", self.model.policy), ("averaged", averaged)):
            self.eval_env.seed(self.eval_seed)  # used at evaluate_policy's reset
            mean, std = evaluate_policy(
                policy,
                self.eval_env,
                n_eval_episodes=self.n_eval_episodes,
                deterministic=self.deterministic,
            )
            values[f"eval/{name}_mean_reward"] = float(mean)
            values[f"eval/{name}_std_reward"] = float(std)
        for tag, value in values.items():
            self.logger.record(tag, value)
        self.logger.dump(self.num_timesteps)
        self.evaluations.append(
            (
                self.num_timesteps,
                values["eval/online_mean_reward"],
                values["eval/averaged_mean_reward"],
            )
        )
        return values

    # -- saving ------------------------------------------------------------------------------

    def save_averaged(
        self,
        path: str | Path,
        exclude: Iterable[str] | None = None,
        include: Iterable[str] | None = None,
    ) -> Path:
        """Write the model as SB3's ``model.save`` does, with the averaged policy weights.

        ``SAC.load(path)`` (``DQN.load``, ...) then acts with the average. The rest of the
        file is the training state (optimizers, hyperparameters) as ``model.save`` writes it.
        The averaged weights are copied into ``model.policy`` for the save and the online
        ones copied back (bit-identical) afterwards, even if the save fails; the optimizers
        are not touched. The file is written atomically (a temporary file, then a rename), a
        ``.zip`` suffix is added when ``path`` has none, as SB3 does. Returns the path.
        """
        averaged = self.averaged
        path = Path(path)
        if not path.suffix:
            path = path.with_suffix(".zip")
        policy = self.model.policy
        online = {name: t.clone() for name, t in policy.state_dict().items()}
        try:
            policy.load_state_dict(averaged.state_dict())
            atomic_write(path, lambda f: self.model.save(f, exclude=exclude, include=include))
        finally:
            policy.load_state_dict(online)
        return path

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights, the averager's counters and the evaluations so far."""
        if self.averager is None and self._pending is not None:
            return self._pending
        return {
            "average": self.average,
            "averager": self._started().state_dict(),
            "evaluations": list(self.evaluations),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``. Before training starts the state is kept and loaded
        into the average when it is made (to resume an average with a loaded model)."""
        name = "PolicyAveragingCallback.load_state_dict"
        expected = {"average", "averager", "evaluations"}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{name}: expected keys {sorted(expected)}, got {got}")
        if state["average"] != self.average:
            raise ValueError(
                f"{name}: the state is of average={state['average']!r}, this callback makes "
                f"average={self.average!r}; make the callback with the same average."
            )
        if self.averager is None:
            self._pending = state
            return
        self.averager.load_state_dict(state["averager"])
        self.evaluations = [tuple(e) for e in state["evaluations"]]

    def __repr__(self) -> str:
        if self.averager is not None:
            average = repr(self.averager)
        elif self.average == "ema":
            average = f"ema, tau={self.tau}, warmup={self.warmup}, not started"
        else:
            average = f"swa, start={self.start}, not started"
        evaluation = (
            f"eval every {self.eval_freq} calls on {self.n_eval_episodes} episodes, "
            f"{len(self.evaluations)} done"
            if self.eval_env is not None
            else "no eval_env"
        )
        return f"PolicyAveragingCallback({average}, every={self.every}, {evaluation})"


def _vec_env(env: Any) -> Any:
    """``env`` as a VecEnv (None stays None): an env id is made with SB3's ``make_vec_env``
    (Monitor-wrapped), a Gymnasium env is wrapped in a ``DummyVecEnv``."""
    import gymnasium as gym
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

    if env is None or isinstance(env, VecEnv):
        return env
    if isinstance(env, str):
        return make_vec_env(env, n_envs=1)
    if isinstance(env, gym.Env):
        return DummyVecEnv([lambda: env])
    raise TypeError(
        "PolicyAveragingCallback: eval_env must be a Gymnasium env, a VecEnv, an env id or "
        f"None, got {type(env).__name__}"
    )
