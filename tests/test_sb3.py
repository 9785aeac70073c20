"""The SB3 plug-in against SB3's own implementation: attached runs are bit-identical."""

from __future__ import annotations

import zipfile

import gymnasium as gym
import pytest
import stable_baselines3
import torch
from stable_baselines3 import A2C, DDPG, DQN, PPO, SAC, TD3
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

import rlweights as rw
from rlweights import sb3 as rsb3
from rlweights.sb3 import patching

contrib = pytest.importorskip("sb3_contrib")


def small(**extra):
    """Fresh policy kwargs each time: SB3 writes into the dict it is given."""
    return {"net_arch": [16, 16], **extra}


def _make(cls, env=None, **kwargs):
    env = env or ("CartPole-v1" if cls in (DQN, contrib.QRDQN) else "Pendulum-v1")
    defaults = {"learning_starts": 50, "seed": 0, "device": "cpu", "policy_kwargs": small()}
    if cls in (DQN, contrib.QRDQN):
        defaults |= {"target_update_interval": 20, "train_freq": 2}
    return cls("MlpPolicy", env, **(defaults | kwargs))


def _assert_identical(a, b):
    sa, sb = a.policy.state_dict(), b.policy.state_dict()
    assert sa.keys() == sb.keys()
    for name, x in sa.items():
        assert torch.equal(x, sb[name]), name


def _run(cls, attach, steps=200, **kwargs):
    model = _make(cls, **kwargs)
    handle = rsb3.attach(model) if attach else None
    model.learn(steps)
    if handle is not None:
        handle.detach()
    return model


ALGOS = [
    pytest.param(SAC, {}, id="SAC"),
    pytest.param(TD3, {"gradient_steps": 2, "policy_delay": 2}, id="TD3"),
    pytest.param(DDPG, {}, id="DDPG"),
    pytest.param(DQN, {"n_envs": 2}, id="DQN-2envs"),
    pytest.param(contrib.TQC, {}, id="TQC"),
    pytest.param(contrib.QRDQN, {}, id="QRDQN"),
]


@pytest.mark.parametrize(("cls", "kwargs"), ALGOS)
def test_attached_run_is_bit_identical_to_plain_sb3(cls, kwargs):
    n_envs = kwargs.pop("n_envs", 1)
    if n_envs > 1:
        kwargs["env"] = stable_baselines3.common.env_util.make_vec_env(
            "CartPole-v1", n_envs=n_envs, seed=0
        )
    plain = _run(cls, False, **_fresh(kwargs))
    attached = _run(cls, True, **_fresh(kwargs))
    _assert_identical(plain, attached)
    assert attached._n_updates > 0


def _fresh(kwargs):
    out = dict(kwargs)
    if "env" in out:  # a new vec env for each run, seeded the same
        n = out["env"].num_envs
        out["env"] = stable_baselines3.common.env_util.make_vec_env("CartPole-v1", n_envs=n, seed=0)
    return out


def test_td3_shared_features_extractor_keeps_sb3_behaviour():
    """Shared by actor and critic, the extractor is updated twice per update point, as in
    SB3; it cannot live in two flat buffers, so those modules stay unflattened."""
    kwargs = {
        "policy_kwargs": small(
            features_extractor_class=BatchNormExtractor, share_features_extractor=True
        )
    }
    model = _make(TD3, **kwargs)
    handle = rsb3.attach(model)
    assert handle.flattened == []
    handle.detach()
    _assert_identical(_run(TD3, False, **kwargs), _run(TD3, True, **kwargs))


def test_attach_flattens_and_routes_to_the_fast_path():
    model = _make(SAC)
    rsb3.attach(model)
    handle = rsb3.attach(model)  # attaching twice is harmless
    assert handle.flattened == ["critic", "critic_target"]
    assert rw.ops.pair_plan(model.critic_target, model.critic, "t").flat
    from stable_baselines3.sac import sac

    assert sac.polyak_update is patching.polyak_update
    handle.detach()  # one detach undoes both attaches: the second replaced the first
    assert sac.polyak_update is stable_baselines3.common.utils.polyak_update


def test_tau_changed_at_run_time_and_tau_zero():
    def run(attach):
        model = _make(SAC)
        if attach:
            rsb3.attach(model)
        model.learn(120)
        model.tau = 0.3  # read at every update
        model.learn(80, reset_num_timesteps=False)
        frozen = {k: v.clone() for k, v in model.critic_target.state_dict().items()}
        model.tau = 0.0
        model.learn(80, reset_num_timesteps=False)
        for k, v in model.critic_target.state_dict().items():
            assert torch.equal(v, frozen[k]), k  # tau=0: bit-identical targets
        rsb3.detach(model)
        return model

    _assert_identical(run(False), run(True))


