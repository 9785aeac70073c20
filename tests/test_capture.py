"""The capturable form of the routines (``capturable=True``, issue 15): the same results as the
eager routines, traced by ``torch.compile(fullgraph=True)``, no graph break of rlweights'
making inside a compiled training step, changed layouts refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import NETS, named, snapshot
from torch import nn
from torch.testing import assert_close

import rlweights as rw
from rlweights.periodic import DevicePeriodic, Periodic

RLWEIGHTS = str(Path(rw.__file__).parent)


@pytest.mark.parametrize(("every", "start", "n"), [(1, 0, 1), (3, 0, 1), (4, 5, 1), (3, 2, 2)])
def test_device_counter_fires_where_the_host_counter_does(every, start, n):
    host, device = Periodic(every, start=start), DevicePeriodic(every, start=start)
    fired = [(host.step(n), bool(device.step(n))) for _ in range(30)]
    assert [h for h, _ in fired] == [d for _, d in fired] and any(h for h, _ in fired)
    assert device.state_dict() == host.state_dict() and device.fired == host.fired
    restored = DevicePeriodic(every, start=start)
    restored.load_state_dict(host.state_dict())
    assert [bool(restored.step(n)) for _ in range(9)] == [host.step(n) for _ in range(9)]


def _routines(source: nn.Module, target: nn.Module, policy: nn.Module, capturable: bool):
    """A routine of each kind, with settings that exercise the due flag and the buffers."""
    hard_target = copy.deepcopy(target)
    slow_target = copy.deepcopy(target)
    return [
        rw.PolyakUpdate(source, target, tau=0.05, capturable=capturable),
        rw.PolyakUpdate(
            source, slow_target, tau=0.2, every=3, start=2, buffers="polyak", capturable=capturable
        ),
        rw.HardUpdate(source, hard_target, every=4, capturable=capturable),
        rw.EMA(policy, tau=0.01, warmup=True, capturable=capturable),
        rw.SWA(policy, start=3, every=2, capturable=capturable),
    ]


def _written(routine) -> nn.Module:
    return routine.averaged if isinstance(routine, rw.EMA | rw.SWA) else routine.target


def _nudge(*modules: nn.Module, seed: int) -> None:
    """Move the online weights and statistics (as an optimizer step and a forward would)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for t in [*module.parameters(), *module.buffers()]:
                if t.is_floating_point():
                    t.add_(torch.randn(t.shape, generator=gen) * 0.1)
                else:
                    t.add_(1)


@pytest.mark.parametrize("kind", ["mlp", "cnn_bn"])
def test_capturable_routines_give_the_eager_routines_results(kind):
    """Bit for bit, step by step: the due flags, the updates counted, every written tensor
    (float buffers per the policy, integer buffers copied)."""
    pairs = {}
    for capturable in (False, True):
        source, target, policy = NETS[kind](1), NETS[kind](0), NETS[kind](2)
        pairs[capturable] = (source, policy, _routines(source, target, policy, capturable))
    for step in range(14):
        flags = {}
        for capturable, (source, policy, routines) in pairs.items():
            _nudge(source, policy, seed=step)
            flags[capturable] = [bool(r.step()) for r in routines]
        assert flags[True] == flags[False]
        eager, captured = pairs[False][2], pairs[True][2]
        for e, c in zip(eager, captured, strict=True):
            assert int(c.updates) == e.updates
            for a, b in zip(snapshot(_written(e)), snapshot(_written(c)), strict=True):
                assert torch.equal(a, b)
    assert all(int(r.updates) > 1 for r in pairs[True][2])


def test_capturable_state_is_the_eager_state():
    source, target = NETS["mlp"](1), NETS["mlp"](0)
    captured = rw.PolyakUpdate(source, target, tau=0.1, every=2, capturable=True)
    for _ in range(5):
        captured.step()
    state = captured.state_dict()
    assert state == {"counter": {"every": 2, "start": 0, "steps": 5}, "updates": 2, "tau": 0.1}
    eager = rw.PolyakUpdate(source, copy.deepcopy(target), tau=0.3, every=2)
    eager.load_state_dict(state)
    assert (eager.steps, eager.updates, eager.tau) == (5, 2, 0.1)
    again = rw.PolyakUpdate(source, copy.deepcopy(target), tau=0.3, every=2, capturable=True)
    again.load_state_dict(eager.state_dict())
    assert again.state_dict() == state and bool(again.step())  # step 6 is due


