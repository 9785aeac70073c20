"""CUDA-only checks: graph capture with a tensor tau, one kernel per flat group.

Numerics on CUDA are covered by the ``device`` parametrisation of the other test files.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA, named
from torch import nn
from torch.testing import assert_close

import rlweights as rw

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA")]


def _critic(seed: int) -> nn.Module:
    """SAC's twin critic for HalfCheetah (obs 17 + action 6), on the GPU."""
    torch.manual_seed(seed)

    def q() -> nn.Module:
        return nn.Sequential(
            nn.Linear(23, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1)
        )

    return nn.ModuleList([q(), q()]).cuda()


def test_polyak_step_captured_in_a_cuda_graph_replays_with_a_new_tau():
    online = _critic(0)
    target = rw.make_target(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    tau = torch.tensor(0.1, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture, as the CUDA-graph docs ask
        rw.polyak_(target, online, torch.tensor(0.0, device="cuda"))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    t0, s0 = named(target), named(online)
    with torch.cuda.graph(graph):
        rw.polyak_(target, online, tau)
    # Capture records kernels without running them: the target is still as it was.
    for name, want in t0.items():
        assert torch.equal(named(target)[name], want)
    ref = dict(t0)
    for value in (0.3, 0.05, 1.0):
        tau.fill_(value)
        graph.replay()
        ref = {n: r + value * (s0[n] - r) for n, r in ref.items()}
        torch.cuda.synchronize()
        for name, want in ref.items():
            assert_close(named(target)[name], want, rtol=1e-5, atol=1e-6)


def _cuda_kernels(fn) -> list[str]:
    fn()  # warm-up
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    return [e.name for e in prof.events() if e.device_type == cuda]


def test_one_kernel_per_device_dtype_group():
    online = _critic(0)
    target = rw.make_target(online)
    kernels = _cuda_kernels(lambda: rw.polyak_(target, online, 0.005))
    assert len(kernels) == 1, kernels
    mixed = nn.ModuleDict(
        {"a": nn.Linear(64, 64), "b": nn.Linear(64, 64).to(torch.bfloat16)}
    ).cuda()
    mixed_target = rw.make_target(mixed)
    kernels = _cuda_kernels(lambda: rw.polyak_(mixed_target, mixed, 0.005))
    assert len(kernels) == 2, kernels
    kernels = _cuda_kernels(lambda: rw.copy_(target, online))
    assert len(kernels) == 1, kernels


def _sac_on_cuda(compile: bool):
    pytest.importorskip("gymnasium")
    import gymnasium as gym

    from rlweights.agents.registry import ALGOS, make_config

    config = make_config("sac", "Pendulum-v1", device="cuda", compile=compile, cudagraphs=compile)
    env = gym.make("Pendulum-v1")
    torch.manual_seed(0)
    agent = ALGOS["sac"][1](config, env.observation_space, env.action_space)
    env.close()
    return agent


def _sac_batch(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n = 256
    return {
        "obs": torch.randn(n, 3, device="cuda", generator=gen),
        "actions": torch.rand(n, 1, device="cuda", generator=gen) * 4 - 2,
        "rewards": torch.randn(n, device="cuda", generator=gen),
        "next_obs": torch.randn(n, 3, device="cuda", generator=gen),
        "terminated": (torch.rand(n, device="cuda", generator=gen) < 0.1).float(),
    }


def test_sacs_gradient_step_replayed_as_a_cuda_graph_takes_the_eager_steps():
    """--compile --cudagraphs: SAC's one gradient step (critic, actor, temperature, the
    capturable target update), compiled, recorded as a CUDA graph and replayed with new
    batches and draws copied into its inputs: the weights follow the eager steps."""
    eager, captured = _sac_on_cuda(False), _sac_on_cuda(True)
    captured.load_weights(eager.weights_state())
    for step in range(13):
        batch = _sac_batch(100 + step)
        torch.manual_seed(step)
        eager.train_step(batch)
        torch.manual_seed(step)
        captured.train_step(batch)
    torch.cuda.synchronize()
    assert captured.compiled is not None and not captured.compiled.failed
    for name, net in eager.networks.items():
        for a, b in zip(net.parameters(), captured.networks[name].parameters(), strict=True):
            assert_close(b, a, rtol=1e-3, atol=1e-4)
    assert_close(captured.log_alpha, eager.log_alpha, rtol=1e-4, atol=1e-5)
    assert int(captured.target_routine.updates) == int(eager.target_routine.updates) == 13


def test_training_with_compile_and_cudagraphs_runs_on_cuda(tmp_path):
    pytest.importorskip("gymnasium")
    from rlweights.cli import main

    flags = ["--compile", "--cudagraphs", "--device", "cuda", "--steps", "400"]
    flags += ["--learning-starts", "100", "--eval-episodes", "1", "--no-progress"]
    assert main(["train", *flags, "--logdir", str(tmp_path)]) == 0
