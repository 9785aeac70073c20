"""The native agents against SB3's algorithms of the same name (issue 14): identical weights,
identical batches, and the gradient steps must agree; the same stream of environment steps,
and the schedules (exploration, gradient steps, target copies) must agree."""

from __future__ import annotations

import dataclasses

import gymnasium as gym
import pytest
import torch
from stable_baselines3.common.logger import configure
from stable_baselines3.common.type_aliases import ReplayBufferSamples
from torch.testing import assert_close

from rlweights.agents.registry import ALGOS, make_config
from rlweights.agents.sb3_train import build_sb3_model

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _pair(algo: str, env_id: str, **overrides):
    """An SB3 model and a native agent of one config (``overrides`` replace the preset's
    values, None included)."""
    config = dataclasses.replace(make_config(algo, env_id, hidden=(16, 16)), **overrides)
    model, _ = build_sb3_model(config)
    model.set_logger(configure(None, []))
    env = gym.make(env_id)
    agent = ALGOS[algo][1](config, env.observation_space, env.action_space)
    env.close()
    return config, model, agent


def _linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def _copy_linears(source: torch.nn.Module, target: torch.nn.Module) -> None:
    with torch.no_grad():
        for s, t in zip(_linears(source), _linears(target), strict=True):
            t.weight.copy_(s.weight)
            t.bias.copy_(s.bias)


def _batch(model, n: int, seed: int) -> tuple[dict[str, torch.Tensor], ReplayBufferSamples]:
    """One batch of random transitions, as the native buffer and SB3's give it."""
    gen = torch.Generator().manual_seed(seed)
    obs_dim = model.observation_space.shape[0]
    obs = torch.randn(n, obs_dim, generator=gen)
    next_obs = torch.randn(n, obs_dim, generator=gen)
    if isinstance(model.action_space, gym.spaces.Discrete):
        actions = torch.randint(model.action_space.n, (n,), generator=gen)
        sb3_actions = actions.unsqueeze(-1)
    else:
        actions = torch.rand(n, model.action_space.shape[0], generator=gen) * 2 - 1
        sb3_actions = actions  # SB3 stores actions scaled to [-1, 1]
    rewards = torch.randn(n, generator=gen)
    dones = (torch.rand(n, generator=gen) < 0.1).float()
    native = {"obs": obs, "actions": actions, "rewards": rewards, "next_obs": next_obs}
    native["terminated"] = dones
    sb3 = ReplayBufferSamples(
        obs, sb3_actions, next_obs, dones.unsqueeze(-1), rewards.unsqueeze(-1), None
    )
    return native, sb3


def test_dqn_gradient_steps_match_sb3_on_identical_batches():
    _, model, agent = _pair("dqn", "CartPole-v1", learning_rate=1e-2, max_grad_norm=0.5)
    _copy_linears(model.q_net, agent.q)
    _copy_linears(model.q_net_target, agent.networks["q_target"])
    batches = [_batch(model, 64, seed) for seed in range(20)]
    feed = iter(sb3 for _, sb3 in batches)
    model.replay_buffer.sample = lambda *args, **kwargs: next(feed)
    model.train(gradient_steps=len(batches), batch_size=64)
    for native, _ in batches:
        agent.train_step(native)
    for s, t in zip(_linears(model.q_net), _linears(agent.q), strict=True):
        assert_close(t.weight, s.weight, **TOL)
        assert_close(t.bias, s.bias, **TOL)