class BatchNormExtractor(BaseFeaturesExtractor):
    def __init__(self, observation_space: gym.Space):
        super().__init__(observation_space, features_dim=8)
        n = observation_space.shape[0]
        self.net = nn.Sequential(nn.Linear(n, 8), nn.BatchNorm1d(8), nn.ReLU())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


def test_batchnorm_statistics_are_copied_with_tau_zero():
    kwargs = {
        "tau": 0.0,
        "policy_kwargs": small(features_extractor_class=BatchNormExtractor),
    }

    def run(attach):
        model = _make(SAC, **kwargs)
        weights0 = {k: v.clone() for k, v in model.critic_target.named_parameters()}
        if attach:
            rsb3.attach(model)
        model.learn(150)
        rsb3.detach(model)
        for k, v in model.critic_target.named_parameters():
            assert torch.equal(v, weights0[k]), k
        bn, bn_target = (
            model.critic.features_extractor.net[1],
            model.critic_target.features_extractor.net[1],
        )
        assert not torch.equal(bn_target.running_mean, torch.zeros(8))
        assert torch.equal(bn_target.running_mean, bn.running_mean)
        assert torch.equal(bn_target.running_var, bn.running_var)
        return model

    _assert_identical(run(False), run(True))


def test_save_load_attach_learn(tmp_path):
    def run(attach):
        model = _make(SAC)
        if attach:
            rsb3.attach(model)
        model.learn(100)
        path = tmp_path / f"sac_{attach}.zip"
        model.save(path)
        with zipfile.ZipFile(path) as z:
            assert all(b"rlweights" not in z.read(n) for n in z.namelist())
        rsb3.detach(model)
        loaded = SAC.load(path, device="cpu")
        if attach:
            rsb3.attach(loaded)
        loaded.set_env(gym.make("Pendulum-v1"))
        loaded.set_random_seed(1)
        loaded.learn(100, reset_num_timesteps=False)
        rsb3.detach(loaded)
        return loaded

    _assert_identical(run(False), run(True))


def test_unattached_model_is_untouched_while_another_is_attached():
    reference = _run(SAC, False)  # nothing attached in this run
    other = _make(SAC, seed=5)
    handle = rsb3.attach(other)
    try:
        during = _run(SAC, False)  # plain model, dispatcher installed
    finally:
        handle.detach()
    _assert_identical(reference, during)


class SpyHardUpdate(rw.HardUpdate):
    """Records, at each step, whether the target changed and whether it equals the source."""

    def step(self):
        before = [t.clone() for t in self.target.parameters()]
        did = super().step()
        changed = any(
            not torch.equal(b, a) for b, a in zip(before, self.target.parameters(), strict=True)
        )
        self.log.append((self.steps, did, changed, rw.distance(self.target, self.source).item()))
        return did


def test_hard_update_every_k_gradient_steps():
    template = SpyHardUpdate(every=3)
    model = _make(SAC)
    handle = rsb3.attach(model, routine=template)
    bound = handle.routines["critic"]
    bound.log = []
    model.learn(120)
    handle.detach()
    assert len(bound.log) == model._n_updates > 10
    for steps, did, changed, distance in bound.log:
        assert did == (steps % 3 == 0)
        assert changed == did  # a copy at every 3rd gradient step, nothing in between
        if did:
            assert distance == 0.0


def test_polyak_routine_and_callable_replace_the_update():
    model = _make(SAC)
    calls = []
    handle = rsb3.attach(model, routine=lambda t, s, tau: calls.append(tau))
    frozen = {k: v.clone() for k, v in model.critic_target.state_dict().items()}
    model.learn(100)
    assert len(calls) == model._n_updates and set(calls) == {model.tau}
    for k, v in model.critic_target.state_dict().items():
        assert torch.equal(v, frozen[k])  # the callable did not update: nothing did
    handle = rsb3.attach(model, routine=rw.PolyakUpdate(tau=1.0))  # attaching again
    model.learn(60, reset_num_timesteps=False)
    assert rw.distance(model.critic_target, model.critic).item() == 0.0
    assert handle.routines["critic"].updates > 0
    handle.detach()


