"""Drift metrics against float64 references."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, NETS, logged_drift_run
from torch.testing import assert_close

import rlweights as rw
from rlweights.drift import DriftMonitor


def _params64(module):
    return {n: p.detach().double().clone() for n, p in module.named_parameters()}


def _norm(d):
    return torch.sqrt(sum((v**2).sum() for v in d.values()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_metrics_match_float64_reference(flat, dtype, device):
    online = NETS["cnn_bn"](0).to(device=device, dtype=dtype)
    target = rw.make_target(online) if flat else NETS["cnn_bn"](0).to(device=device, dtype=dtype)
    if not flat:
        target.requires_grad_(False)
    w0 = _params64(online)
    monitor = DriftMonitor({"critic": online}, targets={"critic": target})
    opt = torch.optim.SGD(online.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        online(torch.randn(4, 2, 6, 6, dtype=dtype, device=device)).pow(2).mean().backward()
        opt.step()
    monitor.measure()  # sets the reference for update_ratio
    w_prev = _params64(online)
    opt.zero_grad()
    online(torch.randn(4, 2, 6, 6, dtype=dtype, device=device)).pow(2).mean().backward()
    opt.step()
    rw.polyak_(target, online, 0.3)
    with torch.no_grad():
        online[4].bias[0] = float("nan")
    got = monitor.measure()
    w, wt = _params64(online), _params64(target)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    for layer in w:
        if layer == "4.bias":
            continue
        prefix = f"drift/critic/layers/{layer}"
        assert_close(got[f"{prefix}/weight_norm"].double(), w[layer].norm(), **tol)
        assert_close(got[f"{prefix}/init_distance"].double(), (w[layer] - w0[layer]).norm(), **tol)
        ratio = (w[layer] - w_prev[layer]).norm() / w[layer].norm()
        assert_close(got[f"{prefix}/update_ratio"].double(), ratio, **tol)
        assert_close(
            got[f"{prefix}/target_distance"].double(), (w[layer] - wt[layer]).norm(), **tol
        )
        assert got[f"{prefix}/nonfinite"].item() == 0
    assert got["drift/critic/layers/4.bias/nonfinite"].item() == 1
    assert got["drift/critic/nonfinite"].item() == 1
    assert torch.isnan(got["drift/critic/weight_norm"])  # a NaN shows in the total norm
    # BatchNorm running statistics are buffers, not weights: not in the metrics.
    assert not any("running" in tag for tag in got)


def test_totals_and_no_host_sync_types():
    online = NETS["mlp"](0)
    monitor = DriftMonitor({"actor": online}, per_layer=False)
    w0 = _params64(online)
    with torch.no_grad():
        for p in online.parameters():
            p.mul_(1.5)
    got = monitor.measure()
    assert set(got) == {
        "drift/actor/weight_norm",
        "drift/actor/init_distance",
        "drift/actor/update_ratio",
        "drift/actor/nonfinite",
    }
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in got.values())
    w = _params64(online)
    assert_close(got["drift/actor/weight_norm"].double(), _norm(w), rtol=1e-5, atol=1e-6)
    moved = _norm({n: w[n] - w0[n] for n in w})
    assert_close(got["drift/actor/init_distance"].double(), moved, rtol=1e-5, atol=1e-6)
    assert_close(got["drift/actor/update_ratio"].double(), moved / _norm(w), rtol=1e-5, atol=1e-6)
    again = monitor.measure()  # nothing moved since the last measurement
    assert again["drift/actor/update_ratio"].item() == 0.0
    monitor.reset()
    assert monitor.measure()["drift/actor/init_distance"].item() == 0.0


@pytest.mark.parametrize("flat", [False, True])
def test_a_partial_reset_restarts_init_distance_of_those_tensors_only(flat):
    # after rw.reinit_ of a layer, the chart shows the distance from its new initialisation
    online = NETS["mlp"](0)
    if flat:
        rw.flatten_(online)
    monitor = DriftMonitor({"actor": online})
    w0 = _params64(online)
    with torch.no_grad():
        for p in online.parameters():
            p.mul_(1.5)
    names = [n for n, _ in online.named_parameters()]
    reset = names[:2]
    rw.reinit_(online, include=reset)
    monitor.reset({"actor": reset})
    with torch.no_grad():
        for p in online.parameters():
            p.add_(0.25)
    w, got = _params64(online), monitor.measure()
    for name in names:
        start = w[name] - 0.25 if name in reset else w0[name]
        want = torch.linalg.vector_norm(w[name] - start)
        assert_close(
            got[f"drift/actor/layers/{name}/init_distance"].double(), want, rtol=1e-5, atol=1e-6
        )
    with pytest.raises(ValueError, match="has no tensors"):
        monitor.reset({"actor": ["nope"]})
    with pytest.raises(ValueError, match="no module 'critic'"):
        monitor.reset({"critic": names})


def test_bad_monitor_arguments():
    with pytest.raises(ValueError, match=r"targets \['critic'\] have no module of the same name"):
        DriftMonitor({"actor": NETS["mlp"](0)}, targets={"critic": NETS["mlp"](1)})
    with pytest.raises(rw.WeightMismatchError, match="target of 'critic' does not match"):
        DriftMonitor({"critic": NETS["mlp"](0)}, targets={"critic": NETS["cnn_bn"](0)})
    with pytest.raises(TypeError, match="'x' is a int, not a module"):
        DriftMonitor({"x": 3})


def test_logger_writes_events_read_back_by_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = logged_drift_run(tmp_path, (0, 10, 20), histograms=True, config={"tau": 0.1})
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "drift/critic/target_distance" in scalars
    assert "drift/critic/layers/0.weight/update_ratio" in scalars
    for tag in ("drift/critic/target_distance", "drift/critic/layers/2.bias/weight_norm"):
        read = events.Scalars(tag)
        assert [e.step for e in read] == [0, 10, 20]
        for e in read:
            assert e.value == pytest.approx(logged[e.step][tag], rel=1e-6)
    assert "weights/critic/0.weight" in events.Tags()["histograms"]
    assert events.Tags()["tensors"]  # the config text and the custom-scalars layout
