"""The non-finite source policy: propagate, raise, skip (flat and plain paths)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_unchanged, make_pair, named, snapshot
from torch.testing import assert_close

import rlweights as rw


@pytest.fixture(params=[True, False], ids=["flat", "plain"])
def poisoned(request):
    target, source = make_pair("cnn_bn")
    if request.param:
        rw.flatten_(target)
        rw.flatten_(source)
    with torch.no_grad():
        source[4].weight[0, 0] = float("nan")
        source[0].bias[1] = float("inf")
        source[1].num_batches_tracked.fill_(7)  # an integer buffer to copy, or not
    return target, source


OPS = {
    "polyak_": lambda t, s, mode: rw.polyak_(t, s, 0.5, nonfinite=mode),
    "copy_": lambda t, s, mode: rw.copy_(t, s, nonfinite=mode),
    "average_": lambda t, s, mode: rw.average_(t, [s, t], nonfinite=mode),
    "PolyakUpdate": lambda t, s, mode: rw.PolyakUpdate(s, t, 0.5, nonfinite=mode).step(),
    "HardUpdate": lambda t, s, mode: rw.HardUpdate(s, t, nonfinite=mode).step(),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_propagate_writes_through(poisoned, op):
    target, source = poisoned
    OPS[op](target, source, "propagate")
    assert torch.isnan(target[4].weight[0, 0])
    assert not torch.isfinite(target[0].bias[1])
    assert target[1].num_batches_tracked.item() == 7


@pytest.mark.parametrize("op", sorted(OPS))
def test_raise_names_the_tensors_and_writes_nothing(poisoned, op):
    target, source = poisoned
    before = snapshot(target)
    with pytest.raises(
        rw.NonFiniteError, match=r"'0.bias' \(1 non-finite\).*'4.weight' \(1 non-finite\)"
    ):
        OPS[op](target, source, "raise")
    assert_unchanged(before, target)


@pytest.mark.parametrize("op", sorted(OPS))
def test_skip_leaves_the_target_and_updates_when_finite(poisoned, op):
    """Untouched means every tensor, the integer buffers too (as the capturable form does)."""
    target, source = poisoned
    before = snapshot(target)
    OPS[op](target, source, "skip")
    assert_unchanged(before, target)
    with torch.no_grad():
        source[4].weight[0, 0] = 0.0
        source[0].bias[1] = 0.0
    t0, s0 = named(target), named(source)
    rw.polyak_(target, source, 0.5, nonfinite="skip")
    for name in ("0.weight", "4.weight"):
        assert_close(named(target)[name], t0[name] + 0.5 * (s0[name] - t0[name]))


def test_a_finite_source_passes_raise():
    target, source = make_pair("mlp")
    rw.polyak_(target, source, 1.0, nonfinite="raise")
    assert rw.distance(target, source).item() == 0.0
