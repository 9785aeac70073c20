"""The native agents' pieces against independent references: networks, losses, schedules,
target updates and policy EMA through rlweights, constraints, replay buffer, RNG state."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.distributions import Normal, TransformedDistribution
from torch.distributions.transforms import TanhTransform
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode

import rlweights as rw
from rlweights.agents.agent import FLUSH_SUBNORMALS_EVERY, flush_subnormal_state_
from rlweights.agents.dqn import DQN, DQNConfig
from rlweights.agents.networks import TwinQ
from rlweights.agents.replay import ReplayBuffer
from rlweights.agents.sac import SAC, Actor, SACConfig
from rlweights.agents.seeding import rng_state, set_rng_state
from rlweights.agents.target_update import TargetUpdateSpec
from rlweights.agents.td3 import TD3, TD3Config


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


def test_twin_q_first_evaluates_only_the_first_networks():
    # TD3's actor reads Q1 alone (as SB3's q1_forward): the same values and input gradients as
    # the first row of the full call, with one network's products instead of two
    net = TwinQ(5, (7, 6)).double()
    x1 = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    full = net(x1, detach_weights=True)
    full[0].sum().backward()
    with FlopCounterMode(display=False) as flops:
        one = net(x2, detach_weights=True, first=1)
    assert one.shape == (1, 4)
    assert_close(one[0], full[0].detach())
    one[0].sum().backward()
    assert_close(x2.grad, x1.grad)
    with FlopCounterMode(display=False) as all_flops:
        net(x2)
    assert 2 * flops.get_total_flops() == all_flops.get_total_flops()


def test_actor_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    actor = Actor(3, 2, (16,), low=[-2.0, -1.0], high=[2.0, 3.0]).double()
    obs = torch.randn(64, 3, dtype=torch.float64)
    torch.manual_seed(1)
    action, log_prob = actor(obs)
    h = actor.trunk(obs)
    mean, log_std = actor.mean(h), actor.log_std(h).clamp(-5, 2)
    # the density of the squashed action in [-1, 1] (SB3's): the scaling to the bounds adds no
    # term, so the target entropy means the same whatever the bounds
    dist = TransformedDistribution(Normal(mean, log_std.exp()), [TanhTransform()])
    want = dist.log_prob((action - actor.bias) / actor.scale).sum(-1)
    assert_close(log_prob, want, rtol=1e-6, atol=1e-6)
    assert (action >= actor.bias - actor.scale).all() and (action <= actor.bias + actor.scale).all()


def test_update_moves_the_target_by_tau_through_rlweights():
    env = gym.make("Pendulum-v1")
    config = SACConfig(hidden=(16, 16), target_update="polyak:0.25")
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
    agent.train_step(buffer.sample(32))
    after = [p.detach().double() for p in agent.critic_target.parameters()]
    online = [p.detach().double() for p in agent.critic.parameters()]
    for b, a, o in zip(before, after, online, strict=True):
        assert_close(a, b + 0.25 * (o - b))
    assert agent.target_routine.updates == 1
    assert rw_flat(agent)


def rw_flat(agent) -> bool:
    from rlweights import ops

    return ops.pair_plan(agent.critic_target, agent.critic, "t").flat


def pendulum():
    env = gym.make("Pendulum-v1")
    return env.observation_space, env.action_space


def filled_buffer(n=64, obs_dim=3, discrete=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    if discrete:
        buffer = ReplayBuffer(n, (obs_dim,), (), action_dtype=torch.int64, seed=seed)
        actions = torch.randint(discrete, (n,), generator=g)
    else:
        buffer = ReplayBuffer(n, (obs_dim,), (1,), seed=seed)
        actions = torch.rand(n, 1, generator=g) * 4 - 2
    buffer.add(
        torch.randn(n, obs_dim, generator=g),
        actions,
        torch.randn(n, generator=g),
        torch.randn(n, obs_dim, generator=g),
        (torch.rand(n, generator=g) < 0.1).float(),
    )
    return buffer


def doubles(module):
    return [p.detach().double().clone() for p in module.parameters()]


def test_detached_critic_weights_pass_gradients_to_the_input_only():
    net = TwinQ(4, (8,))
    x1 = torch.randn(5, 4, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    net(x1).min(0)[0].sum().backward()
    weight_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    net(x2, detach_weights=True).min(0)[0].sum().backward()
    assert all(p.grad is None for p in net.parameters())
    assert_close(x2.grad, x1.grad)
    assert all(g.abs().sum() > 0 for g in weight_grads)


def test_sac_policy_ema_follows_the_actor_by_tau():
    agent = SAC(SACConfig(hidden=(16, 16), policy_ema=0.3), *pendulum())
    ema = agent.networks["actor_ema"]
    before = doubles(ema)
    agent.train_step(filled_buffer().sample(32))
    for b, e, a in zip(before, doubles(ema), doubles(agent.actor), strict=True):
        assert_close(e, b + 0.3 * (a - b))
    assert agent.ema_routine.updates == 1
    assert not any(p.requires_grad for p in ema.parameters())


def test_td3_updates_actor_and_targets_every_policy_delay_steps():
    agent = TD3(TD3Config(hidden=(16, 16), target_update="polyak:0.2", policy_delay=2), *pendulum())
    batch = filled_buffer().sample(32)
    actor_before = doubles(agent.actor)
    targets = [agent.networks["actor_target"], agent.networks["critic_target"]]
    onlines = [agent.actor, agent.critic]
    t0 = [doubles(t) for t in targets]
    losses = agent.train_step(batch)
    assert "actor_loss" not in losses
    assert all(torch.equal(a, b) for a, b in zip(actor_before, doubles(agent.actor), strict=True))
    assert all(
        torch.equal(a, b)
        for t, ref in zip(targets, t0, strict=True)
        for a, b in zip(doubles(t), ref, strict=True)
    )
    losses = agent.train_step(batch)
    assert "actor_loss" in losses
    assert agent.target_routine.updates == 1
    for target, online, before in zip(targets, onlines, t0, strict=True):
        for b, t, o in zip(before, doubles(target), doubles(online), strict=True):
            assert_close(t, b + 0.2 * (o - b))


def test_td3_actions_stay_within_the_bounds():
    agent = TD3(TD3Config(hidden=(8,), exploration_noise=5.0), *pendulum())
    actions = agent.act(torch.randn(1000, 3) * 10)
    assert actions.min() >= -2.0 and actions.max() <= 2.0
    assert (actions.abs() == 2.0).any()  # huge noise is clipped, not wrapped


def test_dqn_epsilon_matches_sb3_linear_schedule():
    from stable_baselines3.common.utils import LinearSchedule

    cfg = DQNConfig(total_steps=1000, exploration_fraction=0.2, exploration_final_eps=0.05)
    agent = DQN(cfg, *cartpole())
    sb3 = LinearSchedule(1.0, 0.05, 0.2)
    for steps in (0, 1, 50, 100, 199, 200, 201, 999):
        assert agent.epsilon(steps) == pytest.approx(sb3(1 - steps / 1000))


def cartpole():
    env = gym.make("CartPole-v1")
    return env.observation_space, env.action_space


def test_dqn_loss_is_the_huber_td_error_of_a_float64_reference():
    cfg = DQNConfig(hidden=(16,), gamma=0.9)
    agent = DQN(cfg, *cartpole())
    batch = filled_buffer(obs_dim=4, discrete=2).sample(32)
    online = [p.detach().double() for p in agent.q.parameters()]
    target = [p.detach().double() for p in agent.networks["q_target"].parameters()]

    def q(params, x):
        w1, b1, w2, b2 = params
        return torch.relu(x.double() @ w1.T + b1) @ w2.T + b2

    y = (
        batch["rewards"].double()
        + 0.9 * (1 - batch["terminated"].double()) * q(target, batch["next_obs"]).max(1)[0]
    )
    pred = q(online, batch["obs"]).gather(1, batch["actions"].unsqueeze(1)).squeeze(1)
    d = (pred - y).abs()
    want = torch.where(d < 1, 0.5 * d**2, d - 0.5).mean()
    loss = agent.train_step(batch)["loss"]
    assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


def test_dqn_hard_target_update_counts_environment_steps():
    agent = DQN(DQNConfig(hidden=(8,), target_update="hard:10", num_envs=2), *cartpole())
    target = agent.networks["q_target"]
    with torch.no_grad():
        for p in agent.q.parameters():
            p.add_(1.0)
    for _ in range(4):  # 8 environment steps with 2 environments
        agent.on_env_step()
    assert not torch.equal(target[0].weight, agent.q[0].weight)
    agent.on_env_step()  # 10 environment steps
    assert all(
        torch.equal(a, b) for a, b in zip(target.parameters(), agent.q.parameters(), strict=True)
    )
    assert agent.target_routine.updates == 1


def test_clip_and_max_norm_hold_after_every_optimizer_step():
    agent = SAC(SACConfig(hidden=(16, 16), weight_clip=0.05, max_norm=0.2), *pendulum())
    agent.train_step(filled_buffer().sample(32))
    for name in ("actor", "critic"):
        params = list(agent.networks[name].parameters())
        assert all(p.abs().max() <= 0.05 for p in params)
        assert any((p.abs() == 0.05).any() for p in params)
    for layer in agent.actor.modules():
        if isinstance(layer, torch.nn.Linear):
            assert (torch.linalg.vector_norm(layer.weight.double(), dim=1) <= 0.2 + 1e-6).all()
    for w in agent.critic.weights:  # (networks, inputs, outputs): a unit is a column
        assert (torch.linalg.vector_norm(w.double(), dim=1) <= 0.2 + 1e-6).all()
    assert_close(agent.actor.scale, torch.tensor([2.0]))  # buffers are not weights


SMALLEST_NORMAL = 2.0**-126  # float32


def test_flush_subnormal_state_zeroes_only_subnormal_entries():
    p = torch.nn.Parameter(torch.zeros(7))
    optimizer = torch.optim.Adam([p])
    p.grad = torch.ones(7)
    optimizer.step()
    values = [1e-40, -1e-39, 1.4e-45, 1.2e-38, -0.5, 3.0, 0.0]  # 1.2e-38 is normal
    state = optimizer.state[p]
    for key in ("exp_avg", "exp_avg_sq"):
        state[key].copy_(torch.tensor(values))
    before = {key: state[key] for key in ("exp_avg", "exp_avg_sq")}
    flush_subnormal_state_(optimizer)
    reference = torch.tensor([0.0 if abs(v) < SMALLEST_NORMAL else v for v in values])
    for key, tensor in before.items():
        assert state[key] is tensor  # in place: a compiled step reads these tensors
        assert torch.equal(state[key], reference)
    assert state["step"].item() == 1


def backpropagated(agent) -> list[torch.optim.Optimizer]:
    """The agent's optimizers whose gradients come from backward (SAC's temperature gradient
    is written directly)."""
    return [opt for name, opt in agent.optimizers.items() if name != "alpha"]


def subnormal_moments(agent) -> int:
    """Subnormal entries in the moments of every backpropagated optimizer's first parameter."""
    total = 0
    for optimizer in backpropagated(agent):
        state = optimizer.state[optimizer.param_groups[0]["params"][0]]
        for key in ("exp_avg", "exp_avg_sq"):
            v = state[key].double()
            total += int(((v != 0) & (v.abs() < SMALLEST_NORMAL)).sum())
    return total


