"""Property-based tests: random structures, dtypes and coefficients against float64 references."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

import rlweights as rw

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
structures = st.lists(shapes, min_size=1, max_size=6)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])
SETTINGS = settings(max_examples=60, deadline=None)


def _module(shape_list, dtype, seed) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    module = nn.Module()
    for i, shape in enumerate(shape_list):
        data = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        module.register_parameter(f"p{i}", nn.Parameter(data))
    return module


def _tol(dtype):
    eps = torch.finfo(dtype).eps
    return {"rtol": 2 * eps, "atol": 2 * eps}


@SETTINGS
@given(structures, dtypes, st.floats(0.0, 1.0), st.booleans(), st.integers(0, 2**16))
def test_polyak_random_structures(shape_list, dtype, tau, flat, seed):
    target, source = _module(shape_list, dtype, seed), _module(shape_list, dtype, seed + 1)
    if flat:
        rw.flatten_(target)
        rw.flatten_(source)
    t0 = [p.detach().double().clone() for p in target.parameters()]
    s0 = [p.detach().double().clone() for p in source.parameters()]
    rw.polyak_(target, source, tau)
    for p, t, s in zip(target.parameters(), t0, s0, strict=True):
        assert_close(p.detach().double(), t + tau * (s - t), **_tol(dtype))


@SETTINGS
@given(
    structures,
    dtypes,
    st.lists(st.floats(0.01, 10.0), min_size=1, max_size=4),
    st.integers(0, 2**16),
)
def test_average_random_structures(shape_list, dtype, coefficients, seed):
    sources = [_module(shape_list, dtype, seed + i) for i in range(len(coefficients))]
    target = _module(shape_list, dtype, seed + 99)
    refs = [[p.detach().double() for p in m.parameters()] for m in sources]
    rw.average_([*target.parameters()], [[*m.parameters()] for m in sources], coefficients)
    total = sum(coefficients)
    for i, p in enumerate(target.parameters()):
        want = sum(c * r[i] for c, r in zip(coefficients, refs, strict=True)) / total
        assert_close(p.detach().double(), want, **_tol(dtype))


@SETTINGS
@given(structures, st.floats(-2.0, 0.0), st.floats(0.0, 2.0), st.integers(0, 2**16))
def test_clamp_and_distance_random_structures(shape_list, lo, hi, seed):
    a, b = _module(shape_list, torch.float64, seed), _module(shape_list, torch.float64, seed + 1)
    want = torch.sqrt(
        sum(((x - y) ** 2).sum() for x, y in zip(a.parameters(), b.parameters(), strict=True))
    )
    assert_close(rw.distance(a, b), want.detach())
    ref = [p.detach().clone().clamp(lo, hi) for p in a.parameters()]
    rw.clamp_(a, lo, hi)
    for p, r in zip(a.parameters(), ref, strict=True):
        assert torch.equal(p.detach(), r)
