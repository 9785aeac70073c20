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


# A raising call writes nothing: random mixes of valid and invalid members.
MEMBER_KINDS = [
    "ok",
    "shape",
    "dtype",
    "int",
    "complex",
    "overlap_source",
    "overlap_targets",
    "nan",
    "device",
]
PAIR_OPS = ("polyak_", "copy_", "average_")
CUDA = torch.cuda.is_available()


def _invalid(kind: str, op: str, nonfinite: str, as_mapping: bool) -> bool:
    """Whether a member of this kind makes ``op`` refuse the call (the spec, written out)."""
    if kind == "ok":
        return False
    if kind == "overlap_targets":
        return True  # two targets share memory: they would be written twice
    if op in PAIR_OPS:
        if kind in ("shape", "dtype", "overlap_source", "device"):
            return True
        if kind == "int":  # copy_ takes them; a state_dict's are copied (num_batches_tracked)
            return op != "copy_" and not as_mapping
        if kind == "nan":
            return op != "copy_" and nonfinite == "raise"
        return False  # complex values interpolate
    return kind in ("int", "complex")  # clamp_ / max_norm_ need real floating weights


def _members(kinds: list[str], width: int, gen: torch.Generator):
    """(targets, sources, second sources, every base tensor) for the member kinds."""
    targets, sources, bases = [], [], []

    def fresh(dtype=torch.float32, extra=0, device="cpu"):
        base = torch.randn(2, width + extra, generator=gen, dtype=torch.float64)
        base = (base * 4).to(dtype) if not dtype.is_complex else base.to(dtype)
        base = base.to(device)
        bases.append(base)
        return base

    for kind in kinds:
        if kind == "overlap_source":
            base = fresh(extra=1)
            targets.append(base[:, 1:])
            sources.append(base[:, :-1])
            continue
        if kind == "overlap_targets":
            base = fresh(extra=1)
            targets += [base[:, 1:], base[:, :-1]]
            sources += [fresh(), fresh()]
            continue
        dtype = {"int": torch.int64, "complex": torch.complex64}.get(kind, torch.float32)
        targets.append(fresh(dtype))
        if kind == "shape":
            sources.append(fresh(extra=1))
        elif kind == "dtype":
            sources.append(fresh(torch.float64))
        elif kind == "device":
            sources.append(fresh(device="cuda" if CUDA else "meta"))
        elif kind == "nan":
            source = fresh()
            source[0, 0] = float("nan")
            sources.append(source)
        else:
            sources.append(fresh(dtype))
    others = [s.clone() if s.device.type != "meta" else s for s in sources]
    bases += [o for o in others if o.device.type != "meta"]
    return targets, sources, others, [b for b in bases if b.device.type != "meta"]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.sampled_from(MEMBER_KINDS), min_size=1, max_size=5),
    st.sampled_from(["polyak_", "copy_", "average_", "clamp_", "max_norm_"]),
    st.sampled_from(["propagate", "raise"]),
    st.booleans(),
    st.integers(1, 4),
    st.integers(0, 2**16),
)
def test_a_raising_call_leaves_every_tensor_bit_identical(
    kinds, op, nonfinite, as_mapping, width, seed
):
    if "device" in kinds and not CUDA and op not in PAIR_OPS:
        kinds = [k for k in kinds if k != "device"] or ["ok"]
    targets, sources, others, bases = _members(kinds, width, torch.Generator().manual_seed(seed))
    if as_mapping:  # a state_dict-like mapping, matched by name
        names = [f"w{i}" for i in range(len(targets))]
        targets, sources, others = (
            dict(zip(names, x, strict=True)) for x in (targets, sources, others)
        )
    before = [b.clone() for b in bases]
    calls = {
        "polyak_": lambda: rw.polyak_(targets, sources, 0.3, nonfinite=nonfinite),
        "copy_": lambda: rw.copy_(targets, sources),
        "average_": lambda: rw.average_(targets, [sources, others], nonfinite=nonfinite),
        "clamp_": lambda: rw.clamp_(targets, -0.5, 0.5),
        "max_norm_": lambda: rw.max_norm_(targets, 0.5),
    }
    expected_to_raise = any(_invalid(kind, op, nonfinite, as_mapping) for kind in kinds)
    try:
        calls[op]()
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as exc:
        assert expected_to_raise, f"{op} refused a valid call: {exc}"
        for base, old in zip(bases, before, strict=True):
            assert torch.equal(base.view(torch.uint8), old.view(torch.uint8)), (
                f"{op} raised {type(exc).__name__} after writing part of the target"
            )
    else:
        assert not expected_to_raise, f"{op} accepted {kinds} (nonfinite={nonfinite})"
