"""Soft Actor-Critic on Gymnasium environments with continuous actions, built on rlweights.

Small and readable in the CleanRL spirit, but importable: a dataclass config, the networks,
an agent with ``act`` / ``update``, and :func:`train`. The critic's two Q-networks are batched
(one ``baddbmm`` per layer for both), the target critic is ``rw.make_target(critic)`` (both in
flat storage) updated by ``rw.PolyakUpdate`` after every gradient step, and the replay buffer
keeps torch tensors on the training device.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import rlweights as rw
from agents.common import ReplayBuffer, seed_everything

__all__ = ["SAC", "SACConfig", "train"]

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


@dataclass
class SACConfig:
    """Defaults follow rl-baselines3-zoo's SAC hyperparameters for Pendulum-v1."""

    env_id: str = "Pendulum-v1"
    total_steps: int = 20_000
    seed: int = 0
    num_envs: int = 1
    buffer_size: int = 1_000_000
    batch_size: int = 256
    learning_starts: int = 100
    gamma: float = 0.99
    tau: float = 0.005
    learning_rate: float = 1e-3
    hidden: tuple[int, ...] = (256, 256)
    device: str = "cpu"
    logdir: str | None = None  # TensorBoard events (returns, losses, drift) when given
    drift_every: int = 1000  # environment steps between drift measurements; 0 disables

    def __post_init__(self) -> None:
        checks = {
            "total_steps": self.total_steps >= 1,
            "num_envs": self.num_envs >= 1,
            "buffer_size": self.buffer_size >= 1,
            "batch_size": self.batch_size >= 1,
            "learning_starts": self.learning_starts >= 0,
            "gamma": 0.0 <= self.gamma <= 1.0,
            "tau": 0.0 <= self.tau <= 1.0,
            "learning_rate": self.learning_rate > 0.0,
            "hidden": len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden),
            "drift_every": self.drift_every >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(f"SACConfig: impossible values: {values}")


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """A tanh-squashed Gaussian policy scaled to the action bounds."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...], low, high):
        super().__init__()
        self.trunk = _mlp([obs_dim, *hidden])
        self.trunk.append(nn.ReLU())
        self.mean = nn.Linear(hidden[-1], act_dim)
        self.log_std = nn.Linear(hidden[-1], act_dim)
        low, high = (
            torch.as_tensor(low, dtype=torch.float32),
            torch.as_tensor(high, dtype=torch.float32),
        )
        self.register_buffer("scale", (high - low) / 2)
        self.register_buffer("bias", (high + low) / 2)

    def forward(self, obs: Tensor, deterministic: bool = False) -> tuple[Tensor, Tensor]:
        """(action, log-probability of it)."""
        h = self.trunk(obs)
        mean = self.mean(h)
        if deterministic:
            return torch.tanh(mean) * self.scale + self.bias, torch.zeros(
                len(obs), device=obs.device
            )
        log_std = self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)
        std = log_std.exp()
        noise = torch.randn_like(mean)
        pre = mean + std * noise
        squashed = torch.tanh(pre)
        log_prob = (-0.5 * noise.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        # Change of variables for tanh and the affine scaling (numerically stable form).
        log_prob -= (2 * (math.log(2) - pre - F.softplus(-2 * pre))).sum(-1)
        log_prob -= torch.log(self.scale).sum()
        return squashed * self.scale + self.bias, log_prob


class TwinQ(nn.Module):
    """Two Q-networks evaluated together: every layer is one batched matmul for both."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], n: int = 2):
        super().__init__()
        sizes = [in_dim, *hidden, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for n_in, n_out in itertools.pairwise(sizes):
            bound = 1 / math.sqrt(n_in)  # nn.Linear's default initialisation, per network
            self.weights.append(nn.Parameter(torch.empty(n, n_in, n_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(n, 1, n_out).uniform_(-bound, bound)))

    def forward(self, x: Tensor) -> Tensor:
        """Q-values of shape (n, batch)."""
        h = x.unsqueeze(0).expand(len(self.weights[0]), -1, -1)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.baddbmm(b, h, w)
            if i < last:
                h = F.relu(h)
        return h.squeeze(-1)


class SAC:
    """The agent: networks, optimizers, entropy temperature, target update routine."""

    def __init__(self, config: SACConfig, observation_space: gym.Space, action_space: gym.Space):
        if not isinstance(action_space, gym.spaces.Box):
            raise ValueError(
                f"SAC needs continuous (Box) actions; {config.env_id} has {action_space}. "
                "Use DQN for discrete actions."
            )
        self.config = config
        device = torch.device(config.device)
        obs_dim = int(np.prod(observation_space.shape))
        act_dim = int(np.prod(action_space.shape))
        self.actor = Actor(obs_dim, act_dim, config.hidden, action_space.low, action_space.high)
        self.actor.to(device)
        self.critic = TwinQ(obs_dim + act_dim, config.hidden).to(device)
        self.critic_target = rw.make_target(self.critic)
        self.target_update = rw.PolyakUpdate(self.critic, self.critic_target, tau=config.tau)
        self.log_alpha = torch.zeros(1, device=device, requires_grad=True)
        self.target_entropy = -float(act_dim)
        lr = config.learning_rate
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=lr, foreach=True)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=lr, foreach=True)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=lr, foreach=True)

    @torch.no_grad()
    def act(self, obs: Tensor, deterministic: bool = False) -> Tensor:
        return self.actor(obs, deterministic)[0]

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """One gradient step of critic, actor and temperature, then the target update."""
        cfg = self.config
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            next_actions, next_log_prob = self.actor(batch["next_obs"])
            next_q = self.critic_target(torch.cat([batch["next_obs"], next_actions], -1)).min(0)[0]
            soft = next_q - alpha * next_log_prob
            target = batch["rewards"] + cfg.gamma * (1 - batch["dones"]) * soft
        q = self.critic(torch.cat([batch["obs"], batch["actions"]], -1))
        # SB3's 0.5 * (mse_1 + mse_2) is the mean over both networks' squared errors.
        critic_loss = F.mse_loss(q, target.expand_as(q))
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizer.step()

        actions, log_prob = self.actor(batch["obs"])
        q_pi = self.critic(torch.cat([batch["obs"], actions], -1)).min(0)[0]
        actor_loss = (alpha * log_prob - q_pi).mean()
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()

        alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
        self.alpha_optimizer.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_optimizer.step()

        self.target_update.step()
        return {"critic_loss": critic_loss, "actor_loss": actor_loss, "alpha": alpha}


