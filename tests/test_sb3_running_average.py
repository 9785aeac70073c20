"""rlweights.sb3.PolicyAveragingCallback against float64 references, SB3's own save/load and
evaluation, and TensorBoard's own reader."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch
from stable_baselines3 import DQN, PPO, SAC, TD3
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv
from test_sb3 import BatchNormExtractor
from torch.testing import assert_close

from rlweights import sb3 as rsb3
from rlweights.flat import layout_of

Callback = rsb3.PolicyAveragingCallback


def _make(cls, **kwargs):
    env = "CartPole-v1" if cls is DQN else "Pendulum-v1"
    defaults = {"seed": 0, "device": "cpu", "policy_kwargs": {"net_arch": [16, 16]}}
    if cls is PPO:
        defaults |= {"n_steps": 64, "batch_size": 32, "n_epochs": 2}
    else:
        defaults |= {"learning_starts": 50}
    if cls is DQN:
        defaults |= {"train_freq": 1, "target_update_interval": 20}
    return cls("MlpPolicy", env, **(defaults | kwargs))


def _acting_optimizer(model):
    """Written out here, independently of the table in rlweights.sb3."""
    return model.actor.optimizer if isinstance(model, (SAC, TD3)) else model.policy.optimizer


def _state64(module):
    return {k: v.detach().to(torch.float64, copy=True) for k, v in module.state_dict().items()}


def _clone(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_equal_states(a, b):
    assert a.keys() == b.keys()
    for name, x in a.items():
        assert torch.equal(x, b[name]), name


def _assert_close_to(module, reference):
    got = module.state_dict()
    assert got.keys() == reference.keys()
    for name, value in got.items():
        assert_close(value.double(), reference[name], rtol=1e-5, atol=1e-6, msg=name)


class Recorder:
    """A step post-hook of its own on the optimizer that trains the acting network: the online
    policy's weights after every one of its steps, in float64."""

    def __init__(self, model):
        self.policy = model.policy
        self.snapshots = []
        self.handle = _acting_optimizer(model).register_step_post_hook(self)

    def __call__(self, optimizer, args, kwargs):
        self.snapshots.append(_state64(self.policy))


EMA_CASES = [
    pytest.param(SAC, {}, 0.05, True, 1, id="SAC-warmup"),
    pytest.param(DQN, {}, 0.1, False, 2, id="DQN-every2"),
    pytest.param(TD3, {"policy_delay": 2}, 0.1, False, 1, id="TD3-delay2"),
    pytest.param(PPO, {}, 0.2, False, 1, id="PPO"),
]


