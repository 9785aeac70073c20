"""Weight constraints after optimizer steps and the reset of optimizer state (issue 6),
against float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import mlp
from torch import nn
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import rlweights as rw
from rlweights.constraints import Clamp, InitClip, MaxNorm, NonNeg, UnitNorm, UnitSphere


def big_mlp(seed=0):
    net = mlp(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(20.0)
    return net


def reference(net, fn):
    return {n: fn(n, p.detach().double().clone()) for n, p in net.named_parameters()}


def check(net, want):
    for name, p in net.named_parameters():
        assert_close(p.detach().double(), want[name], rtol=1e-6, atol=1e-6)


def test_clamp_nonneg_maxnorm_unitnorm_match_float64_references():
    net = big_mlp()
    want = reference(net, lambda n, w: w.clamp(-0.5, 0.25))
    Clamp(-0.5, 0.25)(net)
    check(net, want)

    net = big_mlp()
    want = reference(net, lambda n, w: w.clamp(min=0.0))
    NonNeg()(net)
    check(net, want)

    def max_norm(n, w):
        if w.dim() < 2:
            return w
        norms = w.norm(dim=1, keepdim=True)
        return torch.where(norms > 2.0, w * (2.0 / norms), w)

    net = big_mlp()
    want = reference(net, max_norm)
    MaxNorm(2.0)(net)
    check(net, want)

    def unit(n, w):
        return w if w.dim() < 2 else w / w.norm(dim=1, keepdim=True)

    net = big_mlp()
    with torch.no_grad():
        net[0].weight[3].zero_()  # a dead unit stays zero
    want = reference(net, unit)
    want["0.weight"][3] = 0.0
    UnitNorm()(net)
    check(net, want)


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("dim", [0, 1, -1, None])
def test_unit_sphere_projects_each_unit_onto_the_unit_sphere(flat, capturable, dim):
    # a Conv weight too: per output channel (dim 0), per input channel (dim 1), per kernel
    # position (dim -1), or whole tensors (None); biases and LayerNorm gains left alone
    net = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Conv1d(5, 4, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(7.0)
        net[0].weight[:, 2].zero_()  # an all-zero column: a dead unit for dim=1
        net[0].weight[1].zero_()  # an all-zero row: a dead unit for dim=0
    if flat:
        rw.flatten_(net)

    def project(n, w):
        if w.dim() < 2:
            return w
        over = None if dim is None else [d for d in range(w.dim()) if d != dim % w.dim()]
        norms = torch.linalg.vector_norm(w, dim=over, keepdim=True)
        return torch.where(norms > 0, w / norms, torch.zeros_like(w))

    want = reference(net, project)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    rw.constrain(opt, net, UnitSphere(dim, capturable=capturable))
    opt.step()  # a step that changes nothing, then the projection
    check(net, want)
    for p in net.parameters():
        if p.dim() >= 2:
            over = None if dim is None else [d for d in range(p.dim()) if d != dim % p.dim()]
            norms = torch.linalg.vector_norm(p.detach().double(), dim=over)
            alive = norms > 0
            assert alive.any()
            assert_close(norms[alive], torch.ones_like(norms[alive]), rtol=1e-6, atol=1e-6)


def test_unit_sphere_is_unit_norm_by_default_and_refuses_bad_dims():
    a, b = big_mlp(), big_mlp()
    UnitSphere()(a)
    UnitNorm()(b)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    net = big_mlp()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=r"dim=2 does not exist in weights of shape"):
        UnitSphere(dim=2)(net)
    with pytest.raises(ValueError, match=r"dim=2 does not exist"):
        UnitSphere(dim=2, capturable=True).bind(net)
    with pytest.raises(ValueError, match="dim must be an int"):
        UnitSphere(dim="rows")
    for p, q in zip(net.parameters(), before, strict=True):
        assert torch.equal(p, q)


def test_init_clip_uses_the_default_initialisation_bound_times_kappa():
    net = nn.Sequential(nn.Linear(16, 8), nn.LayerNorm(8), nn.Conv1d(8, 4, 3))
    bounds = InitClip.default_bounds(net)
    assert bounds == {
        "0.weight": 1 / math.sqrt(16),
        "0.bias": 1 / math.sqrt(16),
        "2.weight": 1 / math.sqrt(8 * 3),
        "2.bias": 1 / math.sqrt(8 * 3),
    }
    # A fresh default initialisation lies within the bounds (kappa = 1 changes nothing).
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    InitClip(1.0)(net)
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(10.0)
    want = reference(net, lambda n, w: w.clamp(-2 * bounds[n], 2 * bounds[n]) if n in bounds else w)
    InitClip(2.0)(net)
    check(net, want)
    assert torch.equal(net[1].weight, torch.full((8,), 10.0))  # LayerNorm left alone


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_init_clip_on_flat_storage_is_one_clamp_and_matches_the_per_tensor_clip():
    nets = [nn.Sequential(nn.Linear(16, 8), nn.LayerNorm(8), nn.Linear(8, 4)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    with torch.no_grad():
        for net in nets:
            for p in net.parameters():
                p.mul_(10.0)
    bounds = InitClip.default_bounds(nets[0])
    want = reference(
        nets[0], lambda n, w: w.clamp(-3 * bounds[n], 3 * bounds[n]) if n in bounds else w
    )
    layout = rw.flatten_(nets[1])
    clip = InitClip(3.0)
    InitClip(3.0)(nets[0])  # per tensor
    with CountOps() as counted:
        clip(nets[1])  # flat: limits built once, then one clamp
    check(nets[0], want)
    check(nets[1], want)
    with CountOps() as counted:
        clip(nets[1])
    assert counted.ops.count("clamp_") == len(layout.param_flats) == 1
    assert "clamp_min_" not in counted.ops and "clamp_max_" not in counted.ops
    # Autograd sees the flat write: clipping between a forward and its backward raises.
    loss = nets[1](torch.ones(2, 16)).sum()
    clip(nets[1])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # A broken layout (the module was cast) falls back to the per-tensor clip, still right.
    net = nets[1].double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(10.0)
    want = reference(net, lambda n, w: w.clamp(-3 * bounds[n], 3 * bounds[n]) if n in bounds else w)
    with pytest.warns(rw.FlatLayoutWarning):
        clip(net)
    check(net, want)


def test_constrain_runs_after_every_step_and_is_removable():
    net = mlp(0)
    opt = torch.optim.SGD(net.parameters(), lr=10.0)
    handle = rw.constrain(opt, net, Clamp(-0.1, 0.1))
    x = torch.randn(8, 5)
    for _ in range(3):
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        opt.step()
        assert all(p.abs().max() <= 0.1 for p in net.parameters())
    handle.remove()
    opt.zero_grad()
    net(x).pow(2).sum().mul(100).backward()
    opt.step()
    assert any(p.abs().max() > 0.1 for p in net.parameters())


def test_constrain_refuses_weights_the_optimizer_does_not_train():
    net, other = mlp(0), mlp(1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="trains none of these weights"):
        rw.constrain(opt, other, Clamp(-1, 1))
    with pytest.raises(TypeError, match="must be callable"):
        rw.constrain(opt, net, 3.0)


def test_reset_optimizer_state_resets_exactly_those_parameters():
    net = mlp(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.randn(8, 5)
    for _ in range(3):
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        opt.step()
    kept = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in net.named_parameters()}
    assert rw.reset_optimizer_state_(opt, net[0]) == 2  # weight and bias of the first layer
    assert net[0].weight not in opt.state and net[0].bias not in opt.state
    for name, p in net.named_parameters():
        if not name.startswith("0."):
            assert all(torch.equal(opt.state[p][k], v) for k, v in kept[name].items())
    # The next step treats them as new: Adam's first step moves each weight by lr * sign(g).
    before = net[0].weight.detach().clone()
    opt.zero_grad()
    net(x).pow(2).sum().backward()
    grad = net[0].weight.grad.clone()
    opt.step()
    moved = before - net[0].weight.detach()
    assert_close(moved, 1e-2 * grad.sign(), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="trains none of these weights"):
        rw.reset_optimizer_state_(opt, mlp(1))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Clamp(1.0, -1.0), "min"),
        (lambda: MaxNorm(-1.0), "max_norm"),
        (lambda: InitClip(0.0), "kappa must be a number > 0"),
        (lambda: InitClip(float("nan")), "kappa"),
    ],
)
def test_bad_constraint_values(make, message):
    with pytest.raises(ValueError, match=message):
        make()
