"""rw.EMA and rw.SWA (issue 6) against float64 references and torch's AveragedModel."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, cnn_bn, mlp, named
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.testing import assert_close

import rlweights as rw


def perturb(net, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("warmup", [False, True])
def test_ema_matches_a_float64_reference(device, warmup):
    net = mlp(0).to(device)
    ema = rw.EMA(net, tau=0.05, warmup=warmup)
    want = named(net)
    for n in range(6):
        perturb(net, n)
        tau = max(0.05, 1 - (1 + n) / (10 + n)) if warmup else 0.05
        now = named(net)
        want = {k: want[k] + tau * (now[k] - want[k]) for k in want}
        assert ema.update()
    for name, value in named(ema.averaged).items():
        assert_close(value, want[name], rtol=1e-5, atol=1e-6)
    assert ema.updates == 6 and not any(p.requires_grad for p in ema.averaged.parameters())


def test_ema_without_warmup_equals_torch_averaged_model():
    net = mlp(0)
    ema = rw.EMA(net, tau=0.1)
    reference = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    reference.update_parameters(net)  # its first update copies: the state ema starts from
    for n in range(5):
        perturb(net, n)
        ema.update()
        reference.update_parameters(net)
    for name, value in named(reference.module).items():
        assert_close(named(ema.averaged)[name], value, rtol=1e-5, atol=1e-6)


def test_swa_is_the_mean_of_the_snapshots_after_start():
    net = mlp(0)
    swa = rw.SWA(net, start=2)
    snapshots = []
    for n in range(7):
        perturb(net, n)
        did = swa.update()
        assert did == (n >= 2)
        if did:
            snapshots.append(named(net))
    mean = {k: sum(s[k] for s in snapshots) / len(snapshots) for k in snapshots[0]}
    for name, value in named(swa.averaged).items():
        assert_close(value, mean[name], rtol=1e-5, atol=1e-6)
    assert swa.updates == 5 and swa.calls == 7


def test_buffers_policy_on_batchnorm():
    net = cnn_bn(0)
    ema = rw.EMA(net, tau=0.5)
    skip = rw.EMA(net, tau=0.5, buffers="skip")
    before = named(skip.averaged)["1.running_mean"].clone()
    with torch.no_grad():
        net(torch.randn(8, 2, 6, 6) * 3)  # new running statistics
    ema.update()
    skip.update()
    assert_close(named(ema.averaged)["1.running_mean"], named(net)["1.running_mean"])
    assert_close(named(skip.averaged)["1.running_mean"], before)
    assert torch.equal(ema.averaged[1].num_batches_tracked, net[1].num_batches_tracked)


def test_state_dict_round_trip():
    net = mlp(0)
    ema = rw.EMA(net, tau=0.2, warmup=True)
    for n in range(3):
        perturb(net, n)
        ema.update()
    state = ema.state_dict()
    fresh = rw.EMA(mlp(5), tau=0.2, warmup=True)
    fresh.load_state_dict(state)
    assert fresh.updates == 3
    for name, value in named(ema.averaged).items():
        assert torch.equal(named(fresh.averaged)[name], value)
    swa = rw.SWA(net, start=1)
    swa.update()
    swa.update()
    again = rw.SWA(mlp(1), start=1)
    again.load_state_dict(swa.state_dict())
    assert again.calls == 2 and again.updates == 1
    state = swa.state_dict()
    assert set(state) == {"counter", "updates", "averaged"}
    assert state["counter"] == {"every": 1, "start": 1, "steps": 2} and state["updates"] == 1
    assert repr(ema) == "EMA(Sequential, tau=0.2, warmup=True, updates=3)"
    assert repr(again) == "SWA(Sequential, start=1, calls=2, updates=1)"


def test_load_state_dict_is_validated_before_anything_changes():
    net = mlp(0)
    swa = rw.SWA(net, start=1, every=2)
    for n in range(5):
        perturb(net, n)
        swa.update()
    state = swa.state_dict()
    fresh = rw.SWA(mlp(1), start=1, every=2)
    before = named(fresh.averaged)
    smaller = {k: v for k, v in state["averaged"].items() if k != "2.bias"}
    for bad, error, message in [
        (
            {**state, "counter": {**state["counter"], "start": 0}},
            ValueError,
            "SWA.load_state_dict: the saved state has start=0",
        ),
        (
            {**state, "averaged": smaller},
            rw.WeightMismatchError,
            r"does not fit this module \(2\.bias\)",
        ),
        ({**state, "averaged": named(cnn_bn(0))}, rw.WeightMismatchError, "does not fit"),
        ({**state, "updates": -1}, ValueError, "updates must be an int >= 0"),
        ({"averaged": state["averaged"]}, ValueError, "expected keys"),
    ]:
        with pytest.raises(error, match=message):
            fresh.load_state_dict(bad)
        assert fresh.calls == fresh.updates == 0
        for name, value in named(fresh.averaged).items():
            assert torch.equal(value, before[name]), name
    fresh.load_state_dict(state)
    assert fresh.calls == 5 and fresh.updates == 2
    for name, value in named(swa.averaged).items():
        assert torch.equal(named(fresh.averaged)[name], value)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: rw.EMA(mlp(0), tau=1.5), ValueError, r"tau=1\.5"),
        (
            lambda: rw.EMA(mlp(0), tau="0.1"),
            ValueError,
            r"tau must be a float in \[0, 1\], got '0.1'",
        ),
        (lambda: rw.EMA(mlp(0), tau=torch.tensor(0.1)), ValueError, "tau must be a float"),
        (lambda: rw.EMA(mlp(0), tau=0.1, every=0), ValueError, "EMA: every must be an int >= 1"),
        (lambda: rw.SWA(mlp(0), start=-1), ValueError, "SWA: start must be an int >= 0, got -1"),
        (lambda: rw.EMA(torch.zeros(3), tau=0.1), TypeError, "averages an nn.Module"),
    ],
)
def test_bad_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make()