@pytest.mark.parametrize("algo", ["dqn", "sac", "td3"])
def test_agents_flush_subnormal_moments_every_n_updates(algo):
    # A parameter whose gradient is exactly 0 (a dead unit's, here forced by a hook) keeps
    # Adam's moments decaying; once subnormal, they stay subnormal (slow arithmetic on x86)
    # until the agent flushes them, at every FLUSH_SUBNORMALS_EVERY-th gradient update.
    if algo == "dqn":
        agent = DQN(DQNConfig(hidden=(16, 16)), *cartpole())
        buffer = filled_buffer(obs_dim=4, discrete=2)
    else:
        make, config = (SAC, SACConfig) if algo == "sac" else (TD3, TD3Config)
        agent = make(config(hidden=(16, 16)), *pendulum())
        buffer = filled_buffer()
    for _ in range(2):  # every optimizer has stepped (TD3's actor every second update)
        agent.train_step(buffer.sample(32))
    for optimizer in backpropagated(agent):
        first = optimizer.param_groups[0]["params"][0]
        first.register_hook(torch.zeros_like)
        for key in ("exp_avg", "exp_avg_sq"):
            optimizer.state[first][key].fill_(1e-40)
    count = subnormal_moments(agent)
    assert count > 0
    agent.gradient_updates = 5 * FLUSH_SUBNORMALS_EVERY - 2
    agent.train_step(buffer.sample(32))  # not the N-th: the moments decay and stay subnormal
    assert subnormal_moments(agent) == count
    agent.train_step(buffer.sample(32))  # the N-th update flushes them
    assert agent.gradient_updates % FLUSH_SUBNORMALS_EVERY == 0
    assert subnormal_moments(agent) == 0


