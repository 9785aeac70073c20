"""Resets, shrink-and-perturb and their schedules (rlweights.plasticity) against references:
the layers' own reset_parameters() under the same seed, and the formula in float64."""

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import rlweights as rw
from rlweights.periodic import Periodic


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2)
    )


def make(flat, seed=0):
    m = net(seed)
    if flat:
        rw.flatten_(m)
    return m


def reference_reset(m, seed, layers):
    """What the plasticity ops promise: reset_parameters() of each selected layer, in module
    order, after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    for name, layer in m.named_modules():
        if name in layers:
            layer.reset_parameters()
    return m


def params64(m):
    return {name: p.detach().double().clone() for name, p in m.named_parameters()}


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize(
    ("include", "exclude", "layers"),
    [(None, None, {"0", "2", "3", "4"}), ("2.*", None, {"2"}), (None, ["0.*", "3.*"], {"2", "4"})],
)
def test_reinit_draws_what_the_layers_reset_parameters_draw(flat, include, exclude, layers):
    m, ref = make(flat), copy.deepcopy(make(flat))
    before = params64(m)
    torch.manual_seed(7)
    touched = rw.reinit_(m, include=include, exclude=exclude)
    after_rng = torch.get_rng_state()
    reference_reset(ref, 7, layers)
    assert torch.equal(after_rng, torch.get_rng_state())  # the same numbers were drawn
    assert touched == [n for n, _ in m.named_parameters() if n.split(".")[0] in layers]
    for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), name
        if name.split(".")[0] not in layers:
            assert torch.equal(p.double(), before[name])  # untouched
    if flat:
        assert rw.flat.layout_of(m) is not None  # the layout is intact


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize(("shrink", "perturb"), [(0.5, 0.5), (0.8, 0.01), (0.3, 1.0), (1.0, 0.2)])
def test_shrink_perturb_is_the_formula_in_float64(flat, shrink, perturb):
    m = make(flat)
    theta = params64(m)
    fresh = params64(reference_reset(copy.deepcopy(make(flat)), 3, {"0", "2", "3", "4"}))
    torch.manual_seed(3)
    rw.shrink_perturb_(m, shrink, perturb)
    for name, p in m.named_parameters():
        assert_close(p.double(), shrink * theta[name] + perturb * fresh[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("flat", [False, True])
def test_the_two_ends_are_exact(flat):
    m = make(flat)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    torch.manual_seed(1)
    rw.shrink_perturb_(m, 1.0, 0.0)
    for name, p in m.named_parameters():
        assert torch.equal(p, before[name])  # bit-identical
    # the draw still happened: the stream after it does not depend on the coefficients
    state, other = torch.get_rng_state(), make(flat)
    torch.manual_seed(1)
    rw.shrink_perturb_(other, 0.0, 1.0)
    assert torch.equal(state, torch.get_rng_state())


def test_the_pinned_signatures_take_patterns_and_generator_by_position():
    m, ref = net(), net()
    g = torch.Generator().manual_seed(4)
    assert rw.reinit_(m, "2.*", None, g) == ["2.weight", "2.bias"]
    reference_reset(ref, 4, {"2"})
    assert torch.equal(m[2].weight, ref[2].weight)
    assert rw.shrink_perturb_(m, 1.0, 0.0, "4.*", "4.bias") == ["4.weight"]


def test_a_generator_draws_instead_of_the_global_rng():
    m, ref = net(), net()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    g = torch.Generator().manual_seed(9)
    rw.reinit_(m, generator=g)
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is untouched
    reference_reset(ref, 9, {"0", "2", "3", "4"})
    for p, q in zip(m.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(g.get_state(), torch.get_rng_state())  # g advanced by the draw


@pytest.mark.parametrize("flat", [False, True])
def test_optimizer_state_is_reset_for_exactly_the_touched_parameters(flat):
    m = make(flat)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(4, 5)).square().sum().backward()
        opt.step()
    kept = {n: copy.deepcopy(opt.state[p]) for n, p in m.named_parameters()}
    ids = {n: id(p) for n, p in m.named_parameters()}
    touched = rw.shrink_perturb_(m, 0.5, 0.5, include="2.*", optimizer=opt)
    assert touched == ["2.weight", "2.bias"]
    for name, p in m.named_parameters():
        assert id(p) == ids[name]  # the optimizer's Parameters are the module's
        if name in touched:
            assert p not in opt.state
        else:
            for key, value in kept[name].items():
                assert torch.equal(opt.state[p][key], value)
    opt.zero_grad()
    m(torch.randn(4, 5)).square().sum().backward()
    opt.step()  # and training goes on
    assert opt.state[m[2].weight]["step"] == 1


def test_a_sequence_of_optimizers_forgets_what_each_trains():
    # an agent's optimizers: each forgets the state of the touched parameters it trains
    m = net()
    first, second = torch.optim.Adam(m[0].parameters()), torch.optim.Adam(m[2].parameters())
    m(torch.randn(4, 5)).square().sum().backward()
    first.step()
    second.step()
    rw.reinit_(m, include="2.*", optimizer=[first, second])
    assert all(p in first.state for p in m[0].parameters())
    assert not any(p in second.state for p in m[2].parameters())
    with pytest.raises(ValueError, match="trains none of these"):
        rw.reinit_(m, include="4.*", optimizer=[first, second])
    with pytest.raises(TypeError, match="sequence of them"):
        rw.reinit_(m, optimizer=[first, "adam"])


class WithLogStd(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 3)
        self.log_std = nn.Parameter(torch.zeros(3))


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m, o: rw.reinit_(m, include="encoder.*"), ValueError, "matches no tensor"),
        (lambda m, o: rw.reinit_(m, exclude="*"), ValueError, "leave no floating parameter"),
        (
            lambda m, o: rw.shrink_perturb_(m, 1.5, 0.1),
            ValueError,
            r"shrink=1.5 is outside \[0, 1\]\. shrink is the factor the weights are multiplied "
            r"by \(theta <- shrink \* theta",
        ),
        (
            lambda m, o: rw.shrink_perturb_(m, 0.5, -0.1),
            ValueError,
            r"perturb=-0.1 is outside \[0, 1\]\. perturb is the weight of the fresh init",
        ),
        (lambda m, o: rw.shrink_perturb_(m, float("nan"), 0.1), ValueError, "shrink=nan"),
        (lambda m, o: rw.reinit_(m, optimizer=o), ValueError, "trains none of these"),
        (lambda m, o: rw.reinit_(m, generator=3), TypeError, "torch.Generator"),
        (lambda m, o: rw.reinit_([p for p in m.parameters()]), TypeError, "needs an nn.Module"),
    ],
)
def test_bad_calls_change_nothing(flat, call, error, match):
    m = make(flat)
    other = nn.Linear(2, 2)
    opt = torch.optim.Adam(other.parameters())
    other(torch.randn(1, 2)).sum().backward()
    opt.step()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    state, opt_state = torch.get_rng_state(), copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=match):
        call(m, opt)
    for name, p in m.named_parameters():
        assert torch.equal(p, before[name])
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn either
    assert str(opt.state_dict()) == str(opt_state)


def test_a_layer_without_reset_parameters_is_named_with_the_fix():
    m = WithLogStd()
    before = m.log_std.detach().clone(), m.body.weight.detach().clone()
    with pytest.raises(ValueError, match=r"log_std \(WithLogStd the module itself\).*exclude"):
        rw.reinit_(m)
    assert torch.equal(m.log_std, before[0]) and torch.equal(m.body.weight, before[1])
    assert rw.reinit_(m, exclude="log_std") == ["body.weight", "body.bias"]


@pytest.mark.parametrize("flat", [False, True])
def test_writes_are_visible_to_autograd(flat):
    m = make(flat)
    loss = m(torch.randn(4, 5)).square().sum()
    rw.shrink_perturb_(m, 0.5, 0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


class CountWrites(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.writes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mul_.Scalar, torch.ops.aten.copy_.default):
            self.writes += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("flat", "writes"), [(True, 1), (False, 8)])
def test_a_flat_buffer_is_written_in_one_pass(flat, writes):
    m = make(flat)  # 8 parameters in one flat buffer
    with CountWrites() as counted:
        rw.reinit_(m)
    assert counted.writes == writes


def test_periodic_at_listed_steps():
    c = Periodic(at=[3, 5, 9])
    due = [step for step in range(1, 12) if c.step()]
    assert due == [3, 5, 9] and c.fired == 3
    c = Periodic(at=[3, 5, 9])
    # counts of several steps: (0, 2] holds none, (2, 6] two, (6, 8] none, (8, 12] one
    assert [c.step(2), c.step(4), c.step(2), c.step(4)] == [False, True, False, True]
    assert c.fired == 3 and c.state_dict() == {"at": [3, 5, 9], "steps": 12}
    restored = Periodic(at=[3, 5, 9])
    restored.load_state_dict({"at": [3, 5, 9], "steps": 4})
    assert [s for s in range(5, 12) if restored.step()] == [5, 9]
    with pytest.raises(ValueError, match="at=\\[3, 5\\]"):
        Periodic(at=[3, 5, 9]).load_state_dict({"at": [3, 5], "steps": 1})
    with pytest.raises(ValueError, match=r"give every=N .* or at="):
        Periodic()
    with pytest.raises(ValueError, match=r"give every=N .* or at="):
        Periodic(2, at=[3])
    with pytest.raises(ValueError, match="at="):
        Periodic(at=[])
    with pytest.raises(ValueError, match="at="):
        Periodic(at=[0, 2])


@pytest.mark.parametrize("schedule", [{"every": 3}, {"at": [2, 7]}])
def test_shrink_perturb_schedule_fires_when_due_and_round_trips(schedule):
    m, ref = net(), net()
    routine = rw.ShrinkPerturb(m, 0.0, 1.0, **schedule)
    due = {3, 6, 9} if "every" in schedule else {2, 7}
    torch.manual_seed(5)
    fired = [s for s in range(1, 10) if routine.step()]
    assert set(fired) == due and routine.updates == len(due)
    torch.manual_seed(5)
    for _ in due:  # nothing else draws between the resets
        for name, layer in ref.named_modules():
            if name in {"0", "2", "3", "4"}:
                layer.reset_parameters()
    for p, q in zip(m.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)
    saved = routine.state_dict()
    copy_ = rw.ShrinkPerturb(net(), 0.0, 1.0, **schedule)
    copy_.load_state_dict(saved)
    assert copy_.state_dict() == saved and copy_.steps == 9
    other = {"at": [4]} if "every" in schedule else {"every": 3}
    with pytest.raises(ValueError):
        rw.ShrinkPerturb(net(), 0.0, 1.0, **other).load_state_dict(saved)


@pytest.mark.parametrize("include", [None, "weights.1"])
def test_parameters_in_a_parameter_list_are_drawn_by_the_module_above(include):
    # the agents' batched twin critic keeps its layers in ParameterLists; its own
    # reset_parameters() draws them (all of them: the stream matches; only the selection is
    # written)
    from rlweights.agents.networks import TwinQ

    q, ref = TwinQ(4, (8, 8)), TwinQ(4, (8, 8))
    rw.flatten_(q)
    before = {n: p.detach().clone() for n, p in q.named_parameters()}
    torch.manual_seed(2)
    touched = rw.reinit_(q, include=include)
    torch.manual_seed(2)
    ref.reset_parameters()
    assert touched == ([n for n, _ in q.named_parameters()] if include is None else ["weights.1"])
    for (name, p), q_ref in zip(q.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q_ref if name in touched else before[name]), name
