"""Bad input raises a clear error and leaves every tensor bit-identical (atomic validation)."""

from __future__ import annotations

import pytest
import torch
from conftest import NETS, assert_unchanged, make_pair, snapshot
from torch import nn

import rlweights as rw


@pytest.fixture(params=[True, False], ids=["flat", "plain"])
def pair(request):
    target, source = make_pair("cnn_bn")
    if request.param:
        rw.make_target(source)  # flattens the source too
        rw.flatten_(target)
    return target, source


def _all_ops(target, source):
    """Every writing op applied to (target, source)."""
    return [
        lambda: rw.polyak_(target, source, 0.5),
        lambda: rw.copy_(target, source),
        lambda: rw.average_(target, [source, target]),
    ]


def test_mismatched_names_name_the_tensors(pair):
    target, _ = pair
    other = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    before = snapshot(target)
    for op in _all_ops(target, other):
        with pytest.raises(
            rw.WeightMismatchError, match=r"missing from source: '4.weight', '4.bias'"
        ):
            op()
    assert_unchanged(before, target)


def test_mismatched_shapes_dtypes_devices_name_the_tensors(pair):
    target, _ = pair
    wider = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5)
    )
    before = snapshot(target)
    for op in _all_ops(target, wider):
        with pytest.raises(
            rw.WeightMismatchError, match=r"'4.weight' shape \(3, 64\) vs \(5, 64\)"
        ):
            op()
    doubled = NETS["cnn_bn"](3).double()
    for op in _all_ops(target, doubled):
        with pytest.raises(
            rw.WeightMismatchError, match=r"'0.weight' dtype torch.float32 vs torch.float64"
        ):
            op()
    elsewhere = NETS["cnn_bn"](3).to("meta")
    for op in _all_ops(target, elsewhere):
        with pytest.raises(rw.WeightMismatchError, match=r"'0.weight' device cpu vs meta"):
            op()
    assert_unchanged(before, target)


def test_sequence_counts_and_late_mismatch_are_atomic():
    targets = [torch.randn(3), torch.randn(4, 2), torch.randn(5)]
    before = snapshot(targets)
    with pytest.raises(rw.WeightMismatchError, match=r"target has 3 tensors but source has 2"):
        rw.polyak_(targets, [torch.randn(3), torch.randn(4, 2)], 0.5)
    # The first two pairs are fine; the last one is not: nothing may be written.
    with pytest.raises(rw.WeightMismatchError, match=r"'2' shape \(5,\) vs \(6,\)"):
        rw.polyak_(targets, [torch.randn(3), torch.randn(4, 2), torch.randn(6)], 0.5)
    with pytest.raises(rw.WeightMismatchError, match=r"'2' dtype torch.float32 vs torch.float16"):
        rw.copy_(targets, [torch.randn(3), torch.randn(4, 2), torch.randn(5).half()])
    assert_unchanged(before, targets)


def test_integer_tensors_where_floats_are_needed():
    targets = [torch.randn(3), torch.arange(4)]
    sources = [torch.randn(3), torch.arange(4) + 1]
    before = snapshot(targets)
    with pytest.raises(
        rw.WeightMismatchError, match=r"tensor '1' is torch.int64, but polyak_ needs"
    ):
        rw.polyak_(targets, sources, 0.5)
    with pytest.raises(
        rw.WeightMismatchError, match=r"tensor '1' is torch.int64, but average_ needs"
    ):
        rw.average_(targets, [sources])
    with pytest.raises(
        rw.WeightMismatchError, match=r"tensor '1' is torch.int64, but clamp_ needs"
    ):
        rw.clamp_(targets, -1, 1)
    assert_unchanged(before, targets)
    rw.copy_(targets, sources)  # copying integers is well defined
    assert torch.equal(targets[1], sources[1])


@pytest.mark.parametrize(
    ("tau", "msg"),
    [
        (-0.1, r"tau=-0.1 is outside \[0, 1\]"),
        (1.5, r"tau=1.5 is outside \[0, 1\]"),
        (float("nan"), r"tau=nan is outside \[0, 1\]"),
        ("0.1", r"tau must be a float in \[0, 1\], got '0.1'"),
        (True, r"tau must be a float in \[0, 1\], got True"),
        (torch.tensor([0.1]), r"0-dim floating tensor, got a torch.float32 tensor of shape \(1,\)"),
        (torch.tensor(1), r"got a torch.int64 tensor"),
    ],
)
def test_bad_tau(pair, tau, msg):
    target, source = pair
    before = snapshot(target)
    with pytest.raises(ValueError, match=msg):
        rw.polyak_(target, source, tau)
    with pytest.raises(
        ValueError, match=msg.replace("tau=", "tau=").replace("tau must", "tau must")
    ):
        rw.PolyakUpdate(source, target, tau)
    assert_unchanged(before, target)


