"""Numerics of the in-place ops against hand-written float64 references."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, FLOAT_DTYPES, NETS, bits, buffer_names, make_pair, named
from torch import nn
from torch.testing import assert_close

import rlweights as rw
from rlweights import ops


def _prepare(kind, dtype, device, flat):
    target, source = make_pair(kind, dtype, device)
    if flat:
        rw.flatten_(target)
        rw.flatten_(source)
    return target, source


def _check(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = named(module)
    assert got.keys() == expected.keys()
    for name, want in expected.items():
        have = got[name]
        if want.is_floating_point():
            dtype = dict(module.named_parameters()).get(
                name, dict(module.named_buffers()).get(name)
            )
            assert_close(have, want.to(have.device), check_dtype=False, **_tol(dtype.dtype))
        else:
            assert torch.equal(have, want.to(have.device)), name


def _tol(dtype: torch.dtype) -> dict[str, float]:
    # One rounding of the result in the tensor's dtype, plus the op's own rounding.
    eps = torch.finfo(dtype).eps
    return {"rtol": 2 * eps, "atol": 2 * eps}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kind", sorted(NETS))
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "plain"])
def test_polyak_matches_float64_reference(kind, dtype, device, flat):
    target, source = _prepare(kind, dtype, device, flat)
    t0, s0 = named(target), named(source)
    tau = 0.3
    rw.polyak_(target, source, tau)
    bufs = buffer_names(target)
    expected = {
        n: (s0[n] if n in bufs else t0[n] + tau * (s0[n] - t0[n])) for n in t0
    }  # default buffer policy: hard copy (as SB3), integers copied
    _check(target, expected)
    assert_close_sources_untouched(source, s0)
    assert ops.pair_plan(target, source, "test").flat is flat


def assert_close_sources_untouched(source, s0):
    for n, v in named(source).items():
        assert torch.equal(v, s0[n])


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "plain"])
def test_tied_weight_is_updated_once(flat):
    target, source = make_pair("tied")
    assert target.enc.weight is target.dec.weight
    if flat:
        rw.flatten_(target)
        rw.flatten_(source)
    t0, s0 = named(target), named(source)
    rw.polyak_(target, source, 0.5)
    w = t0["enc.weight"] + 0.5 * (s0["enc.weight"] - t0["enc.weight"])
    assert_close(target.enc.weight.double(), w)
    assert target.enc.weight is target.dec.weight


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "plain"])
@pytest.mark.parametrize("kind", sorted(NETS))
def test_tau_zero_is_bit_identical_and_tau_one_copies_exactly(kind, flat):
    target, source = _prepare(kind, torch.float32, "cpu", flat)
    before = [bits(p).clone() for p in target.parameters()]
    rw.polyak_(target, source, 0.0)
    assert all(torch.equal(b, bits(p)) for b, p in zip(before, target.parameters(), strict=True))
    rw.polyak_(target, source, torch.tensor(0.0))  # a tensor tau reads the weights, still exact
    assert all(torch.equal(b, bits(p)) for b, p in zip(before, target.parameters(), strict=True))
    rw.polyak_(target, source, 1.0)
    for t, s in zip(target.state_dict().values(), source.state_dict().values(), strict=True):
        assert torch.equal(bits(t), bits(s))


@pytest.mark.parametrize("policy", ["copy", "polyak", "skip"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "plain"])
def test_buffer_policies(policy, flat):
    target, source = _prepare("cnn_bn", torch.float32, "cpu", flat)
    source[1].num_batches_tracked += 7
    t0, s0 = named(target), named(source)
    rw.polyak_(target, source, 0.25, buffers=policy)
    for name in ("1.running_mean", "1.running_var"):
        want = {
            "copy": s0[name],
            "polyak": t0[name] + 0.25 * (s0[name] - t0[name]),
            "skip": t0[name],
        }[policy]
        assert_close(named(target)[name], want, **_tol(torch.float32))
    tracked = target[1].num_batches_tracked
    # Integers are copied, never interpolated (left alone only when buffers are skipped).
    assert torch.equal(tracked, (t0 if policy == "skip" else s0)["1.num_batches_tracked"])
    assert tracked.dtype == torch.int64


@pytest.mark.parametrize("device", DEVICES)
def test_sequences_non_contiguous_zero_size_and_tensor_tau(device):
    def parts():
        return [
            torch.randn(6, 4, device=device).t(),
            torch.randn(6, 4, device=device)[::2, 1:],
            torch.randn(0, 3, device=device),
            torch.randn(3, device=device),
        ]

    targets, sources = parts(), parts()
    assert not targets[0].is_contiguous() and not targets[1].is_contiguous()
    ref_t = [t.double().clone() for t in targets]
    ref_s = [s.double() for s in sources]
    tau = torch.tensor(0.7, device=device)
    rw.polyak_(targets, sources, tau)
    for t, r, s in zip(targets, ref_t, ref_s, strict=True):
        assert_close(t.double(), r + 0.7 * (s - r), **_tol(torch.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "plain"])
def test_copy_is_exact_including_buffers(dtype, device, flat):
    target, source = _prepare("cnn_bn", dtype, device, flat)
    source[1].num_batches_tracked += 3
    rw.copy_(target, source)
    for (n, t), s in zip(target.state_dict().items(), source.state_dict().values(), strict=True):
        assert torch.equal(bits(t), bits(s)), n


def test_copy_partial_transfer_by_pattern():
    """Copy a pretrained encoder into a network whose head has another shape."""
    torch.manual_seed(0)
    pretrained = nn.ModuleDict({"encoder": nn.Linear(4, 8), "head": nn.Linear(8, 3)})
    fresh = nn.ModuleDict({"encoder": nn.Linear(4, 8), "head": nn.Linear(8, 5)})
    head_before = fresh["head"].weight.detach().clone()
    rw.copy_(fresh, pretrained, include="encoder.*")
    assert torch.equal(fresh["encoder"].weight, pretrained["encoder"].weight)
    assert torch.equal(fresh["encoder"].bias, pretrained["encoder"].bias)
    assert torch.equal(fresh["head"].weight, head_before)
    rw.copy_(fresh, pretrained, exclude=["head.*", "encoder.bias"])  # equal again, harmless
    with pytest.raises(ValueError, match=r"include='decoder\.\*' matches no tensor"):
        rw.copy_(fresh, pretrained, include="decoder.*")
    with pytest.raises(rw.WeightMismatchError, match=r"'head.weight' shape \(5, 8\) vs \(3, 8\)"):
        rw.copy_(fresh, pretrained)


@pytest.mark.parametrize("kind", ["cnn_bn", "tied"])
def test_copy_from_a_state_dict_loaded_without_code(tmp_path, kind):
    """state_dicts list tied weights under every name; they still match a module."""
    target, source = make_pair(kind)
    path = tmp_path / "ckpt.pt"
    torch.save(source.state_dict(), path)
    rw.copy_(target, torch.load(path, weights_only=True))
    for t, s in zip(target.state_dict().values(), source.state_dict().values(), strict=True):
        assert torch.equal(t, s)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "plain"])
@pytest.mark.parametrize("into", ["fresh", "member"])
def test_average_matches_reference(dtype, device, flat, into):
    nets = [NETS["cnn_bn"](i).to(device=device, dtype=dtype) for i in range(4)]
    if flat:
        for n in nets:
            rw.flatten_(n)
    target, sources = (nets[0], nets[1:]) if into == "fresh" else (nets[1], nets[1:])
    refs = [named(n) for n in sources]
    coefficients = [1.0, 3.0, 0.5]
    rw.average_(target, sources, coefficients=coefficients)
    total = sum(coefficients)
    got = named(target)
    for name in refs[0]:
        if refs[0][name].is_floating_point():
            want = sum(c * r[name] for c, r in zip(coefficients, refs, strict=True)) / total
            assert_close(got[name], want, check_dtype=False, **_tol(dtype))
        else:
            assert torch.equal(got[name], refs[0][name])  # integers: the first source's


def test_average_uniform_by_default_and_validates_coefficients():
    a, b = make_pair("mlp")
    c = NETS["mlp"](2)
    refs = [named(n) for n in (a, b, c)]
    out = NETS["mlp"](3)
    rw.average_(out, [a, b, c])
    for name, v in named(out).items():
        assert_close(v, sum(r[name] for r in refs) / 3, **_tol(torch.float32))
    before = [p.detach().clone() for p in out.parameters()]
    for bad, msg in [
        ([1.0], r"got 1 coefficients for 3 sources"),
        ([1.0, -1.0, 1.0], r"coefficients\[1\] must be a finite number >= 0, got -1.0"),
        ([1.0, float("nan"), 1.0], r"coefficients\[1\] must be a finite number >= 0, got nan"),
        ([1.0, float("inf"), 1.0], r"got inf\. Coefficients are relative"),
        ([0.0, 0.0, 0.0], r"coefficients are all 0"),
    ]:
        with pytest.raises(ValueError, match=msg):
            rw.average_(out, [a, b, c], bad)
    with pytest.raises(ValueError, match="sources is empty"):
        rw.average_(out, [])
    assert all(torch.equal(x, y) for x, y in zip(before, out.parameters(), strict=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "plain"])
def test_clamp_matches_reference_and_spares_buffers(dtype, device, flat):
    net = NETS["cnn_bn"](0).to(device=device, dtype=dtype)
    if flat:
        rw.flatten_(net)
    ref = named(net)
    bufs = buffer_names(net)
    rw.clamp_(net, -0.05, 0.1)
    got = named(net)
    for name, v in ref.items():
        want = v if name in bufs else v.clamp(-0.05, 0.1)
        if v.is_floating_point():
            assert_close(got[name], want, **_tol(dtype))
        else:
            assert torch.equal(got[name], want)
    rw.clamp_(net, max=2**-6)  # one-sided (a bound exact in every dtype)
    assert max(p.max().item() for p in net.parameters()) <= 2**-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "plain"])
def test_max_norm_matches_keras_semantics(dtype, device, flat):
    net = NETS["cnn_bn"](0).to(device=device, dtype=dtype)
    with torch.no_grad():
        net[0].weight[0].mul_(50.0)  # one conv channel far above the bound
    if flat:
        rw.flatten_(net)
    ref = named(net)
    bound = 0.5
    rw.max_norm_(net, bound)
    got = named(net)
    for name, v in ref.items():
        if not v.is_floating_point() or name in buffer_names(net) or v.dim() < 2:
            assert torch.equal(got[name], v), name  # 1-D tensors and buffers untouched
            continue
        rows = v.reshape(v.shape[0], -1)
        norms = rows.norm(dim=1, keepdim=True)
        want = torch.where(norms > bound, rows * (bound / norms), rows).reshape(v.shape)
        assert_close(got[name], want, **_tol(dtype))
        within = (norms <= bound).reshape(-1)
        # Units within the bound keep their exact values.
        assert torch.equal(got[name].reshape(v.shape[0], -1)[within], rows[within])
    with pytest.raises(ValueError, match="max_norm must be a number >= 0"):
        rw.max_norm_(net, -1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "plain"])
def test_distance_and_distances(device, flat):
    a, b = _prepare("cnn_bn", torch.float32, device, flat)
    ra, rb = named(a), named(b)
    per = {n: (ra[n] - rb[n]).norm() for n in ra if ra[n].is_floating_point()}
    total = torch.sqrt(sum(v**2 for v in per.values()))
    d = rw.distance(a, b)
    assert d.dim() == 0 and d.device.type == device
    assert_close(d.double().cpu(), total.cpu(), rtol=1e-5, atol=1e-6)
    ds = rw.distances(a, b)
    assert ds.keys() == per.keys()
    for n, v in ds.items():
        assert_close(v.double().cpu(), per[n].cpu(), rtol=1e-5, atol=1e-6)
    assert rw.distance(a, a).item() == 0.0


def test_overlapping_targets_are_refused():
    base = torch.randn(6, 4)
    before = base.clone()
    with pytest.raises(rw.WeightMismatchError, match=r"target tensors '0' and '1' overlap"):
        rw.polyak_([base.t(), base[::2, 1:]], [torch.randn(4, 6), torch.randn(3, 3)], 0.5)
    with pytest.raises(rw.WeightMismatchError, match=r"overlap"):
        rw.clamp_([base, base], -1, 1)
    assert torch.equal(base, before)


def test_distance_reads_aliased_sequences():
    x, y = torch.randn(3), torch.randn(3)
    d = rw.distance([x, x], [y, y])
    assert_close(d, (x - y).norm() * 2**0.5)


def test_distance_float64_precision():
    a = [torch.full((3,), 1.0, dtype=torch.float64)]
    b = [torch.full((3,), 1.0 + 1e-12, dtype=torch.float64)]
    d = rw.distance(a, b)
    assert d.dtype == torch.float64
    assert_close(d, torch.tensor(3**0.5 * 1e-12, dtype=torch.float64), rtol=1e-3, atol=0)


@pytest.mark.parametrize("policy", ["average", "copy", "skip"])
def test_average_buffer_policies(policy):
    nets = [NETS["cnn_bn"](i) for i in range(3)]
    nets[1][1].num_batches_tracked += 5
    target, sources = nets[0], nets[1:]
    t0, refs = named(target), [named(n) for n in sources]
    rw.average_(target, sources, buffers=policy)
    got = named(target)
    for name in ("1.running_mean", "1.running_var"):
        want = {
            "average": (refs[0][name] + refs[1][name]) / 2,
            "copy": refs[0][name],
            "skip": t0[name],
        }[policy]
        assert_close(got[name], want, **_tol(torch.float32))
    tracked = (t0 if policy == "skip" else refs[0])["1.num_batches_tracked"]
    assert torch.equal(got["1.num_batches_tracked"], tracked)
    assert_close(got["0.weight"], (refs[0]["0.weight"] + refs[1]["0.weight"]) / 2)


@pytest.mark.parametrize("flat", [False, True], ids=["plain", "flat"])
@pytest.mark.parametrize(
    ("order", "coefficients"),
    [
        ("tt", None),  # the target twice: the weighted mean of itself is itself
        ("tst", None),  # (2 target + source) / 3
        ("tts", [1.0, 2.0, 3.0]),
        ("stt", [0.5, 0.25, 0.25]),
        ("ts", [1e308, 1e308]),  # coefficients whose sum overflows a float
    ],
)
def test_average_equals_the_mean_of_the_values_before_the_call(flat, order, coefficients):
    """Issue 13: whatever aliasing there is between the target and the sources, the result is
    the weighted mean of the sources' values from before the call (float64 reference)."""
    torch.manual_seed(0)
    target, other = nn.Linear(3, 4), nn.Linear(3, 4)
    if flat:
        rw.flatten_(target)
        rw.flatten_(other)
    sources = [target if ch == "t" else other for ch in order]
    c = torch.tensor(coefficients or [1.0] * len(sources), dtype=torch.float64)
    c = c / c.max()
    c = c / c.sum()
    before = {id(m): {k: v.double().clone() for k, v in m.state_dict().items()} for m in sources}
    want = {
        k: sum(ci * before[id(m)][k] for ci, m in zip(c, sources, strict=True))
        for k in before[id(target)]
    }
    rw.average_(target, sources, coefficients)
    for k, v in target.state_dict().items():
        assert_close(v.double(), want[k], rtol=1e-6, atol=1e-7)
    if order == "tt":  # exactly unchanged, not merely close
        for k, v in target.state_dict().items():
            assert torch.equal(v.double(), before[id(target)][k])