def test_dqn_schedule_of_gradient_steps_and_target_copies_matches_sb3(monkeypatch):
    """On the same number of environment steps: the steps after which SB3's DQN trains (and
    how many gradient steps), and after which it copies the target, are the native agent's."""
    import stable_baselines3.dqn.dqn as sb3_dqn
    from stable_baselines3 import DQN
    from stable_baselines3.common.env_util import make_vec_env

    from rlweights.agents.sb3_train import sb3_kwargs
    from rlweights.agents.train import train

    overrides = {"total_steps": 300, "learning_starts": 50, "train_freq": 16}
    overrides |= {"gradient_steps": 3, "target_update": "hard:7", "hidden": (16,)}
    overrides |= {"eval_every": 0, "eval_episodes": 1, "batch_size": 8}
    config = make_config("dqn", "CartPole-v1", **overrides)

    sb3_events: dict[str, list[tuple[int, int]]] = {"train": [], "target": []}
    model = DQN("MlpPolicy", make_vec_env("CartPole-v1", n_envs=1, seed=0), **sb3_kwargs(config))
    model.set_logger(configure(None, []))
    original_train, original_polyak = model.train, sb3_dqn.polyak_update

    def train_spy(gradient_steps: int, batch_size: int) -> None:
        sb3_events["train"].append((model.num_timesteps, gradient_steps))
        original_train(gradient_steps, batch_size)

    def polyak_spy(params, target_params, tau):
        params = list(params)
        if params and params[0] is next(model.q_net.parameters()):
            sb3_events["target"].append((model.num_timesteps, 1))
        original_polyak(params, target_params, tau)

    model.train = train_spy
    monkeypatch.setattr(sb3_dqn, "polyak_update", polyak_spy)
    model.learn(config.total_steps)

    native_events: dict[str, list[tuple[int, int]]] = {"train": [], "target": []}
    last = {"train": 0, "target": 0}

    def monitor(steps, agent):
        for name, count in (
            ("train", agent.gradient_updates),
            ("target", agent.target_routine.updates),
        ):
            if count > last[name]:
                native_events[name].append((steps, count - last[name]))
                last[name] = count
        return {}

    train(config, monitor=monitor, monitor_every=1)
    for name in ("train", "target"):  # SB3's learn ends its last rollout past the total
        sb3_events[name] = [e for e in sb3_events[name] if e[0] <= config.total_steps]
    assert native_events["train"] == sb3_events["train"]
    assert native_events["target"] == sb3_events["target"]
    assert len(native_events["target"]) == config.total_steps // 7


def _copy_twin(qf: list[torch.nn.Module], twin: torch.nn.Module) -> None:
    """SB3's separate critics (qf0, qf1) into the batched TwinQ (weights (n, in, out))."""
    with torch.no_grad():
        for k, critic in enumerate(qf):
            for layer, linear in enumerate(_linears(critic)):
                twin.weights[layer][k].copy_(linear.weight.t())
                twin.biases[layer][k, 0].copy_(linear.bias)


def _assert_twin(qf: list[torch.nn.Module], twin: torch.nn.Module, **tol) -> None:
    for k, critic in enumerate(qf):
        for layer, linear in enumerate(_linears(critic)):
            assert_close(twin.weights[layer][k], linear.weight.t(), **tol)
            assert_close(twin.biases[layer][k, 0], linear.bias, **tol)


def _continuous_pair(algo: str, **overrides):
    """MountainCarContinuous-v0: actions in [-1, 1], so the native agents' actions in the
    environment's units are SB3's normalised actions."""
    _, model, agent = _pair(algo, "MountainCarContinuous-v0", **overrides)
    _copy_linears(model.actor, agent.actor)
    _copy_twin(model.critic.q_networks, agent.critic)
    _copy_twin(model.critic_target.q_networks, agent.networks["critic_target"])
    if algo in ("td3", "ddpg"):
        _copy_linears(model.actor_target, agent.networks["actor_target"])
    return model, agent


def _train_both(model, agent, steps: int, seed: int) -> None:
    batches = [_batch(model, 32, seed + i) for i in range(steps)]
    feed = iter(sb3 for _, sb3 in batches)
    model.replay_buffer.sample = lambda *args, **kwargs: next(feed)
    torch.manual_seed(seed)  # SB3 and the native agent draw their noise in the same order
    model.train(gradient_steps=steps, batch_size=32)
    torch.manual_seed(seed)
    for native, _ in batches:
        agent.train_step(native)


