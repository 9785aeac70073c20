"""--compile: an agent's whole gradient step as one torch.compile(fullgraph=True) graph
(rlweights.agents.compiled) takes the eager step's steps (issue 15)."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch
from torch.testing import assert_close

import rlweights as rw
from rlweights.agents.compiled import prepare_adam, tensor_adam_step_
from rlweights.agents.registry import ALGOS, make_config


def test_tensor_adam_step_takes_torch_adams_steps():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, 3)), torch.nn.Parameter(torch.randn(3))]
    mine = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reference = torch.optim.Adam(params, lr=3e-3, betas=(0.8, 0.99), eps=1e-6)
    optimizer = torch.optim.Adam(mine, lr=3e-3, betas=(0.8, 0.99), eps=1e-6)
    prepare_adam(optimizer)
    for step in range(25):
        grads = [
            torch.randn(p.shape, generator=torch.Generator().manual_seed(step)) for p in params
        ]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        reference.step()
        tensor_adam_step_(optimizer, mine, grads)
    for a, b in zip(params, mine, strict=True):
        assert_close(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(params, mine, strict=True):  # the same state: checkpoints carry over
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert_close(optimizer.state[b][key], reference.state[a][key])


def _agent(algo: str, env_id: str, compile: bool, **overrides):
    config = make_config(algo, env_id, hidden=(32, 32), compile=compile, **overrides)
    env = gym.make(env_id)
    torch.manual_seed(0)
    agent = ALGOS[algo][1](config, env.observation_space, env.action_space)
    env.close()
    return agent


def _batch(agent, n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    obs_dim = agent.obs_dim if hasattr(agent, "obs_dim") else agent.q[0].in_features
    if hasattr(agent, "act_dim"):
        actions = torch.rand(n, agent.act_dim, generator=gen) * 2 - 1
    else:
        actions = torch.randint(agent.n_actions, (n,), generator=gen).float()
    return {
        "obs": torch.randn(n, obs_dim, generator=gen),
        "actions": actions,
        "rewards": torch.randn(n, generator=gen),
        "next_obs": torch.randn(n, obs_dim, generator=gen),
        "terminated": (torch.rand(n, generator=gen) < 0.1).float(),
    }


CASES = [
    ("sac", "Pendulum-v1", {"policy_ema": 0.05, "weight_clip": 0.5, "max_norm": 2.0}),
    ("sac", "MountainCarContinuous-v0", {}),  # gSDE, a fixed temperature
    ("td3", "Pendulum-v1", {"policy_ema": 0.05, "max_norm": 2.0}),  # two graphs: policy delay
    ("dqn", "CartPole-v1", {"weight_clip": 0.3}),  # gradient norm clipping
    ("ddpg", "Pendulum-v1", {"policy_ema": 0.05, "max_norm": 2.0, "target_update": "hard:3"}),
    ("tqc", "Pendulum-v1", {"policy_ema": 0.05, "n_critics": 3, "n_quantiles": 5}),
    # dropout and layer normalisation in the critics, two graphs (the policy delay)
    ("droq", "Pendulum-v1", {"policy_ema": 0.05, "policy_delay": 3, "gradient_steps": 1}),
    # resets (their targets copied, the optimizers' state forgotten) and the unit sphere
    ("sac", "Pendulum-v1", {"reset_every": 7, "reset_layers": "critic.*,actor.mean.*"}),
    ("td3", "Pendulum-v1", {"shrink_perturb": (0.6, 0.4), "sp_every": 9, "unit_sphere": "*"}),
]


INDUCTOR = {"dqn"}  # compiled to kernels in the default run; all cases under -m slow


def _backend(monkeypatch, algo: str) -> None:
    """Inductor (the real code generation) for DQN's case (every case: the slow test below);
    otherwise "aot_eager": the same tracing, functionalization and aliasing analysis, without
    a minute of code generation per graph."""
    import rlweights.agents.compiled as compiled

    if algo not in INDUCTOR:
        monkeypatch.setattr(compiled, "BACKEND", "aot_eager")


@pytest.mark.parametrize(("algo", "env_id", "overrides"), CASES)
def test_a_compiled_agent_takes_the_eager_steps(monkeypatch, algo, env_id, overrides):
    """The same batches and draws: over 30 gradient steps the compiled step gives the eager
    step's losses, networks, targets, temperature, policy EMA and optimizer state."""
    _backend(monkeypatch, algo)
    _check_compiled_against_eager(algo, env_id, overrides)


