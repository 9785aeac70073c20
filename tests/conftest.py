"""Shared fixtures: small networks of the shapes RL uses, devices, float64 references."""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA")]),
]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# A subprocess's timeout in a test only catches a hang: far above what the slowest command
# takes on a busy machine (minutes), so that a loaded machine never fails a test.
SUBPROCESS_TIMEOUT = 1800.0

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Tests run in several worker processes (pytest-xdist, pyproject's addopts): one thread
    # each, in the worker and in every command it starts, since OpenMP threads of processes
    # side by side on the same cores wait for each other (many times slower than one thread).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def stop_signals_as_in_a_terminal():
    """The stop-signal tests (here and in the commands they start) need SIGINT, SIGTERM and
    SIGHUP as a terminal leaves them; a test run started in the background or under ``nohup``
    has some ignored, which the commands keep ignored by design (nohup's promise)."""
    defaults = {
        signal.SIGINT: signal.default_int_handler,
        signal.SIGTERM: signal.SIG_DFL,
        signal.SIGHUP: signal.SIG_DFL,
    }
    for signum, handler in defaults.items():
        if signal.getsignal(signum) is signal.SIG_IGN:
            signal.signal(signum, handler)
    yield


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)
    )


def cnn_bn(seed: int = 0) -> nn.Module:
    """A small conv net with BatchNorm (floating running stats + integer num_batches_tracked)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 2, 6, 6))  # move the running statistics off their defaults
    return net


class Tied(nn.Module):
    """Encoder/decoder sharing one weight: it must be updated once, not twice."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Linear(6, 4, bias=False)
        self.dec = nn.Linear(4, 6, bias=False)
        self.dec.weight = self.enc.weight  # shapes differ; we only need the sharing
        self.head = nn.Linear(4, 1)


def tied(seed: int = 0) -> nn.Module:
    return Tied(seed)


NETS = {"mlp": mlp, "cnn_bn": cnn_bn, "tied": tied}


def make_pair(kind: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Two networks of the same architecture with different weights (target, source)."""
    target = NETS[kind](0).to(device=device, dtype=dtype)
    source = NETS[kind](1).to(device=device, dtype=dtype)
    return target, source


def snapshot(module_or_tensors) -> list[torch.Tensor]:
    if isinstance(module_or_tensors, nn.Module):
        tensors = [*module_or_tensors.parameters(), *module_or_tensors.buffers()]
    else:
        tensors = list(module_or_tensors)
    return [t.detach().clone() for t in tensors]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so that -0.0 != 0.0 and NaN == NaN (bit identity)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_unchanged(before: list[torch.Tensor], module_or_tensors) -> None:
    after = snapshot(module_or_tensors)
    assert len(before) == len(after)
    for b, a in zip(before, after, strict=True):
        assert b.dtype == a.dtype and b.shape == a.shape
        assert torch.equal(bits(b), bits(a))


def named(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (deduplicated) then buffers, cloned in float64 for references."""
    out = {n: p.detach().double().clone() for n, p in module.named_parameters()}
    for n, b in module.named_buffers():
        out[n] = b.detach().clone() if not b.is_floating_point() else b.detach().double().clone()
    return out


def buffer_names(module: nn.Module) -> set[str]:
    return {n for n, _ in module.named_buffers()}


def logged_drift_run(logdir, steps, histograms=False, config=None):
    """A tiny training stand-in (weights moved, target Polyak-updated) logging drift each
    step with DriftLogger; returns {step: logged values}."""
    from torch.utils.tensorboard import SummaryWriter

    import rlweights as rw
    from rlweights.drift import DriftMonitor
    from rlweights.tensorboard import DriftLogger

    online = mlp(0)
    target = rw.make_target(online)
    writer = SummaryWriter(str(logdir))
    monitor = DriftMonitor({"critic": online}, {"critic": target})
    logger = DriftLogger(writer, monitor, histograms, config)
    logged = {}
    for step in steps:
        with torch.no_grad():
            for p in online.parameters():
                p.add_(0.1)
        rw.polyak_(target, online, 0.1)
        logged[step] = logger.log(step)
    writer.close()
    return logged


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


# Several processes joined by gloo on 127.0.0.1 (the distributed tests).
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker, tmp_path, timeout=SUBPROCESS_TIMEOUT, **kwargs):
    """Run ``worker(rank, out_dir, **kwargs)`` in WORLD spawned processes that joined one gloo
    group; returns the exit codes. Each worker saves what it saw under ``tmp_path``."""
    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_entry, args=(worker, rank, port, str(tmp_path), kwargs))
        for rank in range(WORLD)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(deadline - time.monotonic(), 1.0))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a process hung"
    return [p.exitcode for p in procs]


def _entry(worker, rank, port, out, kwargs):
    torch.set_num_threads(1)
    # Before the group starts, as rlweights.agents.parallel.Learners does: imported after it,
    # torch._dynamo keeps the group alive past destroy_process_group() (abort at exit).
    importlib.import_module("torch._dynamo")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=kwargs.pop("timeout_s", 60)),
    )
    try:
        worker(rank, out, **kwargs)
    except BaseException:
        with open(f"{out}/error{rank}.txt", "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