def test_replay_buffer_state_round_trip():
    buffer = filled_buffer(n=10)
    buffer.add(torch.ones(3, 3), torch.ones(3, 1), torch.ones(3), torch.ones(3, 3), torch.ones(3))
    copy = ReplayBuffer(10, (3,), (1,))
    copy.load_state_dict(buffer.state_dict())
    assert copy.size == buffer.size and copy.position == buffer.position == 3
    for name in ReplayBuffer.FIELDS:
        assert torch.equal(getattr(copy, name), getattr(buffer, name))
    for a, b in zip(copy.sample(8).values(), buffer.sample(8).values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="more than this buffer's capacity 4"):
        ReplayBuffer(4, (3,), (1,)).load_state_dict(buffer.state_dict())


@pytest.mark.parametrize("gather_bytes", [None, 1000])
def test_replay_buffer_draws_many_batches_as_single_samples_draw_them(monkeypatch, gather_bytes):
    # --gradient-steps K draws its K batches at once (in chunks when they are large): on the
    # CPU they are the batches of K calls of sample(), and each row is a stored transition
    if gather_bytes is not None:  # 1000 bytes: chunks of one batch's worth of rows or less
        monkeypatch.setattr(ReplayBuffer, "GATHER_BYTES", gather_bytes)
    one, many = filled_buffer(n=50, seed=3), filled_buffer(n=50, seed=3)
    singles = [one.sample(7) for _ in range(5)]
    drawn = list(many.batches(5, 7))
    assert len(drawn) == 5
    stored = torch.cat([many.obs, many.next_obs], -1)
    for single, batch in zip(singles, drawn, strict=True):
        for name in ReplayBuffer.FIELDS:
            assert torch.equal(single[name], batch[name])
        rows = torch.cat([batch["obs"], batch["next_obs"]], -1)
        assert (rows[:, None] == stored[None]).all(-1).any(-1).all()
    assert torch.equal(one.generator.get_state(), many.generator.get_state())


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0])
    assert (first[1] == again[1]).all() and first[2] == again[2]