@pytest.mark.slow
@pytest.mark.parametrize(("algo", "env_id", "overrides"), CASES[:3])
def test_a_compiled_agent_takes_the_eager_steps_with_inductor(algo, env_id, overrides):
    """The cases above, compiled to kernels by inductor (a minute of compiling each)."""
    _check_compiled_against_eager(algo, env_id, overrides)


def _check_compiled_against_eager(algo: str, env_id: str, overrides: dict) -> None:
    torch._dynamo.reset()
    eager = _agent(algo, env_id, False, **overrides)
    compiled = _agent(algo, env_id, True, **overrides)
    compiled.load_weights(eager.weights_state())
    for step in range(30):
        batch = _batch(eager, 64, step)
        torch.manual_seed(1000 + step)
        want = eager.train_step(batch)
        torch.manual_seed(1000 + step)
        got = compiled.train_step(batch)
        torch.manual_seed(2000 + step)
        fired = eager.plasticity_step(1)
        torch.manual_seed(2000 + step)
        assert compiled.plasticity_step(1).keys() == fired.keys()
        assert got.keys() == want.keys()
        for key in want:
            assert_close(got[key], want[key], rtol=1e-3, atol=1e-4, msg=f"{key} at {step}")
    assert not compiled.compiled.failed
    import rlweights.agents.compiled as compiled_module

    if compiled_module.BACKEND == "inductor":  # on the CPU, compiled with the C++ wrapper
        assert compiled.compiled.options == {"cpp_wrapper": True}
    assert compiled.gradient_updates == eager.gradient_updates == 30
    for name, net in eager.networks.items():
        theirs = compiled.networks[name].state_dict().values()
        pairs = zip(net.state_dict().items(), theirs, strict=True)
        for (key, a), b in pairs:
            assert_close(b, a, rtol=1e-3, atol=1e-4, msg=f"{name}.{key}")
    if algo in ("sac", "tqc", "droq"):
        assert_close(compiled.log_alpha, eager.log_alpha, rtol=1e-4, atol=1e-5)
    state, want_state = compiled.training_state(), eager.training_state()
    assert_close(state["routines"], want_state["routines"], rtol=1e-3, atol=1e-4)
    for name, optimizer in want_state["optimizers"].items():
        for k, st in optimizer["state"].items():
            got_state = state["optimizers"][name]["state"][k]
            assert got_state["step"].item() == st["step"].item()
            assert_close(got_state["exp_avg_sq"], st["exp_avg_sq"], rtol=1e-3, atol=1e-6)


