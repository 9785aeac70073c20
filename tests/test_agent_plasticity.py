"""The agents' --reset-every, --shrink-perturb and --unit-sphere, and SB3's PlasticityCallback
(issue 16), against the layers' own reset_parameters() and the float64 formula."""

from __future__ import annotations

import copy

import gymnasium as gym
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.testing import assert_close

from rlweights.agents.networks import TwinQ
from rlweights.agents.registry import ALGOS, make_config
from rlweights.agents.train import train


def _agent(algo: str, env_id: str, **overrides):
    config = make_config(algo, env_id, **overrides)
    env = gym.make(env_id)
    torch.manual_seed(0)
    agent = ALGOS[algo][1](config, env.observation_space, env.action_space)
    env.close()
    return agent


def _batch(obs_dim: int, actions: torch.Tensor, n: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "obs": torch.randn(n, obs_dim, generator=g),
        "actions": actions,
        "rewards": torch.randn(n, generator=g),
        "next_obs": torch.randn(n, obs_dim, generator=g),
        "terminated": torch.zeros(n),
    }


def _reference_reset(module: nn.Module, seed: int) -> None:
    """What a reset of every layer promises: after torch.manual_seed(seed), reset_parameters()
    of each layer in module order (the agents' and SB3's networks are made of nn.Linear layers
    and the batched twin critic)."""
    torch.manual_seed(seed)
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, TwinQ)):
            sub.reset_parameters()


def test_a_reset_redraws_the_layers_their_targets_follow_and_their_adam_state_restarts():
    agent = _agent("sac", "Pendulum-v1", reset_every=5, reset_layers="critic.*")
    agent.train_step(_batch(3, torch.rand(32, 1) * 4 - 2))
    actor_state = {
        k: v.clone()
        for k, v in agent.optimizers["actor"].state[agent.actor.trunk[0].weight].items()
    }
    reference = copy.deepcopy(agent.critic)
    assert agent.plasticity_step(4) == {}  # not due yet
    torch.manual_seed(3)
    fired = agent.plasticity_step(1)
    assert fired == {"reset": [f"critic.{n}" for n, _ in agent.critic.named_parameters()]}
    _reference_reset(reference, 3)
    for (name, p), q, t in zip(
        agent.critic.named_parameters(),
        reference.parameters(),
        agent.critic_target.parameters(),
        strict=True,
    ):
        assert torch.equal(p, q), name
        assert torch.equal(t, p), name  # the target starts again with it
        assert p not in agent.optimizers["critic"].state
    for key, value in actor_state.items():  # the actor was not touched
        assert torch.equal(agent.optimizers["actor"].state[agent.actor.trunk[0].weight][key], value)
    agent.train_step(_batch(3, torch.rand(32, 1) * 4 - 2))  # training goes on
    assert agent.optimizers["critic"].state[agent.critic.weights[0]]["step"] == 1
    assert agent.routines()["reset_routine"].state_dict()["updates"] == 1


@pytest.mark.parametrize("compile", [False, True])
def test_a_reset_policy_restarts_its_ema(compile):
    agent = _agent(
        "sac",
        "Pendulum-v1",
        reset_every=5,
        reset_layers="actor.*",
        policy_ema=0.01,
        compile=compile,
    )
    for _ in range(2):
        agent.train_step(_batch(3, torch.rand(32, 1) * 4 - 2))
    ema = agent.networks["actor_ema"]
    pairs = list(zip(ema.parameters(), agent.actor.parameters(), strict=True))
    assert not all(torch.equal(e, p) for e, p in pairs)  # it has averaged
    critic_target = [t.clone() for t in agent.critic_target.parameters()]
    assert set(agent.plasticity_step(5)) == {"reset"}
    for e, p in zip(ema.parameters(), agent.actor.parameters(), strict=True):
        assert torch.equal(e, p)  # the average starts again from the reset policy
    for t, before in zip(agent.critic_target.parameters(), critic_target, strict=True):
        assert torch.equal(t, before)  # the critic was not reset: its target stays
    agent.train_step(_batch(3, torch.rand(32, 1) * 4 - 2))  # and averages on from there
    assert not all(torch.equal(e, p) for e, p in pairs)


@pytest.mark.parametrize("average_every", [0, 100])
def test_parallel_learners_draw_the_same_fresh_weights(average_every):
    """Learners seed their global RNGs by rank; with --average-every their resets draw from
    one generator seeded alike, so every learner resets to the same weights (the average of
    two initialisations would mean nothing). A single run draws from the global RNG."""
    learners = [
        _agent("sac", "Pendulum-v1", reset_every=5, average_every=average_every) for _ in range(2)
    ]
    for rank, agent in enumerate(learners):
        torch.manual_seed(1000 + rank)  # each learner's own global RNG
        assert set(agent.plasticity_step(5)) == {"reset"}
    same = [
        torch.equal(p, q)
        for p, q in zip(
            learners[0].critic.parameters(), learners[1].critic.parameters(), strict=True
        )
    ]
    assert all(same) if average_every else not any(same)


