"""Flat storage: views, identity, autograd visibility, broken layouts."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from conftest import NETS, make_pair, named
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.testing import assert_close

import rlweights as rw
from rlweights import ops


def test_flatten_keeps_objects_values_and_makes_views():
    net = NETS["cnn_bn"](0)
    params = list(net.parameters())
    buffers = list(net.buffers())
    values = named(net)
    handle = rw.flatten_(net)
    assert all(a is b for a, b in zip(net.parameters(), params, strict=True))
    assert all(a is b for a, b in zip(net.buffers(), buffers, strict=True))
    for name, v in named(net).items():
        assert torch.equal(v, values[name]), name
    roles = {g.role: g for g in handle.groups}
    assert set(roles) == {"param", "buffer"}
    param_flat = roles["param"].flat
    assert param_flat.numel() == sum(p.numel() for p in params)
    start, offset = param_flat.data_ptr(), 0
    for p in params:  # every parameter lives inside the one flat buffer, in order
        assert p.data_ptr() == start + offset * param_flat.element_size()
        offset += p.numel()
    assert [e.name for e in handle.others] == ["1.num_batches_tracked"]
    assert rw.flatten_(net) is handle  # idempotent
    assert "intact" in repr(handle)


def test_optimizer_keeps_training_a_flattened_module():
    net = NETS["mlp"](0)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    handle = rw.flatten_(net)
    flat = handle.param_flats[0]
    before = flat.clone()
    net(torch.randn(4, 5)).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(flat, before)  # the optimizer wrote through the views
    assert handle.intact


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "plain"])
@pytest.mark.parametrize(
    "write",
    [
        lambda t, s: rw.polyak_(t, s, 0.5),
        lambda t, s: rw.copy_(t, s),
        lambda t, s: rw.average_(t, [t, s]),
        lambda t, s: rw.clamp_(t, -0.1, 0.1),
        lambda t, s: rw.max_norm_(t, 0.01),
    ],
    ids=["polyak_", "copy_", "average_", "clamp_", "max_norm_"],
)
def test_writes_between_forward_and_backward_raise(flat, write):
    """The hazard that `.data` writes hide: backward must refuse modified saved weights."""
    target, source = make_pair("mlp")
    if flat:
        rw.flatten_(target)
        rw.flatten_(source)
    x = torch.randn(3, 5, requires_grad=True)
    loss = target(x).pow(2).sum()
    write(target, source)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # Control: without a write in between, backward runs.
    target(x).pow(2).sum().backward()


def _assert_targets_follow(target, source, t0, s0, tau=0.5):
    rw.polyak_(target, source, tau)
    got = named(target)
    for name, want in t0.items():
        if want.is_floating_point() and name in dict(target.named_parameters()):
            assert_close(got[name], want + tau * (s0[name] - want)), name


@pytest.mark.parametrize(
    "breaker",
    [
        lambda m: m.double(),
        lambda m: m.to(torch.float64).float(),
        lambda m: m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True),
        lambda m: vector_to_parameters(
            parameters_to_vector(m.parameters()).clone(), m.parameters()
        ),
        lambda m: setattr(m[0].weight, "data", m[0].weight.detach().clone()),  # the seed's .data
        lambda m: m.share_memory(),
    ],
    ids=["double", "cast-roundtrip", "assign", "vector_to_parameters", "dot-data", "share_memory"],
)
@pytest.mark.parametrize("side", ["target", "source", "both"])
def test_broken_layout_updates_the_real_tensors(breaker, side):
    target, source = make_pair("mlp")
    source_target = rw.make_target(source)  # flattens source
    del source_target
    rw.flatten_(target)
    assert ops.pair_plan(target, source, "t").flat  # the fast path is in use
    for module in {"target": [target], "source": [source], "both": [target, source]}[side]:
        breaker(module)
    if side != "both" and next(target.parameters()).dtype != next(source.parameters()).dtype:
        (source if side == "target" else target).double()
    t0, s0 = named(target), named(source)
    with pytest.warns(rw.FlatLayoutWarning, match="flat layout is broken"):
        _assert_targets_follow(target, source, t0, s0)
    assert not ops.pair_plan(target, source, "t").flat
    # Flattening again restores the fast path, still on the real tensors.
    rw.flatten_(target)
    rw.flatten_(source)
    assert ops.pair_plan(target, source, "t").flat
    _assert_targets_follow(target, source, named(target), named(source))


def test_replaced_and_added_tensors_are_noticed():
    target, source = make_pair("mlp")
    rw.flatten_(target)
    rw.flatten_(source)
    new_weight = nn.Parameter(torch.randn(16, 5))
    source[0].weight = new_weight  # a new Parameter object, registered through setattr
    with pytest.warns(rw.FlatLayoutWarning):
        rw.polyak_(target, source, 1.0)
    assert torch.equal(target[0].weight, new_weight)
    source.register_buffer("extra", torch.ones(2))
    with pytest.raises(rw.WeightMismatchError, match=r"only in source: 'extra'"):
        rw.polyak_(target, source, 1.0)


def test_overwrite_params_on_conversion_is_noticed():
    target, source = make_pair("mlp")
    rw.flatten_(target)
    rw.flatten_(source)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        source.double().float()  # new Parameter objects, written straight into _parameters
        t0, s0 = named(target), named(source)
        with pytest.warns(rw.FlatLayoutWarning):
            _assert_targets_follow(target, source, t0, s0)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    # With the flag off again, the replaced tensors are still noticed.
    _assert_targets_follow(target, source, named(target), named(source))


def test_module_entries_match_torch_named_members():
    net = nn.Sequential(NETS["cnn_bn"](0), NETS["tied"](0))
    shared = nn.Linear(3, 3, bias=False)
    net.append(shared)
    net.append(shared)  # a submodule reachable twice
    net[0][1].register_buffer("scratch", torch.zeros(2), persistent=False)
    got = [(e.name, e.tensor, e.kind) for e in rw.weights.module_entries(net)]
    want = [(n, p, "param") for n, p in net.named_parameters()]
    want += [(n, b, "buffer") for n, b in net.named_buffers()]
    assert [(n, k) for n, _, k in got] == [(n, k) for n, _, k in want]
    assert all(a is b for (_, a, _), (_, b, _) in zip(got, want, strict=True))


def test_deepcopy_of_a_flat_module_is_independent_and_unflat():
    net = NETS["mlp"](0)
    rw.flatten_(net)
    clone = copy.deepcopy(net)
    assert rw.flat.layout_of(clone) is None
    with torch.no_grad():
        clone[0].weight.add_(1.0)
    assert not torch.equal(clone[0].weight, net[0].weight)


def test_generation_bump_elsewhere_keeps_the_fast_path():
    target, source = make_pair("mlp")
    rw.flatten_(target)
    rw.flatten_(source)
    rw.polyak_(target, source, 0.5)
    nn.Linear(2, 2)  # registers parameters somewhere else in the process
    assert ops.pair_plan(target, source, "t").flat


def test_mixed_dtypes_get_one_flat_buffer_each():
    def net(seed):
        torch.manual_seed(seed)
        return nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4).to(torch.float64)})

    online = net(0)
    target = rw.make_target(online)
    handle = rw.flatten_(target)
    assert sorted(str(g.dtype) for g in handle.groups) == ["torch.float32", "torch.float64"]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    t0, s0 = named(target), named(online)
    rw.polyak_(target, online, 0.25)
    for name, t in t0.items():
        assert_close(named(target)[name], t + 0.25 * (s0[name] - t))


def _saved_size(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return len(buffer.getvalue())


def _mlp(inputs: int, outputs: int) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, 64), nn.ReLU(), nn.Linear(64, outputs))


def test_saving_part_of_a_flattened_network_writes_only_its_weights():
    """Issue 13: torch.save(agent.actor.state_dict()) wrote the critic's weights too (the
    whole shared flat buffer), pickling a flattened MLP was 6x the plain one, and each
    unpickled parameter got a storage the size of the whole buffer."""
    torch.manual_seed(0)
    agent = nn.ModuleDict({"actor": _mlp(17, 6), "critic": _mlp(23, 1)})
    plain_actor = copy.deepcopy(agent.actor)
    rw.flatten_(agent)
    actor_bytes = 4 * sum(p.numel() for p in plain_actor.parameters())
    for obj, plain in [
        (agent.actor.state_dict(), plain_actor.state_dict()),
        (agent.actor, plain_actor),
    ]:
        assert _saved_size(obj) == _saved_size(plain) < actor_bytes + 4096
    assert len(pickle.dumps(agent.actor)) == len(pickle.dumps(plain_actor))
    for loaded in (pickle.loads(pickle.dumps(agent)), copy.deepcopy(agent)):
        for p in loaded.parameters():
            assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
        x = torch.randn(4, 17)
        assert torch.equal(loaded.actor(x), agent.actor(x))
        rw.polyak_(loaded, agent, 0.5)  # a working module: ops, flattening, training
        rw.flatten_(loaded)
        loaded.actor(x).sum().backward()
    # The flattened module still writes through: ops on the views reach the flat buffer.
    rw.clamp_(agent, -0.01, 0.01)
    assert rw.flatten_(agent).param_flats[0].abs().max() <= 0.01  # the intact layout
    assert all(p.abs().max() <= 0.01 for p in agent.parameters())
