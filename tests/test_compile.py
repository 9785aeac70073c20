"""torch.compile of a training step that calls polyak_ (CPU)."""

from __future__ import annotations

import torch
from conftest import NETS, assert_unchanged, named, snapshot
from torch.testing import assert_close

import rlweights as rw
from rlweights.tracing import constant_when_traced


def test_compiled_step_with_polyak_matches_eager():
    torch._dynamo.reset()
    online = NETS["mlp"](0)
    target = rw.make_target(online)
    eager_online, eager_target = NETS["mlp"](0), NETS["mlp"](0)
    x = torch.randn(4, 5)

    def step(online, target, tau):
        value = online(x).pow(2).mean() + target(x).mean()
        rw.polyak_(target, online, tau)
        return value

    compiled = torch.compile(step)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(0.5)
        for p in eager_online.parameters():
            p.add_(0.5)
    t0 = named(target)
    for tau in (0.5, torch.tensor(0.25)):
        got = compiled(online, target, tau)
        want = step(eager_online, eager_target, tau)
        assert_close(got, want)
    s = named(online)
    for name, t in t0.items():
        once = t + 0.5 * (s[name] - t)
        assert_close(named(target)[name], once + 0.25 * (s[name] - once))


def test_compiled_step_with_copy_clamp_and_average_matches_eager():
    torch._dynamo.reset()
    a, b = NETS["mlp"](0), NETS["mlp"](1)
    soup = NETS["mlp"](2)
    x = torch.randn(4, 5)

    def step(a, b, soup):
        rw.average_(soup, [a, b])
        rw.clamp_(soup, -0.1, 0.1)
        value = soup(x).sum()
        rw.copy_(a, soup)
        return value

    want_soup = {k: ((named(a)[k] + named(b)[k]) / 2).clamp(-0.1, 0.1) for k in named(a)}
    got = torch.compile(step)(a, b, soup)
    for name, t in want_soup.items():
        assert_close(named(soup)[name], t)
        assert_close(named(a)[name], t)
    floats = {k: v.float() for k, v in want_soup.items()}
    assert_close(got, torch.func.functional_call(soup, floats, (x,)).sum())


def test_a_function_marked_constant_when_traced_is_marked_as_torchs_decorator_marks_it():
    """The core marks its trace-time checks without importing torch's compiler; the mark must
    stay the one ``torch.compiler.assume_constant_result`` sets (the compiled tests above and
    in test_capture.py rely on what it does)."""

    def ours() -> bool:
        return True

    def theirs() -> bool:
        return True

    assert constant_when_traced(ours) is ours
    assert torch.compiler.assume_constant_result(theirs) is theirs
    assert vars(ours) == vars(theirs) != {}


def test_compiled_polyak_with_tau_0_leaves_the_target_bit_identical():
    """As eager: a Python ``tau=0`` does not read the weights, so a NaN source is not written."""
    torch._dynamo.reset()
    online = NETS["mlp"](0)
    target = rw.make_target(online)
    with torch.no_grad():
        next(online.parameters())[0, 0] = float("nan")
    before = snapshot(target)
    torch.compile(lambda tau: rw.polyak_(target, online, tau), fullgraph=True)(0.0)
    assert_unchanged(before, target)