def test_shrink_perturb_of_dqn_is_the_formula_in_float64():
    agent = _agent("dqn", "CartPole-v1", shrink_perturb=(0.7, 0.3), sp_every=10)
    theta = {n: p.detach().double().clone() for n, p in agent.q.named_parameters()}
    fresh = copy.deepcopy(agent.q)
    _reference_reset(fresh, 8)
    torch.manual_seed(8)
    assert set(agent.plasticity_step(10)) == {"shrink_perturb"}
    for (name, p), f in zip(agent.q.named_parameters(), fresh.parameters(), strict=True):
        assert_close(p.double(), 0.7 * theta[name] + 0.3 * f.double(), rtol=1e-6, atol=1e-7)
    for p, t in zip(agent.q.parameters(), agent.networks["q_target"].parameters(), strict=True):
        assert torch.equal(p, t)


def test_unit_sphere_projects_the_named_weights_after_every_optimizer_step():
    agent = _agent("sac", "Pendulum-v1", unit_sphere="critic.weights.0,actor.trunk.0.weight")
    agent.train_step(_batch(3, torch.rand(32, 1) * 4 - 2))

    def unit_norms(matrix):  # (outputs, inputs): one norm per output unit
        return torch.linalg.vector_norm(matrix.detach().double(), dim=1)

    for i in range(2):  # each of the twin critics' first layers, stored (inputs, outputs)
        norms = unit_norms(agent.critic.weights[0][i].t())
        assert_close(norms, torch.ones_like(norms), rtol=1e-6, atol=1e-6)
    norms = unit_norms(agent.actor.trunk[0].weight)
    assert_close(norms, torch.ones_like(norms), rtol=1e-6, atol=1e-6)
    assert (unit_norms(agent.actor.mean.weight) - 1).abs().max() > 0.1  # not named: free
    assert (unit_norms(agent.critic.weights[1][0].t()) - 1).abs().max() > 0.1


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"reset_every": 10, "reset_layers": "encoder.*"}, "matches no tensor"),
        ({"unit_sphere": "critic.biases.*"}, "selects no weight matrix"),
        ({"shrink_perturb": (0.5, 0.5)}, "sp_every"),
        ({"shrink_perturb": (1.5, 0.5), "sp_every": 10}, "shrink_perturb"),
    ],
)
def test_bad_plasticity_settings_are_refused_before_training(overrides, match):
    with pytest.raises(ValueError, match=match):
        _agent("sac", "Pendulum-v1", **overrides)


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_a_run_logs_its_resets_and_the_drift_chart_restarts_from_them(tmp_path):
    config = make_config(
        "sac",
        "Pendulum-v1",
        total_steps=600,
        learning_starts=50,
        reset_every=300,
        reset_layers="critic.*",
        drift_every=100,
        eval_every=0,
        eval_episodes=1,
    )
    train(config, run_dir=tmp_path / "run")
    scalars = _scalars(tmp_path / "run")
    # due at 300 and 600; none at the last step, after which nothing would train
    assert [step for step, _ in scalars["plasticity/reset"]] == [300]
    init = dict(scalars["drift/critic/init_distance"])
    # at step 300 the critic was re-drawn before its gradient step: one step away from it
    assert init[300] < 0.2 * init[200]
    assert init[400] > init[300]
    actor = dict(scalars["drift/actor/init_distance"])
    assert actor[300] > actor[200]  # the actor was not reset


def test_sb3_plasticity_callback_resets_syncs_targets_and_projects(tmp_path):
    from stable_baselines3 import SAC

    from rlweights.sb3 import PlasticityCallback

    model = SAC(
        "MlpPolicy", "Pendulum-v1", learning_starts=50, seed=0, policy_kwargs={"net_arch": [32, 32]}
    )
    sphere = PlasticityCallback(unit_sphere="critic.qf0.0.weight")
    model.learn(120, callback=sphere)
    norms = torch.linalg.vector_norm(model.policy.critic.qf0[0].weight.detach().double(), dim=1)
    assert_close(norms, torch.ones_like(norms), rtol=1e-6, atol=1e-6)
    assert sphere._handles == []  # removed when training ended

    callback = PlasticityCallback(reset_every=200, reset_layers="critic.*")
    model._total_timesteps = 1000  # as learn(1000) sets it: step 200 is not the last
    callback.init_callback(model)
    callback.on_training_start({}, {})
    reference = copy.deepcopy(model.policy.critic)
    model.num_timesteps = 199
    callback.on_step()
    assert callback.events["reset"] == 0
    model.num_timesteps = 200
    torch.manual_seed(6)
    callback.on_step()
    assert callback.events["reset"] == 1
    _reference_reset(reference, 6)
    critic_params = list(model.policy.critic.parameters())
    for p, q, t in zip(
        critic_params, reference.parameters(), model.policy.critic_target.parameters(), strict=True
    ):
        assert torch.equal(p, q) and torch.equal(t, p)
    assert not any(p in model.policy.critic.optimizer.state for p in critic_params)
    assert all(p in model.policy.actor.optimizer.state for p in model.policy.actor.parameters())