def test_the_command_takes_compile_and_refuses_it_for_sb3(tmp_path, capsys):
    from rlweights.agents.cli import _overrides
    from rlweights.cli import build_parser, main

    args = build_parser().parse_args(["train", "--compile"])
    assert _overrides(args)["compile"] is True
    assert _overrides(build_parser().parse_args(["train"]))["compile"] is None
    assert main(["train", "--compile", "--impl", "sb3", "--logdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "rlweights train: error: --compile compiles the native agents' step, not --impl sb3"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("algo", "steps", "compiled"),
    [
        ("sac", 10_000, False),  # the default run: 9,900 gradient steps
        ("sac", 20_000, True),
        ("td3", 40_000, True),  # 30,000 after TD3's 10,000 random steps
        ("td3", 30_000, False),
        ("ddpg", 40_000, True),
        ("tqc", 3_000, False),  # 2,900 gradient steps
        ("tqc", 20_000, True),  # the default run
        ("droq", 1_000, False),  # 18,000 gradient steps
        ("droq", 10_000, True),  # the default run: 198,000
        ("dqn", 1_000_000, False),  # never: DQN stays eager
    ],
)
def test_compile_auto_compiles_the_runs_long_enough_for_it_to_pay(algo, steps, compiled):
    """--compile auto (the default) against COMPILE_PAYS_FROM, counted by hand: the gradient
    steps after learning_starts, gradient_steps every train_freq steps."""
    from rlweights.agents.cli import _checked_config
    from rlweights.agents.compiled import COMPILE_PAYS_FROM
    from rlweights.cli import build_parser

    for given in ([], ["--compile", "auto"]):
        args = build_parser("train").parse_args(
            ["train", "--algo", algo, "--steps", str(steps), *given]
        )
        config, _ = _checked_config(args, 0, "cpu")
        planned = (steps - config.learning_starts) // config.train_freq * config.gradient_steps
        assert (planned >= (COMPILE_PAYS_FROM[algo] or float("inf"))) == compiled
        assert config.compile is compiled
    for mode, want in (("on", True), ("off", False)):
        args = build_parser("train").parse_args(["train", "--algo", algo, "--compile", mode])
        assert _checked_config(args, 0, "cpu")[0].compile is want
    other = "sbx" if algo == "droq" else "sb3"  # SB3 has no DroQ
    args = build_parser("train").parse_args(["train", "--algo", algo, "--impl", other])
    assert _checked_config(args, 0, "cpu")[0].compile is False  # auto: SB3 runs its own step


def test_compile_auto_says_which_it_chose(tmp_path, capsys):
    from rlweights.cli import main

    args = ["train", "--steps", "120", "--learning-starts", "50", "--hidden", "8,8"]
    assert main([*args, "--no-progress", "--logdir", str(tmp_path), "--eval-episodes", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    said = "rlweights train: --compile auto: eager (70 gradient steps; compiling pays from about"
    assert f"{said} 16000)" in lines, lines


def test_a_step_the_cpp_wrapper_cannot_compile_is_compiled_without_it(monkeypatch, capsys):
    from torch._dynamo.exc import BackendCompilerFailed

    import rlweights.agents.compiled as compiled

    built = []

    def fake_compile(fn, *, fullgraph, mode, backend, options):
        built.append((mode, options))

        def run(*args):
            if options:  # the C++ wrapper fails to compile (before the step runs)
                raise BackendCompilerFailed(fn, RuntimeError("no C++ wrapper here"), None)
            return fn(*args)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    step = compiled.CompiledStep(lambda x: x * 2, "a step", cpp_wrapper=True)
    assert step(torch.ones(2)).tolist() == [2.0, 2.0]
    assert built == [(None, {"cpp_wrapper": True}), (None, None)]
    assert step.options is None and not step.failed
    assert capsys.readouterr().err == ""  # compiled, not trained eagerly
    # CUDA graphs ("reduce-overhead") and the agents' CUDA steps keep the Python wrapper
    graphed = compiled.CompiledStep(lambda x: x, "b", cudagraphs=True, cpp_wrapper=True)
    assert graphed.options is None
    assert built[-1] == ("reduce-overhead", None)
    assert compiled.CompiledStep(lambda x: x, "c").options is None


def test_a_constraint_bound_to_views_of_weights_is_refused():
    weight = torch.nn.Parameter(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="views of other tensors"):
        rw.constraints.MaxNorm(1.0, capturable=True).bind([weight[0].t(), weight[1].t()])
    rw.constraints.MaxNorm(1.0, capturable=True).bind([weight])  # the parameter itself: fine


def test_a_compiled_step_refuses_weights_moved_since_it_was_built():
    """The capturable routines' layout checks run before every compiled step: replacing the
    Q-network's parameters raises instead of a compiled write into the old memory."""
    torch._dynamo.reset()
    agent = _agent("dqn", "CartPole-v1", True)
    agent.train_step(_batch(agent, 32, 0))
    q = agent.networks["q"]
    before = {k: v.clone() for k, v in agent.networks["q_target"].state_dict().items()}
    q.load_state_dict({k: v.clone() for k, v in q.state_dict().items()}, assign=True)
    with pytest.raises(rw.LayoutChangedError, match="build it again"):
        agent.train_step(_batch(agent, 32, 1))
    for key, value in agent.networks["q_target"].state_dict().items():
        assert torch.equal(value, before[key])