def train(config: SACConfig) -> tuple[SAC, dict]:
    """Train from scratch; returns the agent and a summary (returns, steps per second).

    With ``config.logdir`` it writes TensorBoard events: episodic returns, losses (every 100
    updates) and weight drift of actor and critic (with its target) through
    :class:`rlweights.tensorboard.DriftLogger` every ``config.drift_every`` steps.
    """
    seed_everything(config.seed)
    # Same-step autoreset: the final observation of an episode comes in infos["final_obs"],
    # so every stored transition is a real one.
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.wrappers.RecordEpisodeStatistics(gym.make(config.env_id))] * config.num_envs,
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    agent = SAC(config, envs.single_observation_space, envs.single_action_space)
    device = torch.device(config.device)
    buffer = ReplayBuffer(
        config.buffer_size,
        envs.single_observation_space.shape,
        envs.single_action_space.shape,
        device,
        seed=config.seed,
    )
    writer = drift = None
    if config.logdir is not None:
        from torch.utils.tensorboard import SummaryWriter

        from rlweights.drift import DriftMonitor
        from rlweights.tensorboard import DriftLogger

        writer = SummaryWriter(config.logdir)
        if config.drift_every:
            monitor = DriftMonitor(
                {"actor": agent.actor, "critic": agent.critic}, {"critic": agent.critic_target}
            )
            drift = DriftLogger(writer, monitor, config=asdict(config))
    envs.single_action_space.seed(config.seed)
    obs, _ = envs.reset(seed=config.seed)
    returns: list[float] = []
    drift_seconds = 0.0
    start = time.perf_counter()
    steps = updates = 0
    while steps < config.total_steps:
        if steps < config.learning_starts:
            actions = np.stack([envs.single_action_space.sample() for _ in range(config.num_envs)])
        else:
            obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
            actions = agent.act(obs_t).cpu().numpy()
        next_obs, rewards, terminated, truncated, infos = envs.step(actions)
        real_next = next_obs.copy()
        done = terminated | truncated
        if done.any() and "final_obs" in infos:
            for i in np.flatnonzero(done):
                real_next[i] = infos["final_obs"][i]
        buffer.add(obs, actions, rewards, real_next, terminated)
        final = infos.get("final_info", {})
        if "episode" in final:
            finished = final["_episode"]
            for r in np.asarray(final["episode"]["r"])[finished]:
                returns.append(float(r))
                if writer is not None:
                    writer.add_scalar("charts/episodic_return", float(r), steps + config.num_envs)
        obs = next_obs
        previous, steps = steps, steps + config.num_envs
        if steps > config.learning_starts:
            losses = agent.update(buffer.sample(config.batch_size))
            updates += 1
            if writer is not None and updates % 100 == 0:
                for name, value in losses.items():
                    writer.add_scalar(f"losses/{name}", value.item(), steps)
        if drift is not None and steps // config.drift_every > previous // config.drift_every:
            tick = time.perf_counter()
            drift.log(steps)
            drift_seconds += time.perf_counter() - tick
    wall = time.perf_counter() - start
    envs.close()
    if writer is not None:
        writer.close()
    summary = {
        "config": asdict(config),
        "steps": steps,
        "episodes": len(returns),
        "last_returns": returns[-10:],
        "wall_seconds": wall,
        "steps_per_second": steps / wall,
        "target_updates": agent.target_update.updates,
        "drift_seconds": drift_seconds,
    }
    return agent, summary