def test_sb3_runs_of_the_command_take_the_plasticity_flags(tmp_path):
    config = make_config(
        "sac",
        "Pendulum-v1",
        total_steps=300,
        learning_starts=50,
        reset_every=100,
        drift_every=0,
        eval_every=0,
        eval_episodes=1,
        hidden=(32, 32),
    )
    from rlweights.agents.sb3_train import train_sb3

    train_sb3(config, run_dir=tmp_path / "run")
    scalars = _scalars(tmp_path / "run")
    assert scalars["rlweights/resets"][-1][1] == 2  # at 100 and 200, not at the last step


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--reset-every", "100", "--reset-layers", "nope.*"], "matches no tensor"),
        (
            ["--impl", "sb3", "--reset-every", "100", "--reset-layers", "critic.weights.*"],
            "actor.mu",
        ),
        (["--shrink-perturb", "0.5,0.5"], "--sp-every N"),
        (["--shrink-perturb", "0.5"], "expected two numbers"),
        (["--unit-sphere", "critic.biases.*"], "selects no weight matrix"),
    ],
)
def test_bad_plasticity_flags_stop_the_command_before_it_writes(
    tmp_path, monkeypatch, capsys, flags, says
):
    from rlweights.cli import main

    monkeypatch.chdir(tmp_path)
    try:
        code = main(["train", "--steps", "200", "--logdir", "runs", *flags])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_sb3_plasticity_callback_reused_after_load_touches_only_the_loaded_model(tmp_path):
    from stable_baselines3 import SAC

    from rlweights.sb3 import PlasticityCallback

    model = SAC(
        "MlpPolicy", "Pendulum-v1", learning_starts=50, seed=0, policy_kwargs={"net_arch": [8]}
    )
    callback = PlasticityCallback(
        reset_every=100, reset_layers="critic.*", unit_sphere="actor.mu.weight"
    )
    model.learn(60, callback=callback)
    model.save(tmp_path / "sac")
    loaded = SAC.load(tmp_path / "sac", env=model.get_env())
    before = copy.deepcopy(model.policy.state_dict())
    reference = copy.deepcopy(loaded.policy.critic)
    # learn(1000, reset_num_timesteps=False) with the same callback, stepped by hand
    loaded._total_timesteps = 1000
    callback.init_callback(loaded)
    callback.on_training_start({}, {})
    loaded.num_timesteps = 100
    torch.manual_seed(3)
    callback.on_step()
    assert callback.events["reset"] == 1
    _reference_reset(reference, 3)
    for p, q in zip(loaded.policy.critic.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
    for name, value in model.policy.state_dict().items():  # the first model: untouched
        assert torch.equal(value, before[name]), name
    callback.on_training_end()


def test_sb3_plasticity_callback_resets_the_state_independent_log_std_to_its_init():
    from stable_baselines3 import PPO, SAC

    from rlweights.sb3 import PlasticityCallback

    model = SAC(
        "MlpPolicy",
        "Pendulum-v1",
        use_sde=True,
        learning_starts=50,
        seed=0,
        policy_kwargs={"net_arch": [8], "log_std_init": -2.0},
    )
    model.learn(60)  # Adam has state for every parameter
    callback = PlasticityCallback(reset_every=100)  # every parameter of the trained networks
    model._total_timesteps = 1000
    callback.init_callback(model)
    callback.on_training_start({}, {})
    layers = {  # the trained networks' layers, in module order (the targets come last)
        name: copy.deepcopy(m)
        for name, m in model.policy.named_modules()
        if isinstance(m, nn.Linear) and not name.startswith("critic_target")
    }
    model.num_timesteps = 100
    torch.manual_seed(4)
    callback.on_step()
    torch.manual_seed(4)  # log_std is drawn by no layer: the same stream
    for name, layer in layers.items():
        layer.reset_parameters()
        for key, p in layer.named_parameters():
            assert torch.equal(model.policy.get_parameter(f"{name}.{key}"), p), name
    log_std = model.policy.actor.log_std
    assert torch.equal(log_std, torch.full_like(log_std, -2.0))
    assert log_std not in model.policy.actor.optimizer.state

    ppo = PPO(
        "MlpPolicy", "Pendulum-v1", n_steps=32, batch_size=16, policy_kwargs={"net_arch": [8]}
    )
    with torch.no_grad():
        ppo.policy.log_std.fill_(0.8)
    callback = PlasticityCallback(shrink_perturb=(0.5, 0.25), sp_every=10, reset_layers="log_std")
    ppo._total_timesteps = 1000
    callback.init_callback(ppo)
    callback.on_training_start({}, {})
    ppo.num_timesteps = 10
    callback.on_step()
    # shrink * log_std + perturb * log_std_init (SB3's PPO: 0.0)
    assert torch.equal(ppo.policy.log_std, torch.full_like(ppo.policy.log_std, 0.4))
    assert callback.events["shrink_perturb"] == 1


def test_sb3_runs_of_the_command_reset_gsde_presets():
    from rlweights.agents.sb3_train import check_plasticity

    config = make_config("sac", "MountainCarContinuous-v0", reset_every=100, hidden=(8,))
    assert config.use_sde
    check_plasticity(config)  # refused before: log_std has no layer to reset it
