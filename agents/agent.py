"""The base classes of the native agents. An agent holds its networks and optimizers and the
rlweights routines (target update, policy EMA, weight constraints, plasticity) that its gradient
step calls; ``OffPolicyAgent.minimize`` is the one place where an eager and a compiled step
differ."""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value

import rlweights as rw
from rlweights.agents.compiled import (
    CompiledStep,
    forget_adam_state_,
    prepare_adam,
    tensor_adam_step_,
)
from rlweights.agents.config import AgentConfig, split_patterns
from rlweights.agents.environments import check_flat_observations
from rlweights.agents.networks import TwinQ
from rlweights.agents.replay import ReplayBuffer
from rlweights.agents.target_update import TargetUpdateSpec
from rlweights.ops import unit_norms_
from rlweights.plasticity import follow_targets_, step_schedules
from rlweights.weights import entries, select

__all__ = [
    "FLUSH_SUBNORMALS_EVERY",
    "ContinuousAgent",
    "OffPolicyAgent",
    "flush_subnormal_state_",
    "make_adam",
]


FLUSH_SUBNORMALS_EVERY = 100
"""Every this many gradient updates (on the CPU), the optimizers' subnormal state becomes 0: see
flush_subnormal_state_."""


def flush_subnormal_state_(optimizer: torch.optim.Optimizer) -> None:
    """Set to 0, in place, every entry of the optimizer's state tensors (Adam's moments)
    whose magnitude is below the smallest normal number of its dtype.

    Why: the gradient of a dead ReLU unit's weights is exactly 0, so Adam's moments of them
    decay geometrically (``exp_avg`` by 0.9 per step) and, rounding to nearest, stop at the
    smallest subnormal float instead of reaching 0. On x86 CPUs every arithmetic operation on a
    subnormal takes a microcode assist, which made a native TD3 HalfCheetah-v5 run's Adam step
    several times slower (docs/benchmarks.md). The values flushed are below 1.2e-38, and
    an update made of them is below 1e-30: nothing a run can see. The tensors stay the same
    objects (a compiled step reads them)."""
    with torch.no_grad():
        for state in optimizer.state.values():
            for key, value in state.items():
                if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                    value.masked_fill_(value.abs() < torch.finfo(value.dtype).tiny, 0)