def test_tau_set_at_run_time_reaches_a_compiled_step():
    torch._dynamo.reset()
    source, target = NETS["mlp"](1), NETS["mlp"](0)
    routine = rw.PolyakUpdate(source, target, tau=0.5, capturable=True)
    step = torch.compile(routine.step, fullgraph=True)
    before = named(target)
    step()
    routine.tau = 0.25
    step()
    for name, t in before.items():
        once = t + 0.5 * (named(source)[name] - t)
        assert_close(named(target)[name], once + 0.25 * (named(source)[name] - once))


def test_a_function_holding_every_routine_compiles_with_fullgraph():
    """One traced graph for all five routines; it gives the eager routines' weights."""
    torch._dynamo.reset()
    built = {}
    for capturable in (False, True):
        source, target, policy = NETS["mlp"](1), NETS["mlp"](0), NETS["mlp"](2)
        built[capturable] = (source, policy, _routines(source, target, policy, capturable))

    def step_all(routines):
        for routine in routines:
            routine.step()

    compiled = torch.compile(step_all, fullgraph=True)
    for step in range(12):
        for capturable, (source, policy, routines) in built.items():
            _nudge(source, policy, seed=step)
            (compiled if capturable else step_all)(routines)
    for e, c in zip(built[False][2], built[True][2], strict=True):
        assert int(c.updates) == e.updates
        for a, b in zip(snapshot(_written(e)), snapshot(_written(c)), strict=True):
            assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_functional_ops_on_flat_layouts_compile_with_fullgraph():
    """rw.polyak_ with a tensor coefficient and rw.copy_ between two modules of one flat
    layout trace without a graph break, and write what the formula says."""
    torch._dynamo.reset()
    source, target, other = NETS["mlp"](1), NETS["mlp"](0), NETS["mlp"](3)
    for module in (source, target, other):
        rw.flatten_(module)
    t0, s0 = named(target), named(source)

    def update(tau):
        rw.polyak_(target, source, tau)
        rw.copy_(other, target)

    torch.compile(update, fullgraph=True)(torch.tensor(0.3))
    for name, t in t0.items():
        want = t.double() + 0.3 * (s0[name].double() - t.double())
        assert_close(named(target)[name].double(), want, rtol=1e-6, atol=1e-7)
        assert torch.equal(named(other)[name], named(target)[name])


def test_a_compiled_op_does_not_recompile_when_another_flattened_module_is_collected():
    """The compiled function finds a module's layout through the module, so it does not guard
    on the global table of layouts, whose keys move when an unrelated flattened module (an
    evaluation copy, a test's network) is collected: that recompiled the step, and a
    collection during a compile failed the guard (a flaky CI failure)."""
    import gc

    torch._dynamo.reset()
    others = [NETS["mlp"](9 + i) for i in range(3)]
    source, target = NETS["mlp"](1), NETS["mlp"](0)
    for module in (*others, source, target):
        rw.flatten_(module)
    compiles = []

    def count(graph, example_inputs):
        compiles.append(graph)
        return graph

    step = torch.compile(lambda tau: rw.polyak_(target, source, tau), fullgraph=True, backend=count)
    step(torch.tensor(0.3))
    del others[:]
    gc.collect()
    t0 = named(target)
    step(torch.tensor(0.5))
    assert len(compiles) == 1
    for name, t in t0.items():
        want = t.double() + 0.5 * (named(source)[name].double() - t.double())
        assert_close(named(target)[name].double(), want, rtol=1e-6, atol=1e-7)


def test_a_copy_or_pickle_of_a_flattened_module_has_no_layout_of_its_own():
    import pickle

    from rlweights.flat import registered_layout

    net = NETS["mlp"](0)
    layout = rw.flatten_(net)
    assert registered_layout(net) is layout
    for clone in (copy.deepcopy(net), copy.copy(net), pickle.loads(pickle.dumps(net))):
        assert registered_layout(clone) is None
        assert torch.equal(clone[0].weight, net[0].weight)
    assert rw.flatten_(copy.deepcopy(net)) is not layout


class _Critic(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x)


