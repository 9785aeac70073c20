"""The native SAC agent (groundwork of issue 5): networks against references, determinism,
target updates through rlweights."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch
from torch.distributions import Normal, TransformedDistribution
from torch.distributions.transforms import AffineTransform, TanhTransform
from torch.testing import assert_close

from agents.common import ReplayBuffer
from agents.sac import SAC, Actor, SACConfig, TwinQ, train

TINY = {"total_steps": 300, "learning_starts": 100, "hidden": (32, 32), "batch_size": 64}


def test_twin_q_equals_two_separate_mlps():
    net = TwinQ(5, (7, 6)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    got = net(x)
    for i in range(2):
        h = x
        for j, (w, b) in enumerate(zip(net.weights, net.biases, strict=True)):
            h = h @ w[i] + b[i]
            if j < len(net.weights) - 1:
                h = torch.relu(h)
        assert_close(got[i], h.squeeze(-1))


def test_actor_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    actor = Actor(3, 2, (16,), low=[-2.0, -1.0], high=[2.0, 3.0]).double()
    obs = torch.randn(64, 3, dtype=torch.float64)
    torch.manual_seed(1)
    action, log_prob = actor(obs)
    h = actor.trunk(obs)
    mean, log_std = actor.mean(h), actor.log_std(h).clamp(-5, 2)
    dist = TransformedDistribution(
        Normal(mean, log_std.exp()),
        [TanhTransform(cache_size=1), AffineTransform(actor.bias, actor.scale)],
    )
    want = dist.log_prob(action).sum(-1)
    assert_close(log_prob, want, rtol=1e-6, atol=1e-6)
    assert (action >= actor.bias - actor.scale).all() and (action <= actor.bias + actor.scale).all()


def test_update_moves_the_target_by_tau_through_rlweights():
    env = gym.make("Pendulum-v1")
    config = SACConfig(hidden=(16, 16), tau=0.25)
    agent = SAC(config, env.observation_space, env.action_space)
    assert agent.critic_target.training is False
    buffer = ReplayBuffer(100, (3,), (1,))
    buffer.add(
        torch.randn(50, 3),
        torch.rand(50, 1) * 4 - 2,
        torch.randn(50),
        torch.randn(50, 3),
        torch.zeros(50),
    )
    before = [p.detach().double().clone() for p in agent.critic_target.parameters()]
    agent.update(buffer.sample(32))
    after = [p.detach().double() for p in agent.critic_target.parameters()]
    online = [p.detach().double() for p in agent.critic.parameters()]
    for b, a, o in zip(before, after, online, strict=True):
        assert_close(a, b + 0.25 * (o - b))
    assert agent.target_update.updates == 1
    assert rw_flat(agent)


def rw_flat(agent) -> bool:
    from rlweights import ops

    return ops._pair_plan(agent.critic_target, agent.critic, "t").flat


def test_training_is_deterministic_and_counts_updates():
    agent_a, summary = train(SACConfig(**TINY, seed=3))
    agent_b, _ = train(SACConfig(**TINY, seed=3))
    for a, b in zip(agent_a.actor.parameters(), agent_b.actor.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(
        agent_a.critic_target.parameters(), agent_b.critic_target.parameters(), strict=True
    ):
        assert torch.equal(a, b)
    assert summary["steps"] == 300
    assert summary["target_updates"] == 300 - 100
    assert summary["episodes"] == 1 and summary["last_returns"][0] < 0
    agent_c, _ = train(SACConfig(**TINY, seed=4))
    assert not torch.equal(next(agent_a.actor.parameters()), next(agent_c.actor.parameters()))


def test_vector_envs():
    _, summary = train(SACConfig(**(TINY | {"total_steps": 400}), num_envs=2))
    assert summary["steps"] == 400 and summary["episodes"] == 2  # 200 steps in each env


def test_bad_configs_and_discrete_envs():
    with pytest.raises(ValueError, match=r"impossible values: batch_size=0, tau=1\.5"):
        SACConfig(tau=1.5, batch_size=0)
    env = gym.make("CartPole-v1")
    with pytest.raises(ValueError, match="SAC needs continuous"):
        SAC(SACConfig(env_id="CartPole-v1"), env.observation_space, env.action_space)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        ReplayBuffer(0, (3,), (1,))
    with pytest.raises(ValueError, match="the buffer is empty"):
        ReplayBuffer(4, (3,), (1,)).sample(2)


def test_training_logs_returns_losses_and_drift_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, summary = train(
        SACConfig(**TINY | {"total_steps": 400}, logdir=str(tmp_path), drift_every=100)
    )
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "charts/episodic_return" in scalars
    assert "losses/critic_loss" in scalars
    assert "drift/critic/target_distance" in scalars
    assert "drift/actor/layers/mean.weight/update_ratio" in scalars
    steps = [e.step for e in events.Scalars("drift/critic/target_distance")]
    assert steps == [100, 200, 300, 400]
    assert summary["drift_seconds"] > 0
    first = events.Scalars("charts/episodic_return")[0]
    assert first.step == 200  # logged at the environment step that ended the episode
    assert first.value == pytest.approx(summary["last_returns"][0], rel=1e-6)