def make_adam(params: Iterable[Tensor], lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel (one pass over all tensors; CPU and CUDA since torch 2.4),
    falling back to foreach where fused is unavailable."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(params, lr=lr, foreach=True)


def _constraint_tensors(module: nn.Module, names: Container[str] | None = None) -> list[Tensor]:
    """The weight matrices a per-unit constraint (max-norm, unit sphere) applies to, each
    shaped (out_units, inputs): of the parameters named in ``names`` (all if None)."""
    tensors: list[Tensor] = []
    for prefix, sub in module.named_modules():
        at = f"{prefix}." if prefix else ""
        if isinstance(sub, nn.Linear) and (names is None or f"{at}weight" in names):
            tensors.append(sub.weight)
        unit_weights = getattr(sub, "unit_weights", None)
        if unit_weights is not None:
            inner = None if names is None else {n[len(at) :] for n in names if n.startswith(at)}
            tensors.extend(unit_weights(inner))
    return tensors


class OffPolicyAgent:
    """The base of the native agents (DQN, SAC, TD3, DDPG, TQC, DroQ): holds the networks,
    optimizers and rlweights routines, and runs the gradient step.

    A subclass builds its networks and optimizers, then calls ``_setup_routines`` with
    the online networks whose targets it keeps and the policy network to average. It
    implements ``act`` (exploring actions), ``policy`` (deterministic actions, for
    evaluation), ``step_inputs`` (the step's random draws) and ``gradient_step``, the whole
    gradient step written once: its losses as functions of the network they train, each
    handed to ``minimize`` (gradients, Adam, weight constraints), then
    ``average_policy`` and ``target_routine.step()`` at the algorithm's update points.
    ``update`` runs it, eagerly or compiled (``--compile``).
    """

    name: ClassVar[str] = ""
    # The action space the agent takes: (type, words for it, what to use otherwise).
    actions: ClassVar[tuple[type[gym.Space], str, str]] = (gym.Space, "", "")

    @classmethod
    def check_spaces(
        cls, env_id: str, observation_space: gym.Space, action_space: gym.Space
    ) -> None:
        """Raise ``ValueError`` naming the environment if the agent cannot act in it."""
        check_flat_observations(env_id, observation_space)
        kind, words, instead = cls.actions
        if not isinstance(action_space, kind):
            raise ValueError(
                f"{cls.name} needs {words} actions, but {env_id} has {action_space}; {instead}"
            )

    def __init__(self, config: AgentConfig):
        self.config = config
        self.device = torch.device(config.device)
        self.gradient_updates = 0
        self.networks: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    def _setup_routines(
        self, online: tuple[str, ...], policy: str, per_env_step: bool = False
    ) -> None:
        """Flat storage for every network; targets of the ``online`` networks, moved by one
        rlweights routine over all of them (``target_routine``, from ``config.target_update``);
        the optional EMA of ``policy`` (``ema_routine``).

        ``per_env_step``: the target routine is stepped once per vectorised environment step
        (DQN), so ``hard:EVERY`` counts environment steps summed over the ``num_envs``
        environments."""
        cfg = self.config
        # Every module flattened as one unit (one buffer per dtype), in a fixed order.
        self.flat_units: list[nn.Module] = []
        for name, net in self.networks.items():
            if name not in online:  # the online networks are flattened by make_target
                rw.flatten_(net)
                self.flat_units.append(net)
        if len(online) == 1:
            source = self.networks[online[0]]
            target = rw.make_target(source)
            self.networks[f"{online[0]}_target"] = target
        else:  # one flat buffer for all of them: one update pass
            source = nn.ModuleDict({name: self.networks[name] for name in online})
            target = rw.make_target(source)
            for name in online:
                self.networks[f"{name}_target"] = target[name]
        self.flat_units += [source, target]
        spec = TargetUpdateSpec.parse(cfg.target_update)
        steps_per_call = cfg.num_envs if per_env_step else 1
        # --compile: the capturable forms, which run inside the compiled step (and eagerly)
        capturable = cfg.compile
        self.target_routine = spec.routine(
            source, target, steps_per_call=steps_per_call, capturable=capturable
        )
        self.online_names, self.policy_name = online, policy
        self.ema_routine: rw.EMA | None = None
        if cfg.policy_ema is not None:
            # make_target inside leaves a policy that shares a flat buffer with another
            # online network (TD3's actor and critic) where it is.
            self.ema_routine = rw.EMA(
                self.networks[policy], tau=cfg.policy_ema, capturable=capturable
            )
            self.networks[f"{policy}_ema"] = self.ema_routine.averaged
            self.flat_units.append(self.ema_routine.averaged)
        self._setup_plasticity()
        # --compile: the gradient step compiled as one graph; Adam's state made now, so
        # that the graph reads it (see rlweights.agents.compiled)
        self.compiled: CompiledStep | None = None
        if cfg.compile:
            for optimizer in self.optimizers.values():
                prepare_adam(optimizer)
            self.compiled = CompiledStep(
                self.gradient_step,
                f"{self.name}'s gradient step",
                cfg.cudagraphs,
                self.layout_checks(),
                cpp_wrapper=self.device.type == "cpu",
            )

    def _setup_plasticity(self) -> None:
        """``--reset-every`` / ``--shrink-perturb``: ``rw.ShrinkPerturb`` routines over
        the ``--reset-layers`` of the trained networks (every optimizer forgets the state of
        what they touch); ``--unit-sphere``: the names of the weights projected after each
        optimizer step, by network. Patterns are checked here, before training starts."""
        cfg = self.config
        self.trained = nn.ModuleDict(
            {name: self.networks[name] for name in self.optimizers if name in self.networks}
        )
        include = split_patterns(cfg.reset_layers)
        # --compile: the compiled step reads the optimizers' state tensors, so they are
        # zeroed in place (plasticity_step) rather than forgotten
        optimizers = None if cfg.compile else list(self.optimizers.values())
        # Parallel learners (--average-every) seed their global RNGs by rank; their fresh
        # weights come from one generator seeded alike on every learner, so that all draw
        # the same initialisation and the average is of one (parallel runs do not resume).
        generator = None
        if cfg.average_every:
            generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.plasticity: dict[str, rw.ShrinkPerturb] = {}
        if cfg.reset_every:
            self.plasticity["reset"] = rw.ShrinkPerturb(
                self.trained,
                0.0,
                1.0,
                every=cfg.reset_every,
                include=include,
                generator=generator,
                optimizer=optimizers,
            )
        if cfg.shrink_perturb is not None:
            shrink, perturb = cfg.shrink_perturb
            self.plasticity["shrink_perturb"] = rw.ShrinkPerturb(
                self.trained,
                shrink,
                perturb,
                every=cfg.sp_every,
                include=include,
                generator=generator,
                optimizer=optimizers,
            )
        self.unit_sphere: dict[str, set[str]] = {}
        if cfg.unit_sphere is not None:
            found = entries(self.trained, "--unit-sphere")[0]
            chosen = select(found, split_patterns(cfg.unit_sphere), None, "the trained networks")
            for net in self.trained:
                names = {e.name[len(net) + 1 :] for e in chosen if e.name.startswith(f"{net}.")}
                if _constraint_tensors(self.trained[net], names):
                    self.unit_sphere[net] = names
            if not self.unit_sphere:
                raise ValueError(
                    f"--unit-sphere {cfg.unit_sphere!r} selects no weight matrix (only biases or "
                    "other vectors); name layer weights, e.g. 'critic.*' or 'actor.trunk.*'"
                )

    def plasticity_step(self, n: int, skip: bool = False) -> dict[str, list[str]]:
        """Count ``n`` environment steps on the reset and shrink-and-perturb schedules; after
        one fires, the targets of the touched networks and the policy's EMA (if kept) take the
        same weights (a reset network and its averages start again together: an average of
        two initialisations means nothing) and, with ``--compile``, the optimizers get their
        state zeroed in place. ``skip``: count without acting (the run's last step: a
        reset there would leave the final policy untrained). Returns what fired: ``{"reset"
        or "shrink_perturb": names of the touched parameters ("critic.weights.0", ...)}``."""
        fired = step_schedules(self.plasticity, n, skip)
        touched = [name for names in fired.values() for name in names]
        if not touched:
            return fired
        nets = self.networks
        pairs = [(n, nets[n], nets[f"{n}_target"]) for n in self.online_names]
        if self.ema_routine is not None:  # the policy's EMA restarts from it too
            policy = self.policy_name
            pairs.append((policy, nets[policy], nets[f"{policy}_ema"]))
        follow_targets_(pairs, touched)
        if self.config.compile:
            params = [self.trained.get_parameter(name) for name in touched]
            for optimizer in self.optimizers.values():
                forget_adam_state_(optimizer, params)
        return fired

    def count_update(self) -> None:
        """One more gradient update done; every ``FLUSH_SUBNORMALS_EVERY``-th, on the CPU, the
        optimizers' subnormal moments become 0 (``flush_subnormal_state_``)."""
        self.gradient_updates += 1
        if self.device.type == "cpu" and self.gradient_updates % FLUSH_SUBNORMALS_EVERY == 0:
            for optimizer in self.optimizers.values():
                flush_subnormal_state_(optimizer)

    def train_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """One gradient step on ``batch``: ``gradient_step`` with the step's random draws
        and schedule (``step_inputs``), compiled under ``--compile`` (eagerly where it
        cannot be compiled here). Returns the step's losses (detached)."""
        fields = [batch[name] for name in ReplayBuffer.FIELDS]
        args = (*fields, *self.step_inputs(len(fields[0])))
        losses = self.compiled(*args) if self.compiled is not None else None
        if losses is None:
            losses = self.gradient_step(*args)
        self.count_update()
        return losses

    def minimize(
        self,
        name: str,
        loss_fn: Callable[[Callable[..., Any]], Any],
        has_aux: bool = False,
        max_grad_norm: float | None = None,
    ) -> Any:
        """One optimizer step of network ``name`` down ``loss_fn(network)`` (which returns the
        loss, or ``(loss, aux)`` with ``has_aux``), its gradient norm clipped to
        ``max_grad_norm`` if given, then the weight constraints (``constrain``). Returns
        what ``loss_fn`` returned, detached.

        The one place where eager and compiled steps differ: eagerly, ``loss.backward()`` and
        the ``torch.optim.Adam`` step; inside ``torch.compile`` (``--compile``), the gradients
        by ``torch.func.grad_and_value`` of ``loss_fn`` called with the same module on its
        parameters as inputs, and Adam as tensor code on the optimizer's own state
        (``tensor_adam_step_``)."""
        net = self.networks[name]
        params = list(net.parameters())
        compiling = torch.compiler.is_compiling()
        if compiling:

            def of_params(p: dict[str, Tensor]) -> Any:
                return loss_fn(lambda *args, **kwargs: functional_call(net, p, args, kwargs))

            detached = {key: t.detach() for key, t in net.named_parameters()}
            found, out = grad_and_value(of_params, has_aux=has_aux)(detached)
            grads = list(found.values())
        else:
            out = loss_fn(net)
            self.optimizers[name].zero_grad(set_to_none=True)
            (out[0] if has_aux else out).backward()
            grads = [p.grad for p in params]
        if max_grad_norm is not None:  # as nn.utils.clip_grad_norm_(foreach=True) clips
            # compiled: one norm per tensor, which inductor fuses (it has no kernel of its own
            # for _foreach_norm and would call back into torch for it)
            norms = [torch.linalg.vector_norm(g) for g in grads] if compiling else None
            total = torch.linalg.vector_norm(torch.stack(norms or torch._foreach_norm(grads)))
            torch._foreach_mul_(grads, (max_grad_norm / (total + 1e-6)).clamp(max=1.0))
        self.apply_gradients(name, params, grads)
        self.constrain(name)
        return tuple(t.detach() for t in out) if has_aux else out.detach()

    def apply_gradients(self, name: str, params: list[Tensor], grads: list[Tensor]) -> None:
        """One step of optimizer ``name`` (Adam) down ``grads``: ``torch.optim.Adam``'s
        eagerly, its tensor form inside ``torch.compile``."""
        optimizer = self.optimizers[name]
        if torch.compiler.is_compiling():
            tensor_adam_step_(optimizer, params, grads)
            return
        for p, g in zip(params, grads, strict=True):
            if p.grad is not g:  # the temperature's gradient, written directly
                p.grad = g
        optimizer.step()

    def constrain(self, name: str) -> None:
        """``--weight-clip``: clamp every weight of network ``name`` to [-weight_clip, weight_clip];
        ``--max-norm``: rescale each unit's incoming weights to L2 norm <= max_norm;
        ``--unit-sphere``: the selected weights' units to norm 1. In place, as tensor code on
        the parameters (the same eagerly and inside a compiled step)."""
        cfg, net = self.config, self.networks[name]
        with torch.no_grad():
            if cfg.weight_clip is not None:
                params = list(net.parameters())
                torch._foreach_clamp_min_(params, -cfg.weight_clip)
                torch._foreach_clamp_max_(params, cfg.weight_clip)
            if cfg.max_norm is not None:
                unit_norms_(_constraint_tensors(net), cfg.max_norm, at_most=True)
            if name in self.unit_sphere:
                unit_norms_(_constraint_tensors(net, self.unit_sphere[name]), 1.0, at_most=False)

    def layout_checks(self) -> list[Callable[[], None]]:
        """The layout checks of the capturable routines and constraints (``--compile``), run
        before every compiled step."""
        found = [self.target_routine.check]
        if self.ema_routine is not None:
            found.append(self.ema_routine.check)
        return found

    def average_policy(self) -> None:
        """Advance the policy EMA (if the config keeps one): after each policy step."""
        if self.ema_routine is not None:
            self.ema_routine.update()

    def on_env_step(self) -> None:
        """Called once per vectorised environment step (DQN steps its target routine here)."""

    @property
    def policy_network(self) -> nn.Module:
        return self.networks[self.policy_name]

    def evaluated_policies(self) -> dict[str, Callable[[Tensor], Tensor]]:
        """The deterministic policies an evaluation runs, by the name of their return: the
        policy (``return``) and, if kept, its EMA (``ema_return``)."""
        found = {"return": self.policy}
        if self.ema_routine is not None:
            found["ema_return"] = lambda obs: self.policy(obs, self.ema_routine.averaged)
        return found

    @property
    def drift_pairs(self) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
        """(networks to watch, their targets) for ``rlweights.drift.DriftMonitor``."""
        watched = {name: self.networks[name] for name in self.optimizers if name in self.networks}
        targets = {name: self.networks[f"{name}_target"] for name in self.online_names}
        return watched, targets

    def routines(self) -> dict[str, Any]:
        """The stateful rlweights routines, by the name their state has in a checkpoint."""
        found: dict[str, Any] = {"target_routine": self.target_routine}
        if self.ema_routine is not None:
            found["ema_routine"] = self.ema_routine
        for kind, routine in self.plasticity.items():
            found[f"{kind}_routine"] = routine
        return found

    def weights_state(self) -> dict[str, dict[str, Tensor]]:
        return {name: net.state_dict() for name, net in self.networks.items()}

    def load_weights(self, state: dict[str, dict[str, Tensor]]) -> None:
        """Copy saved weights in place (flat views and Parameter objects stay as they are)."""
        missing = sorted(set(self.networks) - set(state))
        if missing:
            raise ValueError(f"checkpoint has no weights for {', '.join(missing)}")
        for name, net in self.networks.items():
            net.load_state_dict(state[name])

    def training_state(self) -> dict[str, Any]:
        """Everything besides the weights that a resumed run needs."""
        state = {
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "routines": {name: r.state_dict() for name, r in self.routines().items()},
            "gradient_updates": self.gradient_updates,
        }
        state.update(self._extra_state())
        return state

    def load_training_state(self, state: dict[str, Any]) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, routine in self.routines().items():
            routine.load_state_dict(state["routines"][name])
        self.gradient_updates = state["gradient_updates"]
        self._load_extra_state(state)

    def averaged_tensors(self) -> list[Tensor]:
        """Trained tensors outside the networks that parallel learners average too."""
        return []

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # Interface of the subclasses.
    def act(self, obs: Tensor, steps: int) -> Tensor:  # exploring actions
        raise NotImplementedError

    def warmup_actions(self, actions: Tensor) -> Tensor:
        """The actions taken before learning starts, from the uniformly random ``actions``:
        as they are, but where SB3 adds action noise to them too (TD3, DDPG)."""
        return actions

    def policy(self, obs: Tensor, network: nn.Module | None = None) -> Tensor:
        raise NotImplementedError

    def step_inputs(self, batch_size: int) -> tuple[Any, ...]:
        """What ``gradient_step`` takes besides the batch, made outside it in the eager
        step's order: the random draws (so that a compiled step draws the eager one's numbers)
        and host-side schedules (TD3's policy delay)."""
        raise NotImplementedError

    def gradient_step(self, *fields_and_inputs: Any) -> dict[str, Tensor]:
        """The algorithm's whole gradient step on a batch's obs, actions, rewards, next_obs,
        terminated flags and the ``step_inputs``: run eagerly, and compiled as it is."""
        raise NotImplementedError


class ContinuousAgent(OffPolicyAgent):
    """The base of SAC and TD3: Box actions, an actor and a twin critic (``TwinQ``)."""

    actions = (gym.spaces.Box, "continuous (Box)", "use --algo dqn for discrete actions")

    @classmethod
    def check_spaces(
        cls, env_id: str, observation_space: gym.Space, action_space: gym.Space
    ) -> None:
        """A continuous agent's actor outputs a vector scaled to the action bounds: the
        actions must be a 1-D Box with finite bounds."""
        super().check_spaces(env_id, observation_space, action_space)
        if len(action_space.shape) != 1 or not action_space.is_bounded():
            raise ValueError(
                f"{cls.name} needs actions in a 1-D Box with finite bounds, but {env_id} has "
                f"{action_space}; wrap the environment in a gymnasium.ActionWrapper whose "
                "action space is one (flattening the actions, or mapping [-1, 1] to them)"
            )

    def __init__(self, config: AgentConfig, observation_space: gym.Space, action_space: gym.Space):
        self.check_spaces(config.env_id, observation_space, action_space)
        super().__init__(config)
        self.obs_dim = int(np.prod(observation_space.shape))
        self.act_dim = int(np.prod(action_space.shape))

    @property
    def actor(self) -> nn.Module:
        return self.networks["actor"]

    @property
    def critic(self) -> TwinQ:
        return self.networks["critic"]