def test_sac_gradient_steps_match_sb3_on_identical_batches():
    """Critic, actor, temperature and target: SAC's whole gradient step, in SB3's order with
    the same noise. SB3 adds 1e-6 inside log(1 - tanh^2) and rlweights uses the exact form:
    the one difference, set to 0 here so that the rest is compared tightly."""
    model, agent = _continuous_pair(
        "sac", learning_rate=3e-3, target_update="polyak:0.1", ent_coef=None, use_sde=False
    )
    assert model.actor.action_dist.epsilon == 1e-6
    model.actor.action_dist.epsilon = 0.0
    _train_both(model, agent, steps=10, seed=0)
    tol = TOL
    for s, t in zip(_linears(model.actor), _linears(agent.actor), strict=True):
        assert_close(t.weight, s.weight, **tol)
    _assert_twin([model.critic.qf0, model.critic.qf1], agent.critic, **tol)
    _assert_twin(
        [model.critic_target.qf0, model.critic_target.qf1], agent.networks["critic_target"], **tol
    )
    assert_close(agent.log_alpha.detach(), model.log_ent_coef.detach(), **tol)


def test_tqc_gradient_steps_match_sb3_contrib_on_identical_batches():
    """sb3-contrib's TQC: 3 critics of 5 quantiles, 2 of each dropped from the target. Its
    critic loss, actor loss (the mean quantile), temperature and target update, in its order
    with the same noise (its log-probability's epsilon set to 0, as for SAC above)."""
    pytest.importorskip("sb3_contrib")
    model, agent = _continuous_pair(
        "tqc",
        learning_rate=3e-3,
        target_update="polyak:0.1",
        ent_coef=None,
        use_sde=False,
        n_critics=3,
        n_quantiles=5,
        top_quantiles_to_drop_per_net=2,
    )
    assert type(model).__name__ == "TQC" and model.critic.quantiles_total == 15
    model.actor.action_dist.epsilon = 0.0
    _train_both(model, agent, steps=10, seed=0)
    for s, t in zip(_linears(model.actor), _linears(agent.actor), strict=True):
        assert_close(t.weight, s.weight, **TOL)
    _assert_twin(model.critic.q_networks, agent.critic, **TOL)
    _assert_twin(model.critic_target.q_networks, agent.networks["critic_target"], **TOL)
    assert_close(agent.log_alpha.detach(), model.log_ent_coef.detach(), **TOL)


def test_quantile_huber_loss_is_the_hand_written_one():
    """Against the loss written out in float64, one pair at a time."""
    from rlweights.agents.tqc import quantile_huber_loss

    gen = torch.Generator().manual_seed(0)
    quantiles = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64) * 2
    targets = torch.randn(3, 5, generator=gen, dtype=torch.float64) * 2
    total = 0.0
    for c in range(2):
        for b in range(3):
            for i in range(4):
                tau = (i + 0.5) / 4
                for j in range(5):
                    d = float(targets[b, j] - quantiles[c, b, i])
                    huber = 0.5 * d * d if abs(d) <= 1 else abs(d) - 0.5
                    total += abs(tau - (1.0 if d < 0 else 0.0)) * huber
    assert quantile_huber_loss(quantiles, targets).item() == pytest.approx(total / 120, rel=1e-12)


