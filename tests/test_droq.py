"""DroQ (agents/droq.py): its critics against a hand-written float64 network, its step against
SAC's (which is checked against SB3's per step) once dropout, layer normalisation and the
policy delay are taken away, its policy delay against SBX's rule, and ``--impl sbx`` (SBX's
DroQ configuration of SAC with the same settings)."""

from __future__ import annotations

import json

import gymnasium as gym
import pytest
import torch
from torch.nn import functional as F
from torch.testing import assert_close

from rlweights.agents.checkpoint import load_checkpoint
from rlweights.agents.networks import LAYER_NORM_EPS, TwinQ, dropped_units
from rlweights.agents.registry import ALGOS, make_config
from rlweights.cli import main


def _reference_q(net: TwinQ, x: torch.Tensor, masks: list[torch.Tensor] | None) -> torch.Tensor:
    """Each network on its own, in float64, written out: linear layer, dropout (``masks``:
    the kept units scaled by 1/(1-p)), layer normalisation (mean and biased variance over
    the units, then the learned scale and shift), ReLU; a linear output."""
    out = []
    layers = len(net.weights)
    for k in range(len(net.weights[0])):
        h = x.double()
        for i in range(layers):
            h = h @ net.weights[i][k].double() + net.biases[i][k, 0].double()
            if i == layers - 1:
                break
            if masks is not None:
                h = h * masks[i][k].double()
            if net.norm_scales:
                mean = h.mean(-1, keepdim=True)
                var = ((h - mean) ** 2).mean(-1, keepdim=True)
                h = (h - mean) / torch.sqrt(var + LAYER_NORM_EPS)
                h = h * net.norm_scales[i][k, 0].double() + net.norm_shifts[i][k, 0].double()
            h = torch.clamp(h, min=0.0)
        out.append(h[:, 0])
    return torch.stack(out)


def _critic(dropout: float, layer_norm: bool) -> TwinQ:
    torch.manual_seed(0)
    net = TwinQ(5, (7, 6), dropout=dropout, layer_norm=layer_norm)
    with torch.no_grad():  # scales and shifts away from 1 and 0, so that they count
        for p in [*net.norm_scales, *net.norm_shifts]:
            p.add_(torch.randn_like(p) * 0.5)
    return net


def test_the_critics_layer_normalisation_is_the_hand_written_one():
    net = _critic(0.0, True)
    x = torch.randn(9, 5)
    assert_close(net(x).double(), _reference_q(net, x, None), rtol=1e-5, atol=1e-6)
    # the actor's view of the critic: gradients reach the input, not the weights
    y = x.clone().requires_grad_()
    net(y, detach_weights=True).sum().backward()
    assert y.grad is not None and all(p.grad is None for p in net.parameters())


def test_the_critics_dropout_comes_before_the_layer_normalisation_in_every_evaluation():
    p = 0.3
    net = _critic(p, True)
    x = torch.randn(9, 5)
    torch.manual_seed(5)
    got = net(x)
    torch.manual_seed(5)  # the same draws, as masks: F.dropout of ones of each layer's shape
    masks = [F.dropout(torch.ones(2, 9, size), p, training=True) for size in (7, 6)]
    assert_close(got.double(), _reference_q(net, x, masks), rtol=1e-5, atol=1e-6)
    assert not torch.equal(net(x), net(x))  # active in every evaluation (the target's too)
    with pytest.raises(ValueError, match=r"dropout=1\.0 is not a rate"):
        TwinQ(4, (8,), dropout=1.0)


def test_dropped_units_drop_each_unit_independently_at_the_rate():
    """The positions drawn from geometric gaps are a Bernoulli(rate) mask's zeros: the
    fraction dropped is the rate, the count per draw has the binomial variance, neighbours
    are dropped independently (both with probability rate^2), and every unit can be."""
    torch.manual_seed(0)
    size, rate, draws = 5000, 0.05, 400
    masks = torch.zeros(draws, size)
    for k in range(draws):
        positions = dropped_units(size, rate)
        assert positions[-1] == size and bool((positions[1:] >= positions[:-1]).all())
        masks[k, positions[positions < size]] = 1.0
    counts = masks.sum(1).double()
    mean, var = size * rate, size * rate * (1 - rate)
    assert abs(counts.mean() - mean) < 4 * (var / draws) ** 0.5
    assert 0.8 < counts.var() / var < 1.2
    both = (masks[:, 1:] * masks[:, :-1]).mean()
    assert abs(float(both) - rate**2) < 4 * (rate**2 / (draws * size)) ** 0.5
    assert bool(masks.sum(0).gt(0).float().mean() > 0.99)  # 1 - 0.95^400: every unit