@pytest.mark.parametrize("cls", [PPO, A2C, contrib.CrossQ], ids=["PPO", "A2C", "CrossQ"])
def test_algorithms_without_targets_are_refused(cls):
    env = "Pendulum-v1"
    model = cls("MlpPolicy", env, device="cpu", policy_kwargs={"net_arch": [8]})
    with pytest.raises(ValueError, match=f"{cls.__name__} has no target networks"):
        rsb3.attach(model)


def test_bad_arguments_and_versions(monkeypatch):
    with pytest.raises(TypeError, match="attach takes a Stable-Baselines3 model"):
        rsb3.attach(nn.Linear(2, 2))
    model = _make(SAC)
    with pytest.raises(TypeError, match="routine must be None"):
        rsb3.attach(model, routine=0.005)
    monkeypatch.setattr(stable_baselines3, "__version__", "1.8.0")
    with pytest.raises(RuntimeError, match=r"supports stable-baselines3 2.3 up to .* found 1.8.0"):
        rsb3.attach(model)


def test_weight_constraint_callback_clamps_after_every_gradient_step():
    model = _make(SAC)
    callback = rsb3.WeightConstraintCallback(("actor", "critic"), clamp=(-0.05, 0.05), max_norm=0.5)
    model.learn(100, callback=callback)
    for module in (model.actor, model.critic):
        for p in module.parameters():
            assert p.min() >= -0.05 and p.max() <= 0.05
    assert callback.constraint_steps == 2 * model._n_updates
    assert not model.actor.optimizer._optimizer_step_post_hooks  # removed at the end
    with pytest.raises(ValueError, match="give clamp"):
        rsb3.WeightConstraintCallback()
    with pytest.raises(ValueError, match=r"min=1\.0 is greater than max=0\.0"):
        rsb3.WeightConstraintCallback(clamp=(1.0, 0.0))


