"""Presets per environment (issue 14): chosen by --env, overridden by flags, the same for
--impl sb3, and a line at the start of a run that says what was used."""

from __future__ import annotations

import gymnasium as gym
import pytest

from rlweights.agents.environments import route_mujoco_warnings
from rlweights.agents.presets import PRESETS
from rlweights.agents.registry import ALGOS, make_config
from rlweights.agents.sb3_train import sb3_kwargs
from rlweights.cli import main


def _installed(env_id: str) -> bool:
    try:
        gym.make(env_id).close()
    except (gym.error.Error, ImportError):
        return False
    return True


@pytest.mark.parametrize(("algo", "env_id"), sorted(PRESETS))
def test_every_preset_is_a_valid_config_for_its_environment(algo, env_id):
    config = make_config(algo, env_id)
    for field, value in PRESETS[(algo, env_id)].items():
        assert getattr(config, field) == value, field
    if not _installed(env_id):
        pytest.skip(f"{env_id} is not installed here (gymnasium[box2d])")
    route_mujoco_warnings(env_id)  # no MUJOCO_LOG.TXT in the working directory
    env = gym.make(env_id)
    ALGOS[algo][1].check_spaces(env_id, env.observation_space, env.action_space)
    env.close()


def test_flags_override_the_preset_and_sb3_gets_the_same_settings():
    config = make_config("dqn", "MountainCar-v0", learning_rate=1e-3)
    assert config.learning_rate == 1e-3 and config.gamma == 0.98 and config.total_steps == 120_000
    kwargs = sb3_kwargs(config)
    assert kwargs["learning_rate"] == 1e-3 and kwargs["gamma"] == 0.98
    assert kwargs["target_update_interval"] == 600 and kwargs["gradient_steps"] == 8
    sac = make_config("sac", "MountainCarContinuous-v0")
    assert sac.ent_coef == 0.1 and sb3_kwargs(sac)["ent_coef"] == 0.1
    assert "ent_coef" not in sb3_kwargs(make_config("sac", "Pendulum-v1"))  # SB3's "auto"
    sde = make_config("sac", "MountainCarContinuous-v0")  # the zoo explores with gSDE there
    assert (sde.use_sde, sde.log_std_init, sde.sde_sample_freq) == (True, -3.67, -1)
    kwargs = sb3_kwargs(sde)
    assert kwargs["use_sde"] and kwargs["policy_kwargs"]["log_std_init"] == -3.67
    assert make_config("sac", "BipedalWalker-v3").use_sde
    assert not sb3_kwargs(make_config("sac", "Pendulum-v1")).get("use_sde", False)
    td3 = make_config("td3", "HalfCheetah-v5")
    assert (td3.gamma, td3.hidden, td3.learning_starts) == (0.99, (400, 300), 10_000)


def test_ddpg_takes_the_zoos_td3_settings_and_sb3s_ddpg_gets_no_td3_argument():
    """rl-baselines3-zoo sets DDPG as it sets TD3 on these environments; SB3's DDPG fixes
    TD3's delay and target smoothing itself, so none of them is passed to it."""
    for env_id in ("Pendulum-v1", "MountainCarContinuous-v0", "HalfCheetah-v5"):
        ddpg, td3 = make_config("ddpg", env_id), make_config("td3", env_id)
        for field in ("total_steps", "gamma", "buffer_size", "learning_starts", "hidden"):
            assert getattr(ddpg, field) == getattr(td3, field), (env_id, field)
        assert ddpg.learning_rate == td3.learning_rate == 1e-3
        assert ddpg.exploration_noise == td3.exploration_noise
    kwargs = sb3_kwargs(make_config("ddpg", "Pendulum-v1"))
    assert not {"policy_delay", "target_policy_noise", "target_noise_clip"} & set(kwargs)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--algo", "dqn", "--env", "rlweights/Chain-v0"],
            "rlweights train: no preset for dqn on rlweights/Chain-v0: dqn's defaults "
            "(rl-baselines3-zoo's for CartPole-v1) are used",
        ),
        (
            ["--algo", "dqn", "--env", "Acrobot-v1"],
            "rlweights train: rl-baselines3-zoo's preset for dqn on Acrobot-v1",
        ),
    ],
)
def test_a_run_says_which_hyperparameters_it_starts_from(tmp_path, capsys, args, line):
    flags = ["--steps", "60", "--hidden", "8", "--eval-episodes", "1", "--no-progress"]
    assert main(["train", *args, *flags, "--logdir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[1] == line


def test_a_fixed_sac_temperature_stays_fixed(tmp_path):
    from rlweights.agents.train import train

    config = make_config(
        "sac",
        "Pendulum-v1",
        ent_coef=0.05,
        total_steps=120,
        learning_starts=50,
        hidden=(8,),
        eval_every=0,
        eval_episodes=1,
        batch_size=16,
    )
    agent, _ = train(config)
    assert float(agent.alpha()) == pytest.approx(0.05)  # float32
    assert float(agent.log_alpha) == 0.0  # never stepped


@pytest.mark.parametrize(("algo", "impl"), [("sac", "native"), ("td3", "native"), ("sac", "sb3")])
def test_a_few_hundred_mujoco_steps_through_the_command(tmp_path, monkeypatch, algo, impl):
    """HalfCheetah-v5 runs with its preset (the mujoco extra, in dev), and MuJoCo's warnings
    (Gymnasium's models use an attribute MuJoCo 4 deprecates) leave no MUJOCO_LOG.TXT behind in
    the working directory."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    flags = ["--steps", "300", "--learning-starts", "100", "--hidden", "32,32", "--impl", impl]
    flags += ["--eval-episodes", "1", "--no-progress", "--logdir", str(tmp_path / "runs")]
    assert main(["train", "--algo", algo, "--env", "HalfCheetah-v5", *flags]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "summary.json").is_file()
    assert list(work.iterdir()) == []


def test_a_missing_box2d_names_the_extra(tmp_path, capsys, monkeypatch):
    def make(env_id, **kwargs):
        raise gym.error.DependencyNotInstalled(
            "Box2D is not installed, you can install it by run `pip install swig` followed by "
            '`pip install "gymnasium[box2d]"`'
        )

    monkeypatch.setattr(gym, "make", make)
    args = ["train", "--algo", "dqn", "--env", "LunarLander-v3", "--logdir", str(tmp_path)]
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        "rlweights train: error: environment 'LunarLander-v3': it needs the 'box2d' extra: "
        "pip install 'rlweights[box2d]'"
    )
    assert list(tmp_path.iterdir()) == []
