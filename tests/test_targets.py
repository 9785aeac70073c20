"""make_target and the stateful target-update routines."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import NETS, assert_unchanged, named, snapshot
from torch import nn
from torch.testing import assert_close

import rlweights as rw
from rlweights import ops
from rlweights.periodic import Periodic


def test_make_target_is_a_frozen_flat_copy():
    online = NETS["cnn_bn"](0)
    params = list(online.parameters())
    target = rw.make_target(online)
    assert target is not online
    assert all(not p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in online.parameters())
    assert not target.training and online.training
    assert all(a is b for a, b in zip(online.parameters(), params, strict=True))
    for (n, a), b in zip(online.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
        assert a.numel() == 0 or a.data_ptr() != b.data_ptr()
    assert ops.pair_plan(target, online, "t").flat  # the pair takes the fast path


def test_make_target_keeps_layouts_made_for_other_modules():
    import warnings

    from torch import nn

    # A submodule flattened on its own (as rlweights.sb3.attach does), then the whole.
    policy = nn.ModuleDict({"actor": NETS["mlp"](0), "critic": NETS["mlp"](1)})
    actor_layout = rw.flatten_(policy["actor"])
    # A module that is part of a larger flattened network (TD3's actor and critic).
    shared = nn.ModuleDict({"actor": NETS["mlp"](2), "critic": NETS["mlp"](3)})
    shared_layout = rw.flatten_(shared)
    with warnings.catch_warnings():
        warnings.simplefilter("error", rw.FlatLayoutWarning)
        for module, layout in ((policy, actor_layout), (shared["actor"], shared_layout)):
            want = {n: t.detach().double().clone() for n, t in module.state_dict().items()}
            target = rw.make_target(module)
            assert rw.flat.layout_of(target) is not None  # the copy is flat
            assert layout.intact and rw.flat.layout_of(layout) is layout
            with torch.no_grad():
                for p in module.parameters():
                    p.add_(1.0)
            rw.polyak_(target, module, 0.25)
            for name, t in target.state_dict().items():
                assert_close(t.double(), want[name] + 0.25, rtol=1e-6, atol=1e-6)
    # A module of its own is flattened as before (the fast path).
    lone = NETS["mlp"](4)
    rw.make_target(lone)
    assert rw.flat.layout_of(lone) is not None


def _gradient_step(net, opt):
    net.train()
    opt.zero_grad()
    net(torch.randn(8, 2, 6, 6)).pow(2).mean().backward()
    opt.step()


def test_polyak_update_tracks_a_float64_reference_over_training():
    online = NETS["cnn_bn"](0)
    target = rw.make_target(online)
    opt = torch.optim.SGD(online.parameters(), lr=0.1)
    update = rw.PolyakUpdate(online, target, tau=0.1)
    ref = named(target)
    for _ in range(5):
        _gradient_step(online, opt)
        assert update.step()
        src = named(online)
        for name, s in src.items():
            if name in dict(online.named_parameters()):
                ref[name] = ref[name] + 0.1 * (s - ref[name])
            else:
                ref[name] = s  # buffers hard-copied, as SB3 does
    got = named(target)
    for name, want in ref.items():
        assert_close(got[name], want, rtol=1e-6, atol=1e-7)
    assert update.state_dict() == {
        "counter": {"every": 1, "start": 0, "steps": 5},
        "updates": 5,
        "tau": 0.1,
    }


def test_tau_can_change_at_run_time_and_zero_freezes():
    online, target = NETS["mlp"](0), NETS["mlp"](1)
    update = rw.PolyakUpdate(online, target, tau=0.5)
    update.tau = 0.0
    before = snapshot(target)
    update.step()
    assert_unchanged(before, target)
    update.tau = 1.0
    update.step()
    assert rw.distance(online, target).item() == 0.0
    with pytest.raises(ValueError, match="outside"):
        update.tau = 2.0
    assert update.tau == 1.0


def test_hard_update_copies_exactly_every_k_steps_and_never_between():
    online = NETS["mlp"](0)
    target = rw.make_target(online)
    opt = torch.optim.SGD(online.parameters(), lr=0.1)
    update = rw.HardUpdate(online, target, every=3)
    last_copy = snapshot(target)
    for step in range(1, 10):
        online(torch.randn(4, 5)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        did = update.step()
        assert did == (step % 3 == 0)
        if did:
            assert rw.distance(online, target).item() == 0.0
            last_copy = snapshot(target)
        else:
            assert_unchanged(last_copy, target)
    assert update.updates == 3


def test_state_dict_round_trip_and_atomic_load():
    online, target = NETS["mlp"](0), NETS["mlp"](1)
    update = rw.PolyakUpdate(online, target, tau=0.2, every=2)
    for _ in range(5):
        update.step()
    state = update.state_dict()
    fresh = rw.PolyakUpdate(online, target, tau=0.9, every=2)
    fresh.load_state_dict(state)  # tau is taken from the state, as a run-time setting
    assert fresh.state_dict() == state
    assert [fresh.step() for _ in range(3)] == [update.step() for _ in range(3)]  # same phase
    state = fresh.state_dict()
    hard = rw.HardUpdate(online, target, every=4)
    hard.step()
    copy_state = hard.state_dict()
    other = rw.HardUpdate(online, target, every=4)
    other.load_state_dict(copy_state)
    assert other.state_dict() == copy_state
    assert copy_state == {"counter": {"every": 4, "start": 0, "steps": 1}, "updates": 0}
    counter = state["counter"]
    for bad, msg in [
        ({"counter": counter, "steps": 0}, "expected keys"),
        ({**state, "counter": {"every": 2, "steps": 0}}, "expected keys"),
        ({**state, "counter": {**counter, "steps": -1}}, "steps must be an int >= 0"),
        ({**state, "counter": {**counter, "every": 0}}, "every must be an int >= 1"),
        ({**state, "counter": {**counter, "every": 1}}, "has every=1, this one every=2"),
        ({**state, "counter": {**counter, "start": 3}}, "has start=3, this one start=0"),
        ({**state, "updates": True}, "updates must be an int >= 0"),
        ({**state, "tau": 3.0}, "outside"),
        ([1, 2], "expected keys"),
    ]:
        with pytest.raises(ValueError, match=msg):
            fresh.load_state_dict(bad)
        assert fresh.state_dict() == state  # unchanged
    with pytest.raises(ValueError, match=r"every=4, this one every=1; build it with every=4"):
        rw.HardUpdate(online, target).load_state_dict(copy_state)  # every is not adopted
    assert "PolyakUpdate(Sequential -> Sequential, tau=0.2, every=2" in repr(fresh)
    assert "HardUpdate(Sequential -> Sequential, every=4" in repr(other)


def test_periodic_counts_due_steps_and_saves_one_format():
    every3 = Periodic(3)
    assert [every3.step() for _ in range(7)] == [False, False, True, False, False, True, False]
    assert every3.fired == 2 and every3.steps == 7
    late = Periodic(2, start=3, name="SWA")
    assert [late.step() for _ in range(7)] == [False, False, False, False, True, False, True]
    assert repr(late) == "Periodic(every=2, start=3, steps=7)"
    # Several steps at once (n vectorised envs): due when a multiple was crossed.
    batched = Periodic(5)
    assert [batched.step(4) for _ in range(5)] == [False, True, True, True, True]
    assert batched.steps == 20 and batched.fired == 4
    assert not batched.step(0)
    with pytest.raises(ValueError, match=r"Periodic.step: n must be an int >= 0, got -1"):
        batched.step(-1)
    assert batched.steps == 20
    for make, msg in [
        (lambda: Periodic(0, name="HardUpdate"), r"HardUpdate: every must be an int >= 1, got 0"),
        (lambda: Periodic(2.0), r"every must be an int >= 1, got 2.0"),
        (lambda: Periodic(True), r"every must be an int >= 1, got True"),
        (lambda: Periodic(2, start=-1), r"start must be an int >= 0, got -1"),
    ]:
        with pytest.raises(ValueError, match=msg):
            make()
    # The counter part of every routine's state is this one dict.
    state = late.state_dict()
    assert state == {"every": 2, "start": 3, "steps": 7}
    again = Periodic(2, start=3)
    again.load_state_dict(state)
    assert again.state_dict() == state
    assert [again.step() for _ in range(3)] == [late.step() for _ in range(3)]  # same phase
    with pytest.raises(ValueError, match=r"has every=2, this one every=4; build it with every=2"):
        Periodic(4, start=3).load_state_dict(state)
    assert again.state_dict() == {**state, "steps": 10}
    for routine in (
        rw.HardUpdate(every=2),
        rw.PolyakUpdate(tau=0.1, every=2),
        rw.EMA(NETS["mlp"](0), tau=0.1, every=2),
        rw.SWA(NETS["mlp"](0), every=2),
        rw.distributed.PeriodicAverager(NETS["mlp"](0), every=2),
    ):
        assert isinstance(routine.counter, Periodic) and routine.counter.every == 2
    online, target = NETS["mlp"](0), NETS["mlp"](1)
    late_copy = rw.HardUpdate(online, target, every=2, start=3)
    assert [late_copy.step() for _ in range(7)] == [False] * 4 + [True, False, True]
    assert rw.distance(online, target).item() == 0.0
    assert repr(late_copy).endswith("every=2, start=3, steps=7, updates=2)")
    assert late_copy.bind(target, online).counter.state_dict() == {
        "every": 2,
        "start": 3,
        "steps": 0,
    }


def test_tensor_tau_routine():
    online, target = NETS["mlp"](0), NETS["mlp"](1)
    t0, s0 = named(target), named(online)
    update = rw.PolyakUpdate(online, target, tau=torch.tensor(0.25))
    update.step()
    for name, want in t0.items():
        assert_close(named(target)[name], want + 0.25 * (s0[name] - want))
    assert "tau=<tensor>" in repr(update)


def test_templates_bind_to_pairs_and_schedules_drive_tau():
    online = NETS["mlp"](0)
    target = rw.make_target(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    template = rw.PolyakUpdate(tau=lambda n: [0.5, 0.25][n % 2])
    assert "unbound" in repr(template) and "<schedule>" in repr(template)
    with pytest.raises(ValueError, match="has no source and target"):
        template.step()
    bound = template.bind(online, target)
    assert bound is not template and template.source is None
    t0, s0 = named(target), named(online)
    bound.step()  # tau 0.5
    bound.step()  # tau 0.25
    for name, t in t0.items():
        once = t + 0.5 * (s0[name] - t)
        assert_close(named(target)[name], once + 0.25 * (s0[name] - once))
    assert bound.state_dict()["tau"] is None  # a schedule is code, not state
    bad = rw.PolyakUpdate(online, target, tau=lambda n: 2.0)
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"tau \(from the schedule\)=2.0 is outside"):
        bad.step()
    assert_unchanged(before, target)
    with pytest.raises(ValueError, match="pass both source and target, or neither"):
        rw.HardUpdate(online, None)
    with pytest.raises(ValueError, match="tau is required"):
        rw.PolyakUpdate(online, target)
    hard = rw.HardUpdate(every=2).bind(online, target)
    assert [hard.step(), hard.step()] == [False, True]
    assert rw.distance(online, target).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_tau_too_small_for_the_dtype_is_warned_about_naming_the_smallest_that_moves(dtype):
    """bfloat16 targets at tau=1e-3 barely moved (round-to-nearest kept most weights where
    they were), without a word. The bound named is where the update starts moving a weight
    whose source is its own size away (1 -> 2)."""
    bound = torch.finfo(dtype).eps / 2
    ones, twos = torch.ones(64, dtype=dtype), torch.full((64,), 2.0, dtype=dtype)
    for tau, moves in ((0.9 * bound, False), (1.1 * bound, True)):
        target = ones.clone()
        rw.polyak_(target, twos, tau)
        assert bool((target != ones).all()) is moves
    source = nn.Linear(8, 8).to(dtype)
    target = rw.make_target(source)
    name = str(dtype).removeprefix("torch.")
    with pytest.warns(
        rw.PrecisionWarning, match=rf"tau=0.0001 is below {bound:.2g}, half the {name}"
    ):
        routine = rw.PolyakUpdate(source, target, tau=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        routine.tau = 0.01
        rw.PolyakUpdate(nn.Linear(8, 8), rw.make_target(nn.Linear(8, 8)), tau=1e-4)  # float32
        template = rw.PolyakUpdate(tau=1e-4)  # no weights yet: nothing to say
    with pytest.warns(rw.PrecisionWarning, match="PolyakUpdate: tau=0.0002"):
        routine.tau = 2e-4
    with pytest.warns(rw.PrecisionWarning, match="PolyakUpdate: tau=0.0001"):
        template.bind(source, target)
    with pytest.warns(rw.PrecisionWarning, match="EMA: tau=0.0001"):
        rw.EMA(source, tau=1e-4)