def test_bad_modes_and_bounds(pair):
    target, source = pair
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"buffers='lerp' is not one of 'copy', 'polyak', 'skip'"):
        rw.polyak_(target, source, 0.5, buffers="lerp")
    with pytest.raises(ValueError, match=r"nonfinite='ignore' is not one of"):
        rw.copy_(target, source, nonfinite="ignore")
    with pytest.raises(ValueError, match=r"min=1.0 is greater than max=-1.0"):
        rw.clamp_(target, 1.0, -1.0)
    with pytest.raises(ValueError, match=r"min must be a number or None, got nan"):
        rw.clamp_(target, float("nan"), 1.0)
    with pytest.raises(ValueError, match=r"give min, max or both"):
        rw.clamp_(target)
    with pytest.raises(ValueError, match=r"max_norm must be a number >= 0, got nan"):
        rw.max_norm_(target, float("nan"))
    assert_unchanged(before, target)


def test_wrong_argument_types():
    net = NETS["mlp"](0)
    with pytest.raises(TypeError, match=r"target is a int: expected an nn.Module"):
        rw.polyak_(3, net, 0.5)
    with pytest.raises(TypeError, match=r"source\[1\] is a str, not a tensor"):
        rw.polyak_(list(net.parameters())[:2], [torch.randn(16, 5), "x"], 0.5)
    with pytest.raises(TypeError, match="sources must be a sequence of weight sets"):
        rw.average_(net, net)
    with pytest.raises(ValueError, match=r"include=/exclude= select tensors by name"):
        rw.copy_(list(net.parameters()), list(net.parameters()), include="0.*")


def test_make_target_and_routines_validate():
    net = NETS["mlp"](0)
    with pytest.raises(TypeError, match=r"make_target takes an nn\.Module"):
        rw.make_target([torch.randn(2)])
    target = rw.make_target(net)
    for every in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"every must be an int >= 1"):
            rw.HardUpdate(net, target, every)
    with pytest.raises(ValueError, match=r"buffers='x' is not one of"):
        rw.PolyakUpdate(net, target, 0.1, buffers="x")
    # A mismatched pair is refused when the routine is made, not at its first due step.
    with pytest.raises(rw.WeightMismatchError, match=r"HardUpdate: target and source hold"):
        rw.HardUpdate(net, NETS["cnn_bn"](0)[4:], every=1000)


def test_plain_module_changes_are_seen_between_calls():
    """Entries of plain modules are cached; casts and new tensors must still be seen."""
    target, source = make_pair("mlp")
    rw.polyak_(target, source, 0.5)
    target.double()
    with pytest.raises(rw.WeightMismatchError, match=r"dtype torch.float64 vs torch.float32"):
        rw.polyak_(target, source, 0.5)
    source.double()
    rw.polyak_(target, source, 1.0)
    assert rw.distance(target, source).item() == 0.0
    source.extra = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(rw.WeightMismatchError, match=r"only in source: 'extra'"):
        rw.polyak_(target, source, 0.5)
    target[0].weight = nn.Parameter(torch.ones(16, 5, dtype=torch.float64))
    source.extra = None  # unregistering keeps the attribute name, with no tensor
    rw.polyak_(target, source, 1.0)
    assert torch.equal(target[0].weight, source[0].weight)


@pytest.mark.parametrize("flat", [False, True], ids=["plain", "flat"])
@pytest.mark.parametrize(
    "call",
    [lambda w: rw.clamp_(w, -0.1, 0.1), lambda w: rw.max_norm_(w, 0.01)],
    ids=["clamp_", "max_norm_"],
)
def test_constraints_refuse_complex_tensors_before_writing(call, flat):
    """Issue 13: a float tensor was clamped, then the complex one raised NotImplementedError."""
    torch.manual_seed(0)
    net = nn.Module()
    net.real = nn.Parameter(torch.randn(4, 3))
    net.cplx = nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    if flat:
        rw.flatten_(net)
    sets = [net] if flat else [net, [net.real.detach(), net.cplx.detach()]]
    for weights in sets:
        before = [p.detach().clone() for p in net.parameters()]
        with pytest.raises(rw.WeightMismatchError, match=r"complex64.*real floating-point"):
            call(weights)
        for p, b in zip(net.parameters(), before, strict=True):
            assert torch.equal(p.detach(), b)