@pytest.mark.parametrize(
    "spec", ["polyak:1.5", "polyak:-0.1", "hard:0", "hard:2.5", "soft:0.1", "polyak", ""]
)
def test_bad_target_update_specs(spec):
    with pytest.raises(ValueError, match="'polyak:TAU' with TAU in \\[0, 1\\] or 'hard:EVERY'"):
        TargetUpdateSpec.parse(spec)


def test_good_target_update_specs():
    assert TargetUpdateSpec.parse("polyak:0.005") == TargetUpdateSpec("polyak", tau=0.005)
    assert TargetUpdateSpec.parse("hard:250") == TargetUpdateSpec("hard", every=250)


def test_target_update_spec_builds_the_rlweights_routine():
    polyak = TargetUpdateSpec.parse("polyak:0.3").routine()
    assert isinstance(polyak, rw.PolyakUpdate) and polyak.tau == 0.3 and polyak.every == 1
    hard = TargetUpdateSpec.parse("hard:10").routine(steps_per_call=4)
    assert isinstance(hard, rw.HardUpdate) and hard.every == 2  # SB3's max(10 // 4, 1)
    assert TargetUpdateSpec.parse("hard:3").routine(steps_per_call=8).every == 1
    with pytest.raises(ValueError, match="every must be an int >= 1, got 0"):
        TargetUpdateSpec("hard", every=0)