def test_drift_callback_logs_into_the_sb3_tensorboard_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = _make(SAC, tensorboard_log=str(tmp_path))
    callback = rsb3.DriftCallback(every=50)
    model.learn(200, callback=callback)
    logged = callback.drift_logger.log(1000)  # measured now, after the last update
    callback.drift_logger.writer.flush()
    runs = list(tmp_path.iterdir())
    assert len(runs) == 1  # the run SB3 made, not a second one
    events = EventAccumulator(str(runs[0]), size_guidance={"scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "drift/critic/target_distance" in scalars
    assert "drift/critic/layers/qf0.0.weight/update_ratio" in scalars
    read = events.Scalars("drift/critic/target_distance")
    assert [e.step for e in read] == [50, 100, 150, 200, 1000]  # 200: due, once
    want = rw.distance(list(model.critic.parameters()), list(model.critic_target.parameters()))
    assert read[-1].value == pytest.approx(want.item(), rel=1e-5)
    assert read[-1].value == pytest.approx(logged["drift/critic/target_distance"], rel=1e-6)
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        rsb3.DriftCallback(every=0)


def test_drift_callback_measures_the_end_of_a_learn_between_due_steps(tmp_path):
    """A learn that ends between two due steps is measured at its end, on its final weights;
    one that ends on a due step is measured there once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = _make(SAC, tensorboard_log=str(tmp_path))
    callback = rsb3.DriftCallback(every=50)
    model.learn(120, callback=callback)
    critic, target = list(model.critic.parameters()), list(model.critic_target.parameters())
    final = rw.distance(critic, target).item()
    model.learn(30, callback=callback, reset_num_timesteps=False)  # ends at 150, a due step
    callback.drift_logger.writer.flush()
    events = EventAccumulator(str(next(tmp_path.iterdir())), size_guidance={"scalars": 0})
    events.Reload()
    read = events.Scalars("drift/critic/target_distance")
    assert [e.step for e in read] == [50, 100, 120, 150]
    assert read[2].value == pytest.approx(final, rel=1e-5)


def test_drift_callback_without_tensorboard_records_through_the_logger():
    model = (
        _make(PPO, learning_starts=None)
        if False
        else PPO(
            "MlpPolicy",
            "Pendulum-v1",
            device="cpu",
            n_steps=64,
            batch_size=32,
            seed=0,
            policy_kwargs={"net_arch": [8]},
        )
    )
    callback = rsb3.DriftCallback(every=16, per_layer=False)
    model.learn(64, callback=callback)
    values = callback.log_drift()
    assert set(values) == {
        "drift/policy/weight_norm",
        "drift/policy/init_distance",
        "drift/policy/update_ratio",
        "drift/policy/nonfinite",
    }
    assert values["drift/policy/init_distance"] > 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: rsb3.WeightConstraintCallback(("actor",), clamp=(-0.05, 0.05)),
        lambda: rsb3.PlasticityCallback(unit_sphere="actor.mu.weight"),
    ],
    ids=["constraints", "plasticity"],
)
def test_a_callback_after_a_learn_that_raised_leaves_no_hook_behind(make):
    first, second = _make(SAC), _make(SAC, seed=1)
    callback = make()
    callback.init_callback(first)
    callback.on_training_start({}, {})  # a learn() that raised: no on_training_end
    callback.init_callback(second)
    callback.on_training_start({}, {})
    assert not first.actor.optimizer._optimizer_step_post_hooks
    assert len(second.actor.optimizer._optimizer_step_post_hooks) == 1
    callback.on_training_end()
    assert not second.actor.optimizer._optimizer_step_post_hooks


def test_drift_callback_reused_on_a_model_without_tensorboard_logs_nothing_into_the_old_run(
    tmp_path,
):
    first = _make(SAC, tensorboard_log=str(tmp_path))
    callback = rsb3.DriftCallback(every=50)
    first.learn(100, callback=callback)
    callback.drift_logger.writer.flush()
    (run,) = tmp_path.iterdir()
    sizes = {p: p.stat().st_size for p in run.iterdir()}
    second = _make(SAC, seed=1)
    second.learn(100, callback=callback)
    values = callback.log_drift()
    assert {p: p.stat().st_size for p in run.iterdir()} == sizes
    want = rw.distance(list(second.critic.parameters()), list(second.critic_target.parameters()))
    assert values["drift/critic/target_distance"] == pytest.approx(want.item(), rel=1e-5)


def test_plasticity_and_constraint_callbacks_round_trip_their_state():
    """What a resumed run gives back to SB3's callbacks: the schedules' counters and event
    counts (loaded when training starts), the count of constrained steps; a state of other
    settings is refused."""
    plasticity = {"reset_every": 15, "shrink_perturb": (0.5, 0.1), "sp_every": 7}
    model = SAC("MlpPolicy", "Pendulum-v1", learning_starts=10, policy_kwargs={"net_arch": [8]})
    schedules = rsb3.PlasticityCallback(**plasticity)
    constraints = rsb3.WeightConstraintCallback(("actor",), clamp=(-1.0, 1.0))
    model.learn(40, callback=[schedules, constraints])
    state = schedules.state_dict()
    assert state["events"] == {"reset": 2, "shrink_perturb": 5}  # 15, 30; 7, 14, ..., 35
    assert state["routines"]["reset"]["counter"]["steps"] == 40
    fresh = rsb3.PlasticityCallback(**plasticity)
    fresh.load_state_dict(state)  # before training: kept until the schedules are made
    assert fresh.state_dict() == state
    other = SAC("MlpPolicy", "Pendulum-v1", policy_kwargs={"net_arch": [8]})
    fresh.init_callback(other)
    fresh.on_training_start({}, {})
    assert fresh.state_dict() == state and fresh.routines["reset"].updates == 2
    with pytest.raises(ValueError, match=r"this callback keeps \['reset'\]"):
        rsb3.PlasticityCallback(reset_every=15).load_state_dict(state)
    counted = constraints.state_dict()
    assert counted["constraint_steps"] > 0
    again = rsb3.WeightConstraintCallback(("actor",), clamp=(-1.0, 1.0))
    again.load_state_dict(counted)
    assert again.constraint_steps == counted["constraint_steps"]
    with pytest.raises(ValueError, match="constraint_steps"):
        again.load_state_dict({"constraint_steps": -1})


def test_plasticity_callback_state_holds_the_log_std_schedules_of_gsde():
    """gSDE's log_std has a schedule of its own (no layer draws it); its counter goes into the
    state and comes back at the next training start."""
    kwargs = {"use_sde": True, "learning_starts": 10, "policy_kwargs": {"net_arch": [8]}}
    model = SAC("MlpPolicy", "Pendulum-v1", **kwargs)
    schedules = rsb3.PlasticityCallback(reset_every=15)
    model.learn(40, callback=schedules)
    state = schedules.state_dict()
    assert set(state["log_std"]) == {"reset"}
    assert state["log_std"]["reset"]["counter"]["steps"] == 40
    assert state["log_std"]["reset"]["updates"] == 2  # 15, 30
    fresh = rsb3.PlasticityCallback(reset_every=15)
    fresh.load_state_dict(state)
    fresh.init_callback(SAC("MlpPolicy", "Pendulum-v1", **kwargs))
    fresh.on_training_start({}, {})
    assert fresh.state_dict() == state and fresh._log_std_shifts["reset"].updates == 2