def _training(capturable: bool):
    """A DQN-like gradient step on a flattened online network: TD loss through the target,
    Adam, then a Polyak target, a hard-copied second target (every 7 steps) and an EMA."""
    online = _Critic(0)
    target, hard = rw.make_target(online), rw.make_target(online)
    optimizer = torch.optim.Adam(online.parameters(), lr=1e-3)
    polyak = rw.PolyakUpdate(online, target, tau=0.05, capturable=capturable)
    copy_every = rw.HardUpdate(online, hard, every=7, capturable=capturable)
    ema = rw.EMA(online, tau=0.02, warmup=True, capturable=capturable)

    def step(x, y):
        with torch.no_grad():
            bootstrap = torch.minimum(target(x), hard(x))
        loss = (online(x) - (y + 0.9 * bootstrap)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        polyak.step()
        copy_every.step()
        ema.update()
        return loss.detach()

    return step, (online, target, hard, ema.averaged), (polyak, copy_every, ema)


def test_a_compiled_training_step_breaks_nowhere_in_rlweights_and_matches_eager():
    """Backward and the optimizer step break the graph in this torch; rlweights must not.
    Over 120 steps (the hard copy fires 17 times; tau changes at step 60) the compiled run
    with capturable routines stays with the eager run with the eager routines."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 4, generator=gen), torch.randn(32, 1, generator=gen))]
    batches += [(torch.randn(32, 4, generator=gen), torch.randn(32, 1, generator=gen))]

    probe, _, _ = _training(capturable=True)
    explained = torch._dynamo.explain(probe)(*batches[0])
    inside = [
        reason.reason
        for reason in explained.break_reasons
        if any(frame.filename.startswith(RLWEIGHTS) for frame in reason.user_stack)
    ]
    assert inside == [], inside

    torch._dynamo.reset()
    eager_step, eager_nets, eager_routines = _training(capturable=False)
    step, nets, routines = _training(capturable=True)
    compiled = torch.compile(step)
    for i in range(120):
        if i == 60:
            eager_routines[0].tau = routines[0].tau = 0.2
        x, y = batches[i % 2]
        assert_close(compiled(x, y), eager_step(x, y), rtol=1e-4, atol=1e-5)
    assert int(routines[1].updates) == eager_routines[1].updates == 120 // 7
    for got, want in zip(nets, eager_nets, strict=True):
        for a, b in zip(snapshot(got), snapshot(want), strict=True):
            assert_close(a, b, rtol=1e-4, atol=1e-5)
    online, _, hard, _ = nets
    for name, t in named(hard).items():  # the last copy (step 119) made hard = online then
        assert not torch.equal(t, named(online)[name])


def test_a_changed_layout_is_refused_and_nothing_is_written():
    source, target = NETS["mlp"](1), NETS["mlp"](0)
    polyak_target = rw.make_target(source)
    rw.polyak_(polyak_target, source, 0.0)  # the eager ops' plan of the pair is made first
    routine = rw.PolyakUpdate(source, polyak_target, tau=0.5, capturable=True)
    hard = rw.HardUpdate(source, target, every=1, capturable=True)
    # new Parameter objects: the flat layout breaks, and the routines' tensors are not the
    # module's any more
    source.load_state_dict(copy.deepcopy(source.state_dict()), assign=True)
    before = snapshot(routine.target), snapshot(target)
    for r in (routine, hard):
        with pytest.raises(rw.LayoutChangedError, match=rf"^{type(r).__name__}: .*build it again"):
            r.step()
        with pytest.raises(rw.LayoutChangedError):
            r.check()
    assert all(torch.equal(a, b) for a, b in zip(before[0], snapshot(routine.target), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(before[1], snapshot(target), strict=True))
    assert int(routine.updates) == 0 and routine.steps == 0
    rw.flatten_(source)  # as the warning of the broken layout says; then build them again
    polyak = rw.PolyakUpdate(source, routine.target, tau=0.5, capturable=True)
    for rebuilt in (polyak, rw.HardUpdate(source, routine.target, capturable=True)):
        assert bool(rebuilt.step())
    assert all(
        torch.equal(a, b) for a, b in zip(snapshot(source), snapshot(routine.target), strict=True)
    )


def test_what_needs_the_host_every_update_is_refused_when_capturable():
    source, target = NETS["mlp"](1), NETS["mlp"](0)
    with pytest.raises(ValueError, match="schedule"):
        rw.PolyakUpdate(source, target, tau=lambda n: 0.1, capturable=True)
    for make in (rw.PolyakUpdate, rw.HardUpdate):
        kwargs = {"tau": 0.1} if make is rw.PolyakUpdate else {}
        with pytest.raises(ValueError, match="nonfinite='raise'"):
            make(source, target, nonfinite="raise", capturable=True, **kwargs)
    routine = rw.PolyakUpdate(source, target, tau=0.1, capturable=True)
    with pytest.raises(ValueError, match="schedule"):
        routine.tau = lambda n: 0.2
    with pytest.raises(ValueError, match="tau"):
        routine.tau = 1.5
    assert routine.state_dict()["tau"] == 0.1


def test_skip_leaves_the_target_when_a_source_is_not_finite_without_a_host_sync():
    source, target = NETS["mlp"](1), NETS["mlp"](0)
    routine = rw.PolyakUpdate(source, target, tau=0.5, nonfinite="skip", capturable=True)
    before = snapshot(target)
    with torch.no_grad():
        next(source.parameters())[0, 0] = float("nan")
    assert bool(routine.step())  # due, but skipped: the target keeps its weights
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(target), strict=True))


def _constraints(capturable: bool) -> list:
    c = rw.constraints
    return [
        c.Clamp(-0.05, 0.08, capturable=capturable),
        c.NonNeg(capturable=capturable),
        c.MaxNorm(0.3, capturable=capturable),
        c.UnitNorm(capturable=capturable),
        c.UnitSphere(dim=None, capturable=capturable),
        c.InitClip(0.5, capturable=capturable),
    ]


@pytest.mark.parametrize("flat", [False, True])
def test_capturable_constraints_give_the_eager_results(flat):
    for eager, captured in zip(_constraints(False), _constraints(True), strict=True):
        nets = [NETS["mlp"](4), NETS["mlp"](4)]
        if flat:
            for net in nets:
                rw.flatten_(net)
        optimizers = [torch.optim.SGD(net.parameters(), lr=0.5) for net in nets]
        x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
        for net, optimizer, constraint in zip(nets, optimizers, (eager, captured), strict=True):
            rw.constrain(optimizer, net, constraint)
            net(x).sum().backward()
            optimizer.step()
        for a, b in zip(snapshot(nets[0]), snapshot(nets[1]), strict=True):
            assert torch.equal(a, b), eager
        with torch.no_grad():  # off the constraint again, then project directly
            for net in nets:
                for t in net.parameters():
                    t.mul_(-3.0).add_(0.01)
        before = snapshot(nets[0])
        captured(nets[1])  # called directly: binds on first use, then the same projection
        eager(nets[0])
        assert any(not torch.equal(a, b) for a, b in zip(before, snapshot(nets[0]), strict=True))
        for a, b in zip(snapshot(nets[0]), snapshot(nets[1]), strict=True):
            assert torch.equal(a, b), eager


def test_bound_constraints_compile_with_fullgraph_and_refuse_a_changed_layout():
    torch._dynamo.reset()
    nets = [NETS["mlp"](4), NETS["mlp"](4)]
    rw.flatten_(nets[0])
    with torch.no_grad():
        for net in nets:
            for p in net.parameters():
                p.mul_(3.0)
    bound = [c.bind(nets[0]) for c in _constraints(True)[2:]]  # the norms, InitClip

    def project():
        for b in bound:
            b()

    torch.compile(project, fullgraph=True)()
    for c in _constraints(False)[2:]:
        c(nets[1])
    for a, b in zip(snapshot(nets[0]), snapshot(nets[1]), strict=True):
        assert_close(a, b, rtol=1e-6, atol=1e-7)
    nets[0].load_state_dict(copy.deepcopy(nets[0].state_dict()), assign=True)
    with pytest.raises(rw.LayoutChangedError):
        bound[0]()


def _replace(change: str, module: nn.Module) -> None:
    """Give ``module`` new tensors, as a user would: a reload with assign=True, a replaced
    Parameter, a replaced layer."""
    if change == "assign":
        module.load_state_dict(copy.deepcopy(module.state_dict()), assign=True)
    elif change == "parameter":
        module[0].weight = nn.Parameter(module[0].weight.detach().clone())
    else:
        module[0] = copy.deepcopy(module[0])


@pytest.mark.parametrize(
    ("change", "side", "backend", "fullgraph"),
    [
        ("assign", "target", "aot_eager", True),
        ("parameter", "source", "aot_eager", False),
        ("layer", "target", "eager", True),
        ("assign", "source", "inductor", True),
    ],
)
def test_a_compiled_function_refuses_weights_that_moved_instead_of_writing_stale_ones(
    change, side, backend, fullgraph
):
    """The routines resolved their tensors when built; a function compiled around them kept
    writing (and reading) the old tensors after the weights were replaced, silently. The
    first call after the change raises (LayoutChangedError; under fullgraph=True torch's own
    error carrying its message) and writes nothing."""
    torch._dynamo.reset()
    source = NETS["mlp"](1)
    target, policy = rw.make_target(source), NETS["mlp"](2)
    constrained = NETS["mlp"](3)
    routines = [
        rw.PolyakUpdate(source, target, tau=0.5, capturable=True),
        rw.HardUpdate(source, copy.deepcopy(target), every=2, capturable=True),
        rw.EMA(policy, tau=0.1, capturable=True),
        rw.constraints.MaxNorm(0.5, capturable=True).bind(constrained),
    ]

    def step():
        for r in routines:
            r() if isinstance(r, rw.constraints.BoundConstraint) else r.step()

    compiled = torch.compile(step, backend=backend, fullgraph=fullgraph)
    compiled()
    was = snapshot(source)  # the target is the source now (tau 0.5 from equal weights)
    _nudge(source, seed=0)
    compiled()
    for t, a, b in zip(snapshot(target), was, snapshot(source), strict=True):
        assert_close(t, a + 0.5 * (b - a))
    for moved in (source if side == "source" else target, policy, constrained):
        _replace(change, moved)
    written = [target, routines[1].target, routines[2].averaged, constrained]
    before = [snapshot(m) for m in written]
    error = rw.LayoutChangedError if not fullgraph else torch._dynamo.exc.Unsupported
    with pytest.raises(error, match=r"moved since.*build it again"):
        compiled()
    for module, was in zip(written, before, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(was, snapshot(module), strict=True))


class _Unhashable(nn.Linear):
    """A module that defines equality and so cannot be hashed (nothing may hash it)."""

    def __init__(self):
        super().__init__(2, 2)

    def __eq__(self, other):
        return isinstance(other, _Unhashable)


def test_a_compiled_function_is_not_traced_again_for_unrelated_modules():
    """The guard watches the routine's own modules: building other networks does not retrace
    the step; registering a module's own Parameter again retraces it once, and it goes on."""
    torch._dynamo.reset()
    source = NETS["mlp"](1)
    target = rw.make_target(source)
    routine = rw.PolyakUpdate(source, target, tau=0.5, capturable=True)
    compiles = []

    def count(graph, example_inputs):
        compiles.append(graph)
        return graph

    compiled = torch.compile(routine.step, backend=count, fullgraph=True)
    compiled()
    for build in (lambda: NETS["cnn_bn"](5), lambda: nn.Linear(3, 3), _Unhashable):
        build()  # other networks: their tensors are registered
    compiled()
    assert len(compiles) == 1
    source[0].weight = source[0].weight  # the same Parameter registered again
    was = snapshot(target)
    _nudge(source, seed=1)
    compiled()
    assert len(compiles) == 2
    for t, a, b in zip(snapshot(target), was, snapshot(source), strict=True):
        assert_close(t, a + 0.5 * (b - a))


@pytest.mark.parametrize("op", ["polyak_", "copy_"])
def test_a_compiled_functional_op_writes_the_weights_that_replaced_a_flat_layout(op):
    """rw.polyak_ / rw.copy_ between flat layouts trace through the layouts' views; after
    load_state_dict(assign=True) the compiled function kept writing the old views, silently.
    It is traced again and takes the eager path: the new tensors get the update."""
    torch._dynamo.reset()
    source = NETS["mlp"](1)
    target = rw.make_target(source)
    _nudge(source, seed=2)

    def update(tau):
        if op == "polyak_":
            rw.polyak_(target, source, tau)
        else:
            rw.copy_(target, source)

    compiled = torch.compile(update, backend="aot_eager")
    compiled(torch.tensor(0.5))
    target.load_state_dict(copy.deepcopy(target.state_dict()), assign=True)
    _nudge(source, seed=3)
    was = snapshot(target)
    with pytest.warns(rw.FlatLayoutWarning):
        compiled(torch.tensor(0.5))
    share = 0.5 if op == "polyak_" else 1.0
    for t, a, b in zip(snapshot(target), was, snapshot(source), strict=True):
        assert_close(t, a + share * (b - a))