def test_td3_policy_delay_counter_survives_a_checkpoint():
    config = TD3Config(hidden=(8,), policy_delay=3)
    agent = TD3(config, *pendulum())
    batch = filled_buffer().sample(16)
    assert ["actor_loss" in agent.train_step(batch) for _ in range(2)] == [False, False]
    fresh = TD3(config, *pendulum())
    fresh.load_training_state(agent.training_state())
    assert "actor_loss" in fresh.train_step(batch)  # the third critic step: an actor step


def test_bad_configs_and_wrong_spaces():
    with pytest.raises(ValueError, match=r"impossible values: batch_size=0, policy_ema=0\.0"):
        SACConfig(batch_size=0, policy_ema=0.0)
    with pytest.raises(ValueError, match=r"TD3Config: impossible values: policy_delay=0"):
        TD3Config(policy_delay=0)
    with pytest.raises(ValueError, match=r"exploration_final_eps=1\.5"):
        DQNConfig(exploration_final_eps=1.5)
    with pytest.raises(ValueError, match="SAC needs continuous"):
        SAC(SACConfig(env_id="CartPole-v1"), *cartpole())
    with pytest.raises(ValueError, match="TD3 needs continuous"):
        TD3(TD3Config(env_id="CartPole-v1"), *cartpole())
    with pytest.raises(ValueError, match=r"DQN needs discrete actions.*use --algo sac"):
        DQN(DQNConfig(env_id="Pendulum-v1"), *pendulum())
    image = gym.spaces.Box(0, 255, (8, 8, 3))
    with pytest.raises(ValueError, match="vector observations"):
        DQN(DQNConfig(), image, gym.spaces.Discrete(2))
    with pytest.raises(ValueError, match="capacity must be an int >= 1"):
        ReplayBuffer(0, (3,), (1,))
    with pytest.raises(ValueError, match="the buffer is empty"):
        ReplayBuffer(4, (3,), (1,)).sample(2)


def test_sac_temperature_gradient_is_that_of_its_loss():
    """The update writes the gradient of SB3's ent_coef_loss,
    -(log_alpha * (log_prob + target_entropy)).mean(), directly: compare with autograd."""
    agent = SAC(SACConfig(hidden=(16, 16)), *pendulum())
    before = agent.log_alpha.detach().clone()
    out = agent.train_step(filled_buffer().sample(32))
    log_alpha = before.clone().requires_grad_(True)
    log_prob_mean = -out["entropy"]  # the loss is linear in log_prob: its mean suffices
    (-(log_alpha * (log_prob_mean + agent.target_entropy))).mean().backward()
    assert_close(agent.log_alpha.grad, log_alpha.grad)
    assert not torch.equal(agent.log_alpha.detach(), before)  # and Adam stepped


def test_sac_exploration_samples_follow_the_actor_distribution():
    """act() draws from the same tanh-Gaussian as the actor's forward (it skips only the
    log-probability): same noise, same actions."""
    agent = SAC(SACConfig(hidden=(16, 16)), *pendulum())
    obs = torch.randn(64, 3)
    torch.manual_seed(3)
    acted = agent.act(obs)
    torch.manual_seed(3)
    with torch.no_grad():
        sampled, _ = agent.actor(obs)
    assert_close(acted, sampled)