def test_the_critics_with_units_dropped_before_the_step_are_the_hand_written_one():
    """Two evaluations' units drawn at once, their masks made in one fill: each evaluation's
    critic against the float64 network with the mask written out from the positions."""
    p = 0.3
    net = _critic(p, True)
    x = torch.randn(9, 5)
    dropped = net.draw_dropped(9, evaluations=2)
    keep = torch.full((2 * (2 * 9 * 7 + 2 * 9 * 6),), 1 / (1 - p))
    keep[dropped[dropped < keep.numel()]] = 0.0
    sizes = [2 * 9 * 7, 2 * 9 * 6] * 2
    parts = keep.split(sizes)
    written = [[parts[0].view(2, 9, 7), parts[1].view(2, 9, 6)]]
    written.append([parts[2].view(2, 9, 7), parts[3].view(2, 9, 6)])
    masks = net.dropout_masks(dropped, 9, 2)
    for evaluation, (made, mine) in enumerate(zip(masks, written, strict=True)):
        assert all(0 < float((m == 0).float().mean()) < 1 for m in mine)
        got = net(x, masks=made)
        assert_close(got.double(), _reference_q(net, x, mine), rtol=1e-5, atol=1e-6)
        assert torch.equal(net(x, masks=made), got), evaluation  # the same units, values


def _agents(algo_a: str, algo_b: str, **droq):
    env = gym.make("Pendulum-v1")
    built = []
    for algo, overrides in ((algo_a, {}), (algo_b, droq)):
        config = make_config(algo, "Pendulum-v1", hidden=(32, 32), **overrides)
        torch.manual_seed(0)
        built.append(ALGOS[algo][1](config, env.observation_space, env.action_space))
    env.close()
    return built


def _batch(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "obs": torch.randn(64, 3, generator=gen),
        "actions": torch.rand(64, 1, generator=gen) * 4 - 2,
        "rewards": torch.randn(64, generator=gen),
        "next_obs": torch.randn(64, 3, generator=gen),
        "terminated": (torch.rand(64, generator=gen) < 0.1).float(),
    }


def test_droq_without_dropout_layer_norm_and_policy_delay_takes_sacs_steps():
    sac, droq = _agents("sac", "droq", dropout=0.0, layer_norm=False, policy_delay=1)
    for step in range(12):
        batch = _batch(step)
        torch.manual_seed(100 + step)
        want = sac.train_step(batch)
        torch.manual_seed(100 + step)
        got = droq.train_step(batch)
        assert got.keys() == want.keys()
    for name, net in sac.networks.items():
        for (key, a), b in zip(
            net.state_dict().items(), droq.networks[name].state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), f"{name}.{key}"
    assert torch.equal(sac.log_alpha, droq.log_alpha)


def _unchanged(before: list[torch.Tensor], now) -> list[bool]:
    return [torch.equal(a, b) for a, b in zip(before, now, strict=True)]


def test_droq_steps_the_actor_and_temperature_at_sbxs_policy_delay_steps():
    """SBX steps the actor at gradient step ``i`` of a call of ``K`` (after ``n`` earlier
    updates) when ``(n + 1 + i) % policy_delay == 0``: at the updates counted 1, 2, ... that
    are multiples of the delay. The critic and its target move at every step."""
    droq = _agents("droq", "droq", policy_delay=4)[1]
    delay, moved = 4, []
    for step in range(13):
        actor = [p.clone() for p in droq.actor.parameters()]
        alpha = droq.log_alpha.clone()
        critic = [p.clone() for p in droq.critic.parameters()]
        target = [p.clone() for p in droq.networks["critic_target"].parameters()]
        losses = droq.train_step(_batch(step))
        stepped = not any(_unchanged(actor, droq.actor.parameters()))
        assert stepped == (not torch.equal(alpha, droq.log_alpha)) == ("actor_loss" in losses)
        assert not any(_unchanged(critic, droq.critic.parameters()))
        assert not any(_unchanged(target, droq.networks["critic_target"].parameters()))
        if stepped:
            moved.append(step)
    sbx = [g for g in range(13) if (g + 1) % delay == 0]  # n = g - i updates before, + i
    assert moved == sbx == [3, 7, 11]


def test_droqs_presets_are_sacs_with_20_updates_per_environment_step():
    for env_id in ("Pendulum-v1", "Hopper-v5", "MountainCarContinuous-v0"):
        droq, sac = make_config("droq", env_id), make_config("sac", env_id)
        assert droq.gradient_steps == 20 * sac.train_freq
        assert (droq.policy_delay, droq.dropout, droq.layer_norm) == (20, 0.01, True)
        for field in ("total_steps", "learning_rate", "learning_starts", "batch_size", "hidden"):
            assert getattr(droq, field) == getattr(sac, field), (env_id, field)