def test_sac_log_probabilities_are_sb3s_whatever_the_action_bounds():
    """Pendulum-v1's actions lie in [-2, 2]: the native actor's actions are SB3's normalised
    ones scaled to the bounds, and its log-probabilities are SB3's (those of the action in
    [-1, 1]), so the tuned temperature chases the same target entropy."""
    _, model, agent = _pair("sac", "Pendulum-v1")
    assert agent.actor.scale.item() == 2.0
    _copy_linears(model.actor, agent.actor)
    model.actor.action_dist.epsilon = 0.0  # SB3's 1e-6 inside log(1 - tanh^2), as above
    obs = torch.randn(256, 3, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    sb3_actions, sb3_log_prob = model.actor.action_log_prob(obs)
    torch.manual_seed(1)
    actions, log_prob = agent.actor(obs)
    assert_close(actions, 2 * sb3_actions, **TOL)
    assert_close(log_prob, sb3_log_prob, rtol=1e-4, atol=1e-4)


def test_td3_gradient_steps_match_sb3_on_identical_batches():
    """Critic steps, the delayed actor step and both targets (target smoothing noise off,
    the one random part of TD3's step). SB3's critic loss is the sum over the two critics,
    rlweights' the mean: Adam takes the same steps."""
    model, agent = _continuous_pair(
        "td3", learning_rate=3e-3, target_update="polyak:0.1", target_policy_noise=0.0
    )
    _train_both(model, agent, steps=10, seed=0)
    for s, t in zip(_linears(model.actor), _linears(agent.actor), strict=True):
        assert_close(t.weight, s.weight, **TOL)
    for s, t in zip(
        _linears(model.actor_target), _linears(agent.networks["actor_target"]), strict=True
    ):
        assert_close(t.weight, s.weight, **TOL)
    _assert_twin([model.critic.qf0, model.critic.qf1], agent.critic, rtol=1e-4, atol=1e-5)
    _assert_twin(
        [model.critic_target.qf0, model.critic_target.qf1],
        agent.networks["critic_target"],
        rtol=1e-4,
        atol=1e-5,
    )


def test_ddpg_gradient_steps_match_sb3_on_identical_batches():
    """SB3's DDPG (its TD3 with one critic, policy_delay 1 and target noise clipped to 0):
    the critic's step, the actor's step and both targets after every gradient step."""
    model, agent = _continuous_pair("ddpg", learning_rate=3e-3, target_update="polyak:0.1")
    assert len(model.critic.q_networks) == len(agent.critic.weights[0]) == 1
    _train_both(model, agent, steps=10, seed=0)
    for ours, theirs in (("actor", model.actor), ("actor_target", model.actor_target)):
        for s, t in zip(_linears(theirs), _linears(agent.networks[ours]), strict=True):
            assert_close(t.weight, s.weight, **TOL)
            assert_close(t.bias, s.bias, **TOL)
    _assert_twin(model.critic.q_networks, agent.critic, **TOL)
    _assert_twin(model.critic_target.q_networks, agent.networks["critic_target"], **TOL)
    assert agent.gradient_updates == 10 and int(agent.target_routine.updates) == 10


def _one_matrix_per_draw(model) -> None:
    """SB3's gSDE draws two noise matrices each time: the one that single-environment acting and
    the gradient steps use, then one per environment for acting in several. The native agent
    draws only what it uses; here SB3 draws the first alone (its own distribution code), so that
    both take the same numbers from the seeded generator."""
    from torch.distributions import Normal

    dist = model.actor.action_dist

    def sample_weights(log_std: torch.Tensor, batch_size: int = 1) -> None:
        std = dist.get_std(log_std)
        dist.weights_dist = Normal(torch.zeros_like(std), std)
        dist.exploration_mat = dist.weights_dist.rsample()
        dist.exploration_matrices = dist.exploration_mat.unsqueeze(0)

    dist.sample_weights = sample_weights


def test_sac_with_gsde_gradient_steps_match_sb3_on_identical_batches():
    """gSDE (SB3's use_sde, the zoo's MountainCarContinuous preset): the clipped mean, the
    state-dependent noise and its log-probability, the gradient reaching log_std through the
    noise matrix and the variance, with the tuned temperature. SB3's tanh correction adds 1e-6
    inside the log (rlweights uses the exact form): set to 0 here, as in the test above."""
    model, agent = _continuous_pair(
        "sac", learning_rate=3e-3, target_update="polyak:0.1", ent_coef=None
    )
    assert model.use_sde and agent.config.use_sde and agent.config.log_std_init == -3.67
    with torch.no_grad():
        agent.actor.log_std.copy_(model.actor.log_std)
    model.actor.action_dist.bijector.epsilon = 0.0
    _one_matrix_per_draw(model)
    _train_both(model, agent, steps=10, seed=0)
    for s, t in zip(_linears(model.actor), _linears(agent.actor), strict=True):
        assert_close(t.weight, s.weight, **TOL)
        assert_close(t.bias, s.bias, **TOL)
    assert_close(agent.actor.log_std, model.actor.log_std, **TOL)
    assert not torch.equal(agent.actor.log_std, torch.full_like(agent.actor.log_std, -3.67))
    _assert_twin([model.critic.qf0, model.critic.qf1], agent.critic, **TOL)
    assert_close(agent.log_alpha.detach(), model.log_ent_coef.detach(), **TOL)


@pytest.mark.parametrize("sde_sample_freq", [-1, 5])
def test_gsde_noise_matrices_are_drawn_at_sb3s_steps(sde_sample_freq):
    """On the same environment steps, the native agent draws its acting noise matrices at the
    steps where SB3 draws them: the start of each rollout of train_freq steps, and every
    sde_sample_freq steps within one."""
    from stable_baselines3 import SAC
    from stable_baselines3.common.env_util import make_vec_env

    from rlweights.agents.sb3_train import sb3_kwargs
    from rlweights.agents.train import train

    overrides = {"total_steps": 200, "learning_starts": 30, "train_freq": 16}
    overrides |= {"gradient_steps": 1, "hidden": (8,), "batch_size": 8, "eval_every": 0}
    overrides |= {"eval_episodes": 1, "sde_sample_freq": sde_sample_freq}
    config = make_config("sac", "MountainCarContinuous-v0", **overrides)
    env = make_vec_env("MountainCarContinuous-v0", n_envs=1, seed=0)
    model = SAC("MlpPolicy", env, **sb3_kwargs(config))
    model.set_logger(configure(None, []))
    sb3_draws: list[int] = []
    acting = model.actor.reset_noise

    def spy(batch_size: int = 1) -> None:
        # the draws for acting (a gradient step's draw also has batch size 1: tell them apart
        # by the caller's state: SB3 trains only between rollouts, past learning_starts)
        sb3_draws.append(model.num_timesteps)
        acting(batch_size)

    model.actor.reset_noise = spy
    original_train = model.train

    def train_spy(gradient_steps: int, batch_size: int) -> None:
        model.actor.reset_noise = acting  # the gradient steps' draws are not acting's
        original_train(gradient_steps, batch_size)
        model.actor.reset_noise = spy

    model.train = train_spy
    model.learn(config.total_steps)
    # the steps that act with the policy (SB3 also draws before learning_starts, and twice at
    # a rollout's start when both rules fire: the second matrix replaces the first)
    sb3_draws = sorted({s for s in sb3_draws if config.learning_starts < s < config.total_steps})

    native_draws: list[int] = []
    from rlweights.agents.sac import StateDependentActor

    original = StateDependentActor.reset_noise
    steps_now = {"steps": 0}

    def native_spy(self, n: int) -> None:
        native_draws.append(steps_now["steps"])
        original(self, n)

    def monitor(steps, agent):
        steps_now["steps"] = steps
        return {}

    StateDependentActor.reset_noise = native_spy
    try:
        train(config, monitor=monitor, monitor_every=1)
    finally:
        StateDependentActor.reset_noise = original
    # the native agent draws at its first action (SB3 uses the matrix of the rollout's start)
    assert native_draws[0] == config.learning_starts
    assert native_draws[1:] == sb3_draws
    assert len(native_draws) > (config.total_steps - config.learning_starts) // 16


@pytest.mark.parametrize("algo", ["td3", "ddpg"])
def test_whole_runs_in_lockstep_take_sb3s_actions_until_the_first_actor_step(algo):
    """The native loop and SB3's ``learn``, from identical weights with SB3's draws
    (rlweights.bench.lockstep): the warm-up's random actions with SB3's action noise added
    and clipped, the environment steps, the steps at which training starts and the actor
    steps, the stored transitions, all SB3's, up to rounding; once the actor has stepped,
    rounding grows as it does between two native runs one ulp apart."""
    from rlweights.bench.lockstep import lockstep

    config = make_config(
        algo, "MountainCarContinuous-v0", hidden=(16, 16), batch_size=32, learning_starts=60
    )
    result = lockstep(config, 90)
    assert result["gradient_updates"]["native"] == result["gradient_updates"]["sb3"] == 30
    actions = result["max_difference_per_step"]["actions"]
    first_actor_step = 61 if algo == "td3" else 60  # TD3: at its second gradient step
    assert max(actions[: first_actor_step + 1]) < 1e-6
    assert max(result["max_difference_per_step"]["obs"][: first_actor_step + 2]) < 1e-6
    assert max(result["max_difference_per_step"]["rewards"][: first_actor_step + 1]) < 1e-6