@pytest.mark.parametrize(
    "call",
    [
        lambda t, s: rw.polyak_(t, s, 0.5),
        lambda t, s: rw.copy_(t, s),
        lambda t, s: rw.average_(t, [s, s]),
    ],
    ids=["polyak_", "copy_", "average_"],
)
@pytest.mark.parametrize("case", ["shifted-view", "swapped", "state_dict", "modules"])
def test_a_target_sharing_memory_with_a_source_is_refused_before_writing(call, case):
    """Issue 13: polyak_([t0, x[1:]], [ones, x[:-1]]) wrote t0, then raised RuntimeError."""
    torch.manual_seed(0)
    x, t0, a, b = torch.randn(3), torch.zeros(2), torch.randn(2), torch.randn(2)
    if case == "shifted-view":  # target 1 partially overlaps source 1
        target, source = [t0, x[1:]], [torch.ones(2), x[:-1]]
    elif case == "swapped":  # each target is the other pair's source
        target, source = [a, b], [b, a]
    elif case == "state_dict":  # a state_dict whose tensor is a view of the target's
        target, source = {"w": x[1:]}, {"w": x[:-1]}
    else:  # two modules whose Parameters are overlapping views of one tensor
        target, source = nn.Module(), nn.Module()
        target.w, target.v = nn.Parameter(t0), nn.Parameter(x[1:])
        source.w, source.v = nn.Parameter(torch.ones(2)), nn.Parameter(x[:-1])
    tensors = [x, t0, a, b]
    before = [t.clone() for t in tensors]
    with pytest.raises(rw.WeightMismatchError, match="share memory"):
        call(target, source)
    for t, b0 in zip(tensors, before, strict=True):
        assert torch.equal(t, b0)


def test_a_target_that_is_its_own_source_is_allowed():
    x = torch.randn(4)
    want = x.clone()
    rw.polyak_([x], [x], 0.3)
    rw.average_([x], [[x], [x.clone()]])
    assert torch.equal(x, want)


def _expanded_bias() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Linear(4, 3)
    m.bias = nn.Parameter(torch.zeros(1).expand(3))
    return m


_WRITERS = {
    "polyak_": lambda w, s: rw.polyak_(w, s, 0.5),
    "copy_": lambda w, s: rw.copy_(w, s),
    "average_": lambda w, s: rw.average_(w, [s, s]),
    "clamp_": lambda w, s: rw.clamp_(w, -0.01, 0.01),
    "max_norm_": lambda w, s: rw.max_norm_(w, 0.01),
    "shrink_perturb_": lambda w, s: rw.shrink_perturb_(w, 0.5, 0.5),
}


@pytest.mark.parametrize("op", list(_WRITERS))
@pytest.mark.parametrize("form", ["module", "list", "strided"])
def test_a_target_whose_elements_overlap_is_refused_before_writing(op, form):
    """An expanded (stride-0) target: the weight was written, then torch raised its own error."""
    if form != "module" and op == "shrink_perturb_":
        pytest.skip("shrink_perturb_ takes a module")
    m = _expanded_bias()
    source = nn.Linear(4, 3)
    if form == "module":
        target = m
    elif form == "list":
        target, source = [m.weight, m.bias], [source.weight.detach(), source.bias.detach()]
    else:  # elements overlap without a zero stride
        base = torch.randn(4)
        target = [m.weight, base.as_strided((2, 2), (1, 1))]
        source = [source.weight.detach(), torch.randn(2, 2)]
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(rw.WeightMismatchError, match=r"elements that share memory.*\.clone\(\)"):
        _WRITERS[op](target, source)
    for p, b in zip(m.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("flat", [False, True], ids=["plain", "flat"])
@pytest.mark.parametrize(
    "call",
    [lambda t, s: rw.polyak_(t, s, 0.5), lambda t, s: rw.copy_(t, s), lambda t, s: rw.clamp_(t, 0)],
    ids=["polyak_", "copy_", "clamp_"],
)
def test_meta_tensors_are_named_as_meta_tensors_without_data(call, flat):
    target, source = NETS["mlp"](0).to("meta"), NETS["mlp"](1).to("meta")
    if flat:
        rw.flatten_(target), rw.flatten_(source)
    with pytest.raises(rw.WeightMismatchError, match="meta tensor: it has a shape but no data"):
        call(target, source)