def test_impl_sbx_gets_droqs_settings():
    pytest.importorskip("sbx")
    from rlweights.agents.sbx_train import build_sbx_model

    config = make_config("droq", "Pendulum-v1", hidden=(16, 16), policy_delay=5, dropout=0.2)
    model = build_sbx_model(config)
    model.get_env().close()
    assert type(model).__name__ == "SAC" and type(model).__module__.startswith("sbx")
    assert (model.gradient_steps, model.policy_delay, model.learning_rate) == (20, 5, 1e-3)
    assert (model.policy.dropout_rate, model.policy.layer_norm) == (0.2, True)
    assert model.policy.net_arch_pi == model.policy.net_arch_qf == [16, 16]


def test_impl_sbx_trains_evaluates_and_resumes(tmp_path, capsys):
    pytest.importorskip("sbx")
    run = tmp_path / "r"
    args = ["train", "--impl", "sbx", "--algo", "droq", "--hidden", "16,16", "--no-progress"]
    args += ["--learning-starts", "50", "--gradient-steps", "2", "--policy-delay", "2"]
    args += ["--eval-every", "60", "--eval-episodes", "2", "--steps", "120"]
    assert main([*args, "--logdir", str(tmp_path), "--run-name", "r"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["impl"] == "sbx" and summary["steps"] == 120
    assert summary["gradient_updates"] == (120 - 50) * 2
    saved = load_checkpoint(run)
    assert main(["evaluate", str(run), "--episodes", "2"]) == 0
    assert main(["train", "--resume", str(run), "--steps", "150", "--no-progress"]) == 0
    resumed = load_checkpoint(run)
    assert resumed["steps"] == 150 and resumed["training"]["n_updates"] == (150 - 50) * 2
    n = len(saved["training"]["buffer"]["observations"])
    assert torch.equal(
        resumed["training"]["buffer"]["observations"][:n],
        saved["training"]["buffer"]["observations"],
    )
    # the resumed run started from the saved states: the optimizer's step count went on
    counts = [t for t in saved["training"]["states"]["policy.qf_state"] if t.ndim == 0]
    counts_now = [t for t in resumed["training"]["states"]["policy.qf_state"] if t.ndim == 0]
    assert int(counts_now[0]) == int(counts[0]) + 30 * 2
    # a crafted checkpoint (resealed: the checksum finds damage, not intent) whose arrays do
    # not fit the model is refused in one line, and nothing is written
    from rlweights.files import sealed

    state = torch.load(run / "model.pt", weights_only=True)
    state.pop("checksum")
    state["training"]["states"]["policy.qf_state"][0] = torch.zeros(3)
    torch.save(sealed(state), run / "model.pt")
    before = (run / "model.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "200", "--no-progress"]) == 2
    assert "does not fit this run" in capsys.readouterr().err
    assert (run / "model.pt").read_bytes() == before
    state["weights"]["actor"] = {"['params']['x']": torch.zeros(2)}
    torch.save(sealed(state), run / "model.pt")
    assert main(["evaluate", str(run), "--episodes", "1"]) == 2
    assert "actor does not fit" in capsys.readouterr().err
    for refused in (["--policy-ema", "0.1"], ["--target-update", "hard:5"], ["--compile", "on"]):
        assert main([*args, *refused, "--logdir", str(tmp_path / "x")]) == 2
    assert "rlweights' weight routines" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("algo", ["sac", "tqc", "td3", "ddpg"])
def test_impl_sbx_builds_sbxs_algorithm_of_the_same_name_with_the_settings(algo):
    pytest.importorskip("sbx")
    from rlweights.agents.sbx_train import _actor_params, build_sbx_model

    config = make_config(algo, "Pendulum-v1", hidden=(16, 16), learning_rate=5e-4, gamma=0.9)
    model = build_sbx_model(config)
    model.get_env().close()
    assert type(model).__module__.startswith("sbx") and type(model).__name__ == algo.upper()
    assert (model.learning_rate, model.gamma, model.batch_size) == (5e-4, 0.9, 256)
    assert _actor_params(model)  # the weights a checkpoint keeps for evaluation
    if algo == "td3":
        assert model.policy_delay == config.policy_delay == 2


def test_impl_sbx_has_no_dqn_run_but_bench_train_builds_sbxs_dqn():
    assert main(["train", "--impl", "sbx", "--algo", "dqn", "--steps", "10"]) == 2
    pytest.importorskip("sbx")
    from rlweights.agents.sbx_train import build_sbx_model

    model = build_sbx_model(make_config("dqn", "CartPole-v1", hidden=(16,)))
    model.get_env().close()
    assert type(model).__module__.startswith("sbx") and type(model).__name__ == "DQN"


def test_impl_sb3_has_no_droq():
    assert main(["train", "--impl", "sb3", "--algo", "droq", "--steps", "10"]) == 2