@pytest.mark.parametrize(("cls", "kwargs", "tau", "warmup", "every"), EMA_CASES)
def test_ema_follows_every_step_of_the_acting_optimizer(cls, kwargs, tau, warmup, every):
    model = _make(cls, **kwargs)
    want = _state64(model.policy)  # the average starts from the weights at training start
    recorder = Recorder(model)
    callback = Callback("ema", tau, warmup=warmup, every=every)
    model.learn(128 if cls is PPO else 150, callback=callback)
    model.learn(128 if cls is PPO else 100, callback=callback, reset_num_timesteps=False)
    updates = 0
    for call, now in enumerate(recorder.snapshots, start=1):
        if call % every:
            continue
        step = max(tau, 1 - (1 + updates) / (10 + updates)) if warmup else tau
        want = {k: want[k] + step * (now[k] - want[k]) for k in want}
        updates += 1
    _assert_close_to(callback.averaged, want)

    # One update per step of the acting network: TD3's actor steps every policy_delay-th
    # gradient step, PPO's optimizer once per minibatch of every epoch.
    steps = {TD3: model._n_updates // 2, PPO: 2 * 2 * 2 * 2}.get(cls, model._n_updates)
    assert len(recorder.snapshots) == steps >= 16
    assert callback.averager.updates == updates == steps // every
    online = model.policy.state_dict()
    assert any(not torch.equal(v, online[k]) for k, v in callback.averaged.state_dict().items())
    # The hook is gone when learn() ends: only the recorder's remains.
    assert list(_acting_optimizer(model)._optimizer_step_post_hooks.values()) == [recorder]


def test_swa_is_the_mean_of_the_snapshots_after_start():
    model = _make(DQN)
    recorder = Recorder(model)
    callback = Callback("swa", start=40, every=3)
    model.learn(300, callback=callback)
    kept = [s for c, s in enumerate(recorder.snapshots, start=1) if c > 40 and (c - 40) % 3 == 0]
    assert len(kept) > 50
    want = {k: sum(s[k] for s in kept) / len(kept) for k in kept[0]}
    _assert_close_to(callback.averaged, want)
    assert callback.averager.updates == len(kept)


@pytest.mark.parametrize("attached", [False, True], ids=["plain", "with-attach"])
def test_training_is_bit_identical_with_the_callback(attached):
    """Flattening the policy for the average must not change training, including SB3's copy
    of BatchNorm statistics into the target critic (from lists cached before flattening).
    With attach, the average leaves attach's flat layouts intact (FlatLayoutWarning is an
    error in this test suite)."""
    kwargs = {
        "policy_kwargs": {"net_arch": [16, 16], "features_extractor_class": BatchNormExtractor}
    }
    plain = _make(SAC, **kwargs)
    plain.learn(150)
    model = _make(SAC, **kwargs)
    if attached:
        rsb3.attach(model)
    callback = Callback("ema", 0.05)
    model.learn(150, callback=callback)
    if attached:
        assert layout_of(model.critic) is not None
        assert layout_of(model.critic_target) is not None
    rsb3.detach(model)
    _assert_equal_states(plain.policy.state_dict(), model.policy.state_dict())
    bn = model.critic_target.features_extractor.net[1]
    assert torch.equal(bn.running_mean, model.critic.features_extractor.net[1].running_mean)
    averaged_bn = callback.averaged.critic.features_extractor.net[1]
    assert torch.equal(averaged_bn.running_var, model.critic.features_extractor.net[1].running_var)


@pytest.fixture(scope="module")
def trained():
    model = _make(SAC)
    callback = Callback("ema", 0.05)
    model.learn(200, callback=callback)
    return model, callback


def _optimizers(model):
    return {
        "actor": model.actor.optimizer,
        "critic": model.critic.optimizer,
        "ent_coef": model.ent_coef_optimizer,
    }


def _optimizer_states(model):
    out = {}
    for name, optimizer in _optimizers(model).items():
        for index, state in optimizer.state_dict()["state"].items():
            for key, value in state.items():
                out[f"{name}/{index}/{key}"] = value.clone()
    return out


def test_averaged_copy_is_frozen_and_in_no_optimizer(trained):
    model, callback = trained
    averaged = callback.averaged
    assert type(averaged) is type(model.policy) and not averaged.training
    assert all(not p.requires_grad for p in averaged.parameters())
    trained_ids = {
        id(p) for opt in _optimizers(model).values() for g in opt.param_groups for p in g["params"]
    }
    assert trained_ids.isdisjoint(id(p) for p in averaged.parameters())
    for module in averaged.modules():
        assert not any(isinstance(v, torch.optim.Optimizer) for v in vars(module).values())
    text = repr(callback)
    assert "EMA(SACPolicy, tau=0.05" in text and f"updates={model._n_updates}" in text


def test_save_averaged_loads_as_an_sb3_model_and_leaves_training_untouched(trained, tmp_path):
    model, callback = trained
    weights, optimizer_states = _clone(model.policy), _optimizer_states(model)
    path = callback.save_averaged(tmp_path / "averaged")  # SB3 adds .zip, so do we
    assert path == tmp_path / "averaged.zip" and sorted(tmp_path.iterdir()) == [path]
    _assert_equal_states(_clone(model.policy), weights)
    _assert_equal_states(_optimizer_states(model), optimizer_states)

    loaded = SAC.load(path, device="cpu")
    _assert_equal_states(loaded.policy.state_dict(), callback.averaged.state_dict())
    obs = torch.linspace(-1, 1, 3).numpy()
    action, _ = loaded.predict(obs, deterministic=True)
    assert (action == callback.averaged.predict(obs, deterministic=True)[0]).all()
    assert (action != model.predict(obs, deterministic=True)[0]).all()


def test_failed_save_leaves_no_file_and_the_online_weights(trained, tmp_path, monkeypatch):
    model, callback = trained
    weights = _clone(model.policy)

    def save(file, **kwargs):
        file.write(b"half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save", save)
    with pytest.raises(OSError, match="disk full"):
        callback.save_averaged(tmp_path / "averaged.zip")
    assert list(tmp_path.iterdir()) == []
    _assert_equal_states(_clone(model.policy), weights)


def test_dqn_averaged_model_round_trip(tmp_path):
    model = _make(DQN)
    callback = Callback("swa", start=20)
    model.learn(200, callback=callback)
    path = callback.save_averaged(tmp_path / "dqn_swa.zip")
    loaded = DQN.load(path, device="cpu")
    _assert_equal_states(loaded.policy.state_dict(), callback.averaged.state_dict())
    assert loaded.predict(torch.zeros(4).numpy(), deterministic=True)[0] in (0, 1)


class SaveAtEvaluations(BaseCallback):
    """Runs after the averaging callback at the same calls: saves both models as they were
    when they were evaluated, to evaluate them again independently."""

    def __init__(self, averaging, every, folder):
        super().__init__()
        self.averaging, self.every, self.folder = averaging, every, folder

    def _on_step(self):
        if self.n_calls % self.every == 0:
            self.model.save(self.folder / f"online_{self.num_timesteps}.zip")
            self.averaging.save_averaged(self.folder / f"averaged_{self.num_timesteps}.zip")
        return True


def _reference_mean(path, episodes):
    env = DummyVecEnv([lambda: Monitor(gym.make("Pendulum-v1"))])
    env.seed(7)
    mean, _ = evaluate_policy(SAC.load(path, device="cpu"), env, n_eval_episodes=episodes)
    return mean


def test_evaluations_reach_tensorboard_and_match_saved_models(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs, saved = tmp_path / "runs", tmp_path / "saved"
    saved.mkdir()
    model = _make(SAC, tensorboard_log=str(logs))
    env = Monitor(gym.make("Pendulum-v1"))
    averaging = Callback("ema", 0.05, eval_env=env, eval_freq=100, n_eval_episodes=1, eval_seed=7)
    model.learn(300, callback=CallbackList([averaging, SaveAtEvaluations(averaging, 100, saved)]))

    (run,) = logs.iterdir()  # SB3's own run
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    logged = {}
    for which in ("online", "averaged"):
        read = events.Scalars(f"eval/{which}_mean_reward")
        assert [e.step for e in read] == [100, 200, 300]
        assert [e.step for e in events.Scalars(f"eval/{which}_std_reward")] == [100, 200, 300]
        logged[which] = [e.value for e in read]
    assert [t for t, _, _ in averaging.evaluations] == [100, 200, 300]
    updates = [e.value for e in events.Scalars("rlweights/averaged_updates")]
    # SB3 trains after each one-step rollout past learning_starts=50: before the evaluation
    # at step t, the actor took t - 51 steps, each one update of the average
    assert updates == [t - 51 for t in (100, 200, 300)]
    for i, (steps, online, averaged) in enumerate(averaging.evaluations):
        assert online != averaged  # two different policies were evaluated
        assert logged["online"][i] == pytest.approx(online, rel=1e-6)  # TensorBoard: float32
        assert logged["averaged"][i] == pytest.approx(averaged, rel=1e-6)
        assert online == pytest.approx(_reference_mean(saved / f"online_{steps}.zip", 1))
        assert averaged == pytest.approx(_reference_mean(saved / f"averaged_{steps}.zip", 1))


BAD = [
    ({"average": "mean"}, ValueError, "average='mean' is not one of 'ema', 'swa'"),
    ({"tau": 0.0}, ValueError, r"tau=0.0 is outside \(0, 1\]"),
    ({"tau": 1.5}, ValueError, r"tau=1.5 is outside \(0, 1\]"),
    ({"tau": "0.1"}, ValueError, r"tau must be a float in \(0, 1\], got '0.1'"),
    ({"tau": torch.tensor(0.1)}, ValueError, r"tau must be a float in \(0, 1\], got tensor"),
    ({"average": "swa", "tau": 0.01}, ValueError, "tau=0.01 is the EMA's step"),
    ({"average": "swa", "warmup": True}, ValueError, "warmup is the EMA's"),
    ({"start": 10}, ValueError, "start=10 is SWA's"),
    ({"average": "swa", "start": -1}, ValueError, "start must be an int >= 0, got -1"),
    ({"every": 0}, ValueError, "every must be an int >= 1, got 0"),
    ({"eval_freq": 0}, ValueError, "eval_freq must be an int >= 1, got 0"),
    ({"n_eval_episodes": 2.5}, ValueError, "n_eval_episodes must be an int >= 1, got 2.5"),
    ({"eval_seed": -3}, ValueError, "eval_seed must be an int >= 0"),
    ({"eval_env": 42}, TypeError, "eval_env must be a Gymnasium env, a VecEnv, an env id"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Callback(**kwargs)


def test_eval_env_forms():
    from stable_baselines3.common.vec_env import VecEnv

    by_id = Callback(eval_env="CartPole-v1").eval_env
    assert isinstance(by_id, VecEnv) and by_id.env_is_wrapped(Monitor) == [True]
    env = Monitor(gym.make("CartPole-v1"))
    assert Callback(eval_env=env).eval_env.envs == [env]
    vec = DummyVecEnv([lambda: env])
    assert Callback(eval_env=vec).eval_env is vec
    assert Callback().eval_env is None


def test_unsupported_algorithm_and_unstarted_callback():
    contrib = pytest.importorskip("sb3_contrib")
    model = contrib.TRPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=32, device="cpu")
    callback = Callback()
    with pytest.raises(RuntimeError, match="nothing is averaged yet"):
        _ = callback.averaged
    with pytest.raises(RuntimeError, match="nothing is averaged yet"):
        callback.state_dict()
    with pytest.raises(TypeError, match="does not know which optimizer trains the policy of TRPO"):
        model.learn(64, callback=callback)
    with pytest.raises(ValueError, match=r"evaluate\(\) needs eval_env"):
        callback.evaluate()


def test_state_dict_round_trip(trained):
    model, callback = trained
    state = callback.state_dict()
    resumed = Callback("ema", 0.05)
    resumed.load_state_dict(state)  # before training: kept until the average is made
    assert resumed.state_dict() is state
    other = _make(SAC, seed=3)
    other.learn(0, callback=resumed)
    _assert_equal_states(resumed.averaged.state_dict(), callback.averaged.state_dict())
    assert resumed.averager.updates == callback.averager.updates == model._n_updates

    with pytest.raises(ValueError, match="the state is of average='ema'"):
        Callback("swa").load_state_dict(state)
    with pytest.raises(ValueError, match="expected keys"):
        resumed.load_state_dict({"average": "ema"})
    with pytest.raises(ValueError, match="already averages another model's policy"):
        _make(SAC, seed=4).learn(10, callback=resumed)
