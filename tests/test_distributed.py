"""Averaging across processes (issue 6): two real processes with gloo on 127.0.0.1, results
checked against the float64 mean of the ranks' weights computed here."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import WORLD, cnn_bn, launch, mlp
from torch.testing import assert_close

import rlweights as rw
from rlweights.distributed import PeerError, PeriodicAverager, all_average_, broadcast_


def averaging_worker(rank, out):
    results = {}
    # A flat network: one all_reduce per flat buffer (weights and BatchNorm statistics).
    net = cnn_bn(seed=rank)
    rw.flatten_(net)
    all_average_(net)
    results["flat"] = {k: v.clone() for k, v in net.state_dict().items()}
    # Not flat: through concatenation; buffers="skip" leaves the running statistics.
    net = cnn_bn(seed=rank)
    all_average_(net, buffers="skip")
    results["tensors_skip"] = {k: v.clone() for k, v in net.state_dict().items()}
    # A list of tensors, float64.
    torch.manual_seed(rank)
    tensors = [torch.randn(3, 4, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    all_average_(tensors)
    results["list"] = [t.clone() for t in tensors]
    # broadcast_ from rank 1, then the periodic averager every 3 steps.
    net = mlp(seed=rank)
    rw.flatten_(net)
    broadcast_(net, src=1)
    results["broadcast"] = {k: v.clone() for k, v in net.state_dict().items()}
    try:
        broadcast_(net, src=2)  # checked before any collective: no process waits
        results["bad_src"] = "no error"
    except ValueError as exc:
        results["bad_src"] = str(exc)
    net = mlp(seed=10 + rank)
    averager = PeriodicAverager(net, every=3)
    did = [averager.step() for _ in range(4)]
    results["periodic"] = (did, averager.state_dict(), repr(averager))
    results["periodic_weights"] = {k: v.clone() for k, v in net.state_dict().items()}
    # Autograd sees the write into the flat buffer (versions bumped).
    net = mlp(seed=rank)
    rw.flatten_(net)
    loss = net(torch.ones(1, 5)).sum()
    all_average_(net)
    try:
        loss.backward()
        results["autograd"] = "no error"
    except RuntimeError as exc:
        results["autograd"] = str(exc)
    # Mismatched architectures: every process gets the error, none hangs.
    net = mlp() if rank == 0 else cnn_bn()
    try:
        all_average_(net)
        results["mismatch"] = "no error"
    except rw.WeightMismatchError as exc:
        results["mismatch"] = str(exc)
    torch.save(results, f"{out}/rank{rank}.pt")


def reference_mean(make, seeds):
    nets = [make(seed=s) for s in seeds]
    return {
        name: torch.stack([n.state_dict()[name].double() for n in nets]).mean(0)
        for name in nets[0].state_dict()
    }


def test_all_average_broadcast_and_periodic_averager_across_two_processes(tmp_path):
    codes = launch(averaging_worker, tmp_path)
    errors = [p.read_text() for p in tmp_path.glob("error*.txt")]
    assert codes == [0, 0], errors
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    want = reference_mean(cnn_bn, range(WORLD))
    for r in ranks:
        for name, value in r["flat"].items():
            if value.is_floating_point():
                assert_close(value.double(), want[name], rtol=1e-6, atol=1e-7)
        # num_batches_tracked (integer) is each process's own.
        assert r["flat"]["1.num_batches_tracked"] == 1
    for rank, r in enumerate(ranks):
        own = cnn_bn(seed=rank).state_dict()
        for name, value in r["tensors_skip"].items():
            if "running" in name:
                assert torch.equal(value, own[name])
            elif value.is_floating_point():
                assert_close(value.double(), want[name], rtol=1e-6, atol=1e-7)

    torch.manual_seed(0)
    a = [torch.randn(3, 4, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    torch.manual_seed(1)
    b = [torch.randn(3, 4, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    for r in ranks:
        for got, x, y in zip(r["list"], a, b, strict=True):
            assert_close(got, (x + y) / 2)

    source = mlp(seed=1).state_dict()
    for r in ranks:
        assert all(torch.equal(r["broadcast"][k], source[k]) for k in source)
        assert "broadcast_: src (a rank) must be an int in [0, 1], got 2" in r["bad_src"]

    want = reference_mean(mlp, [10, 11])
    for r in ranks:
        did, state, text = r["periodic"]
        assert did == [False, False, True, False]
        assert state == {"counter": {"every": 3, "start": 0, "steps": 4}, "updates": 1}
        assert "processes=2" in text
        for name, value in r["periodic_weights"].items():
            assert_close(value.double(), want[name], rtol=1e-6, atol=1e-7)
        assert "modified by an inplace operation" in r["autograd"]
        assert "different weight sets" in r["mismatch"]
        assert "rank 1 has" in r["mismatch"]


def dying_peer_worker(rank, out):
    net = mlp(seed=rank)
    rw.flatten_(net)
    all_average_(net)  # both alive: works
    if rank == 1:
        import os

        os._exit(0)  # dies without a word
    start = time.monotonic()
    try:
        all_average_(net)
        message = "no error"
    except PeerError as exc:
        message = str(exc)
    torch.save({"message": message, "seconds": time.monotonic() - start}, f"{out}/peer.pt")


def test_a_peer_that_dies_gives_a_clear_error_not_a_hang(tmp_path):
    launch(dying_peer_worker, tmp_path, timeout_s=20)
    seen = torch.load(tmp_path / "peer.pt", weights_only=True)
    assert "a peer process died or did not answer" in seen["message"], seen
    assert seen["seconds"] < 40


def test_errors_without_a_process_group_and_for_bad_arguments():
    net = mlp()
    with pytest.raises(RuntimeError, match=r"torch\.distributed is not initialised"):
        all_average_(net)
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        PeriodicAverager(net, every=0)
    with pytest.raises(ValueError, match="buffers='copy' is not one of 'average', 'skip'"):
        PeriodicAverager(net, every=1, buffers="copy")
    with pytest.raises(TypeError):
        PeriodicAverager(3.0, every=1)


def test_periodic_averager_state_dict_round_trip():
    averager = PeriodicAverager(mlp(), every=3)
    state = {"counter": {"every": 3, "start": 0, "steps": 7}, "updates": 2}
    averager.load_state_dict(state)
    again = PeriodicAverager(mlp(), every=3)
    again.load_state_dict(averager.state_dict())
    assert again.state_dict() == state and again.calls == 7 and again.updates == 2
    other = PeriodicAverager(mlp(), every=5)
    with pytest.raises(ValueError, match="has every=3, this one every=5; build it with every=3"):
        other.load_state_dict(averager.state_dict())
    with pytest.raises(ValueError, match="updates must be an int >= 0, got -1"):
        other.load_state_dict({**state, "updates": -1})
    assert other.calls == 0 and other.updates == 0  # nothing changed
    assert repr(again) == "PeriodicAverager(every=3, processes=?, calls=7, updates=2)"


def changed_layout_worker(rank, out):
    import copy

    results = {}
    net = cnn_bn(seed=rank)
    if rank == 0:  # flattened on one process only: the same weight set
        rw.flatten_(net)
    all_average_(net)
    results["mixed"] = {k: v.clone() for k, v in net.state_dict().items()}
    # Both flat; rank 0 reloads with assign=True: its layout breaks, the weight set stays.
    rw.flatten_(net)
    all_average_(net)
    if rank == 0:
        net.load_state_dict(copy.deepcopy(net.state_dict()), assign=True)
        with torch.no_grad():
            net[0].weight.add_(1.0)
    start = time.monotonic()
    try:
        broadcast_(net, src=0)
        results["reloaded"] = {k: v.clone() for k, v in net.state_dict().items()}
    except (PeerError, rw.WeightMismatchError) as exc:
        results["reloaded"] = str(exc)
    # Rank 1 casts its network after the processes agreed on it: every process is told.
    if rank == 1:
        net.double()
    try:
        all_average_(net)
        results["cast"] = "no error"
    except (PeerError, rw.WeightMismatchError) as exc:
        results["cast"] = f"{type(exc).__name__}: {exc}"
    results["seconds"] = time.monotonic() - start
    torch.save(results, f"{out}/changed{rank}.pt")


# The process group's timeout in the test below: a hang could only end there.
PEER_TIMEOUT = 15


def test_a_weight_set_changed_on_one_process_is_compared_by_all_not_hung(tmp_path):
    """A reload with assign=True on rank 0 made it compare the weight sets alone while rank 1
    broadcast: both hung for the whole timeout and blamed a dead peer. Flat on one process
    and not on the other is the same weight set; a real change is named on every process."""
    codes = launch(changed_layout_worker, tmp_path, timeout_s=PEER_TIMEOUT)
    errors = [p.read_text() for p in tmp_path.glob("error*.txt")]
    assert codes == [0, 0], errors
    ranks = [torch.load(tmp_path / f"changed{r}.pt", weights_only=False) for r in range(WORLD)]
    want = reference_mean(cnn_bn, range(WORLD))
    for r in ranks:
        for name, value in r["mixed"].items():
            if value.is_floating_point():
                assert_close(value.double(), want[name], rtol=1e-6, atol=1e-7)
    sent = ranks[0]["reloaded"]
    assert isinstance(sent, dict), sent
    assert_close(sent["0.weight"], ranks[0]["mixed"]["0.weight"] + 1.0)
    for name, value in sent.items():
        assert torch.equal(ranks[1]["reloaded"][name], value), name
    for r in ranks:
        assert r["cast"].startswith("WeightMismatchError"), r["cast"]
        assert (
            "rank 1 has param '0.weight' float64 [4, 2, 3, 3] where rank 0 has param "
            in (r["cast"])
        )
        assert r["seconds"] < PEER_TIMEOUT  # a hang ends only at the timeout