def test_replay_buffer_stores_and_draws_what_torch_casting_and_indexing_give():
    rng = np.random.default_rng(0)
    for discrete in (False, True):
        n = 40
        act_shape, act_dtype = ((), torch.int64) if discrete else ((2,), torch.float32)
        buffer = ReplayBuffer(32, (3,), act_shape, action_dtype=act_dtype, seed=1)
        # float64 values that float32 rounds, integer actions, boolean terminations; 40 rows
        # into 32: the last 8 wrap to the front
        obs, next_obs = rng.standard_normal((n, 3)), rng.standard_normal((n, 3))
        actions = rng.integers(0, 4, n) if discrete else rng.standard_normal((n, 2))
        rewards, terminated = rng.standard_normal(n), rng.random(n) < 0.3
        for i in range(0, n, 5):
            rows = slice(i, i + 5)
            buffer.add(obs[rows], actions[rows], rewards[rows], next_obs[rows], terminated[rows])
        expected = {
            name: torch.as_tensor(np.concatenate([value[32:], value[8:32]])).to(dtype)
            for name, value, dtype in [
                ("obs", obs, torch.float32),
                ("actions", actions, act_dtype),
                ("rewards", rewards, torch.float32),
                ("next_obs", next_obs, torch.float32),
                ("terminated", terminated, torch.float32),
            ]
        }
        for name, value in expected.items():
            assert torch.equal(getattr(buffer, name), value), name
        copy = ReplayBuffer(32, (3,), act_shape, action_dtype=act_dtype)
        copy.load_state_dict(buffer.state_dict())  # written in place: what the draws read
        state = copy.generator.get_state()
        drawn = list(copy.batches(3, 8))
        copy.generator.set_state(state)
        idx = torch.randint(32, (3, 8), generator=copy.generator)
        for step, batch in enumerate(drawn):
            for name, value in expected.items():
                assert torch.equal(batch[name], value[idx[step]]), name


def test_replay_buffer_wraps_around_in_order():
    buffer = ReplayBuffer(5, (1,), ())
    for start in (0, 3, 6):  # 3 rows at a time: the second and third batches wrap
        rows = torch.arange(start, start + 3, dtype=torch.float32)
        buffer.add(rows[:, None], rows, rows, rows[:, None], torch.zeros(3))
    assert buffer.size == 5 and buffer.position == 4
    assert buffer.rewards.tolist() == [5.0, 6.0, 7.0, 8.0, 4.0]


def _feed(buffer: ReplayBuffer, start: int, stop: int, n: int = 2) -> None:
    """Transitions ``start``..``stop - 1``, ``n`` at a time; each row holds its index."""
    for first in range(start, stop, n):
        rows = torch.arange(first, first + n, dtype=torch.float32)
        buffer.add(rows[:, None], rows[:, None], rows, rows[:, None] + 0.5, rows % 2)


@pytest.mark.parametrize(
    ("stop_at", "capacity_before", "capacity_after"),
    [
        (10, 10, 12),  # full at the stop, then room for more (the run is given more steps)
        (6, 10, 12),  # stopped half full
        (16, 10, 10),  # wrapped, same capacity
        (16, 10, 12),  # wrapped, then more room
        (16, 10, 14),  # wrapped, room for all of it
    ],
)
def test_a_restored_buffer_holds_what_an_unstopped_buffer_holds(
    stop_at, capacity_before, capacity_after
):
    """A buffer saved at ``stop_at`` transitions and loaded into a buffer of another
    capacity (a run resumed with more steps) holds, after the rest of the stream, the rows an
    unstopped buffer of the final capacity holds, in the same places, and samples alike."""
    unstopped = ReplayBuffer(capacity_after, (1,), (1,), seed=3)
    _feed(unstopped, 0, 20)
    stopped = ReplayBuffer(capacity_before, (1,), (1,), seed=3)
    _feed(stopped, 0, stop_at)
    resumed = ReplayBuffer(capacity_after, (1,), (1,))
    resumed.load_state_dict(stopped.state_dict())
    _feed(resumed, stop_at, 20)
    kept = {int(r) for r in unstopped.rewards[: unstopped.size]}
    if stop_at <= capacity_before or capacity_before == capacity_after:
        # nothing lost before the stop: exactly the unstopped buffer's rows
        assert (resumed.size, resumed.position) == (unstopped.size, unstopped.position)
        for name in ReplayBuffer.FIELDS:
            assert torch.equal(getattr(resumed, name), getattr(unstopped, name)), name
        assert torch.equal(resumed.sample(6)["rewards"], unstopped.sample(6)["rewards"])
    else:  # the stopped buffer had dropped rows the larger one keeps: never zeros or repeats
        held = [int(r) for r in resumed.rewards[: resumed.size]]
        assert len(set(held)) == resumed.size and set(held) <= kept
        assert max(held) == 19
    assert 0 not in resumed.next_obs[: resumed.size]  # no empty row is ever sampled
