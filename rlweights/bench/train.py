"""Environment steps per second of the native agents (eager and ``--compile``) against SB3
and SBX, side by side, and how close one update comes to this machine's matmul limit.

Run as 'rlweights bench-train' or 'python scripts/bench_train.py'. Needs the sb3 and agents
extras; SBX (JAX) joins where the ``bench`` extra (``sbx-rl``) is installed. For each
algorithm every implementation trains with the same network sizes, batch size, update ratio,
learning start and environment, each run in a fresh process, in an order that rotates each
round; none logs or evaluates while timed. Speeds are steady-state rates, timed after the
first 100 training steps, so that compiling (torch.compile, JAX's jit) is not in them; the
seconds compiling took are reported on their own. The table reports medians over rounds and
each implementation's ratio to SB3 (median of per-round ratios).

The bound: the update's own matrix products, timed alone. One eager update is run under a
dispatch mode that records every matmul it makes (``mm``, ``addmm``, ``bmm``, ``baddbmm``: the
forward and backward products of every layer, with their sizes, strides and batching); the
bound is the updates per second of a step made of exactly those products and nothing else
(no elementwise work, no optimizer, no Python), replayed on random tensors of the same
layout. Their FLOPs equal the count of torch's ``FlopCounterMode``. The row says what
fraction of the bound the eager and the compiled update reach, timed alone on fixed batches,
at one thread (the agents' default) and at the benchmark's thread count: each count in a
process of its own started with it (inductor compiles for the thread count it finds), five
interleaved rounds of update, compiled update and the replayed products, medians. For
context the JSON also keeps the rate of one square matmul (batch x hidden by hidden x
hidden), which the update's thin, transposed and batched products do not reach.

The ceiling: the environment steps per second of a run in which nothing but the
environment and the update's float32 matrix products (as torch runs them here) took any
time: one environment step (timed alone in the same rounds, on the agents' vector
environment) plus the row's gradient steps per environment step at the bound:
``1 / (updates per environment step / bound + 1 / environment steps per second)``. Acting,
the optimizers, activations, losses, sampling and every framework's own costs are what each
implementation adds to it; the table gives each one's share of the ceiling.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlweights.agents.environments import make_envs
from rlweights.agents.registry import make_config
from rlweights.agents.train import train
from rlweights.files import write_json

__all__ = [
    "IMPLS",
    "SETTINGS",
    "agents_and_batch",
    "algorithm",
    "ceiling",
    "in_fresh_process",
    "markdown",
    "run",
]

IMPLS = ("native", "compile", "cudagraphs", "sb3", "sbx")
WARMUP = 100  # training steps before the timing starts (compiling happens in them)

# Row -> settings for the timed runs: the CLI defaults, but learning starts after 100 steps
# so that the timing covers training (TD3's zoo setting waits 10k steps). "sac-utd20": SAC at
# 20 gradient steps per environment step (DroQ's update-to-data ratio); "droq" has that ratio
# by default: rows of updates per second more than of environment steps.
SETTINGS = {
    "sac": {"learning_starts": 100},
    "td3": {"learning_starts": 100},
    "dqn": {"learning_starts": 100},
    "sac-utd20": {"learning_starts": 100, "train_freq": 1, "gradient_steps": 20},
    "tqc": {"learning_starts": 100},
    "droq": {"learning_starts": 100},
}
# Rows an implementation does not have: SB3 (and sb3-contrib) has no DroQ.
MISSING = {("droq", "sb3")}


def algorithm(row: str) -> str:
    """The algorithm of a row of :data:`SETTINGS` ("sac-utd20": "sac")."""
    return row.split("-")[0]


def _steady(marks: list[tuple[int, float]], start_at: int) -> tuple[float, float]:
    """(steps per second after ``start_at`` steps, the longest pause between two marks less
    the typical one: what a one-off compile cost)."""
    after = [(s, t) for s, t in marks if s >= start_at]
    if len(after) < 2:
        after = marks[-2:]
    (s0, t0), (s1, t1) = after[0], after[-1]
    gaps = [b[1] - a[1] for a, b in itertools.pairwise(marks)]
    pause = max(gaps) - statistics.median(gaps) if gaps else 0.0
    return (s1 - s0) / (t1 - t0), pause


def _native(config: Any, compile: bool, cudagraphs: bool = False) -> dict[str, float]:
    marks: list[tuple[int, float]] = []

    def monitor(steps: int, agent: Any) -> dict:
        marks.append((steps, time.perf_counter()))
        return {}

    config = dataclasses.replace(config, compile=compile, cudagraphs=cudagraphs)
    train(config, monitor=monitor, monitor_every=1)
    rate, pause = _steady(marks, config.learning_starts + WARMUP)
    return {"steps_per_second": rate, "compile_seconds": pause}


def _timed_learn(model: Any, steps: int, start_at: int) -> dict[str, float]:
    from stable_baselines3.common.callbacks import BaseCallback

    marks: list[tuple[int, float]] = []

    class Marks(BaseCallback):
        def _on_step(self) -> bool:
            marks.append((self.num_timesteps, time.perf_counter()))
            return True

    model.learn(steps, callback=Marks())
    rate, pause = _steady(marks, start_at)
    return {"steps_per_second": rate, "compile_seconds": pause}


def _sb3(config: Any) -> dict[str, float]:
    from rlweights.agents.sb3_train import build_sb3_model

    model, attachment = build_sb3_model(config)
    attachment.detach()  # plain SB3: its own polyak_update
    out = _timed_learn(model, config.total_steps, config.learning_starts + WARMUP)
    model.get_env().close()
    return out


def _sbx(config: Any) -> dict[str, float]:
    from rlweights.agents.sbx_train import build_sbx_model

    model = build_sbx_model(config)  # what 'rlweights train --impl sbx' trains
    out = _timed_learn(model, config.total_steps, config.learning_starts + WARMUP)
    model.get_env().close()
    return out


def _timed(impl: str, config: Any, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    if impl == "bound":
        return _bound_here(config)
    if impl == "sb3":
        return _sb3(config)
    if impl == "sbx":
        return _sbx(config)
    return _native(config, compile=impl != "native", cudagraphs=impl == "cudagraphs")


def in_fresh_process(call: Callable[..., Any], *args: Any, env: dict[str, str]) -> Any:
    """``call(*args)`` in a fresh process (spawned) whose environment has ``env`` set besides
    this one's: no framework's thread pools, JIT or compile caches in memory from an earlier
    run, as users run them."""
    context = multiprocessing.get_context("spawn")
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            return pool.submit(call, *args).result()
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def _isolated(impl: str, config: Any, threads: int | None = None) -> Any:
    """One timed run of ``impl`` in a fresh process with ``threads`` threads (this process's
    count by default; ``OMP_NUM_THREADS`` set before the process starts, as ``rlweights train
    --threads`` does; JAX and torch are never in one process). ``impl="bound"``:
    ``_bound_here``."""
    threads = threads or torch.get_num_threads()
    return in_fresh_process(_timed, impl, config, threads, env={"OMP_NUM_THREADS": str(threads)})


def update_bound(config: Any, compiled: bool = True, threads: tuple[int, ...] = ()) -> dict:
    """The update against this machine's matmul limit, for each thread count in ``threads``
    (default: one thread, the agents' default, and this process's count; on CUDA the one
    device): each measured in a process of its own started with that count
    (``_bound_here``). The rate and the bound grow with threads; the update's small
    elementwise kernels and thin layers hardly do, so the fraction reached depends on the
    thread count as well."""
    here = torch.get_num_threads()
    cuda = config.device.startswith("cuda")
    counts = threads or ((here,) if cuda else tuple(sorted({1, here})))
    rows = {
        str(n): _isolated("bound", dataclasses.replace(config, compile=compiled), n) for n in counts
    }
    flops = next(iter(rows.values())).pop("flops_per_update")
    for row in rows.values():
        row.pop("flops_per_update", None)
    return {"flops_per_update": flops, "threads": rows}


def agents_and_batch(
    config: Any, compiled: tuple[bool, ...] = (False, True)
) -> tuple[Any, dict[bool, Any], dict[str, torch.Tensor]]:
    """(environment, {compiled: agent}, batch): the agents of ``config``, eager and compiled as
    asked, and one fixed random batch of its environment's shapes on its device, for timing an
    update alone."""
    import gymnasium as gym

    from rlweights.agents.registry import ALGOS

    env = gym.make(config.env_id)
    obs_dim = int(torch.tensor(env.observation_space.shape).prod())
    discrete = isinstance(env.action_space, gym.spaces.Discrete)
    act_shape = () if discrete else env.action_space.shape
    gen = torch.Generator().manual_seed(0)
    n = config.batch_size
    batch = {
        "obs": torch.randn(n, obs_dim, generator=gen),
        "actions": (
            torch.randint(env.action_space.n, (n,), generator=gen).float()
            if discrete
            else torch.rand(n, *act_shape, generator=gen) * 2 - 1
        ),
        "rewards": torch.randn(n, generator=gen),
        "next_obs": torch.randn(n, obs_dim, generator=gen),
        "terminated": torch.zeros(n),
    }
    batch = {k: v.to(torch.device(config.device)) for k, v in batch.items()}
    agents = {
        c: ALGOS[config.algo][1](
            dataclasses.replace(config, compile=c), env.observation_space, env.action_space
        )
        for c in compiled
    }
    return env, agents, batch


def _bound_here(config: Any, rounds: int = 5, repeats: int = 20) -> dict[str, float]:
    """In this process: the matmuls of one eager update (``UpdateMatmuls``; of one cycle
    of updates where they differ, TD3's delayed actor), then ``rounds`` interleaved rounds of
    the eager update, the compiled one (if ``config.compile``; compiled here, at this thread
    count), those matmuls replayed alone and a square matmul (batch x hidden by hidden x
    hidden), each timed on a fixed batch after a warm-up; medians, per update."""
    env, agents, batch = agents_and_batch(
        config, compiled=(False, True) if config.compile else (False,)
    )
    n = config.batch_size
    device = torch.device(config.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def rate(fn: Any, count: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(count):
            fn()
        sync()
        return count / (time.perf_counter() - start)

    env.close()
    envs = make_envs(config.env_id, config.num_envs)
    envs.action_space.seed(0)
    envs.reset(seed=0)
    actions = itertools.cycle([envs.action_space.sample() for _ in range(1000)])
    # TD3 updates its actor every policy_delay-th update: a cycle of updates is recorded
    cycle = getattr(config, "policy_delay", 1)
    products = UpdateMatmuls.record(lambda: [agents[False].train_step(batch) for _ in range(cycle)])
    h = config.hidden[0]
    a, b = torch.randn(n, h, device=device), torch.randn(h, h, device=device)
    timers = {
        "updates_per_second": (lambda: agents[False].train_step(batch), repeats),
        "bound_updates_per_second": (products.replay, repeats),
        "square_matmul_flops_per_second": (lambda: a @ b, 10 * repeats),
        "env_steps_per_second": (lambda: envs.step(next(actions)), 10 * repeats),
    }
    if config.compile:
        timers["compiled_updates_per_second"] = (lambda: agents[True].train_step(batch), repeats)
    for fn, _ in timers.values():  # warm-up: the compiled update compiles here
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {key: [] for key in timers}
    for _ in range(rounds):
        for key, (fn, count) in timers.items():
            samples[key].append(rate(fn, count))
    envs.close()
    out = {key: statistics.median(values) for key, values in samples.items()}
    out["square_matmul_flops_per_second"] *= 2 * n * h * h
    out["bound_updates_per_second"] *= cycle
    out["flops_per_update"] = products.flops / cycle
    out["matmul_flops_per_second"] = out["bound_updates_per_second"] * out["flops_per_update"]
    return out


_MATMULS = {
    torch.ops.aten.mm.default: lambda a, b: (a.shape[0], a.shape[1], b.shape[1], 1),
    torch.ops.aten.addmm.default: lambda c, a, b: (a.shape[0], a.shape[1], b.shape[1], 1),
    torch.ops.aten.bmm.default: lambda a, b: (a.shape[1], a.shape[2], b.shape[2], a.shape[0]),
    torch.ops.aten.baddbmm.default: lambda c, a, b: (
        a.shape[1],
        a.shape[2],
        b.shape[2],
        a.shape[0],
    ),
}


class UpdateMatmuls(TorchDispatchMode):
    """The matrix products one call of a function makes (forward and backward), recorded with
    their sizes, strides, dtypes and scalar arguments, and replayed alone on random tensors of
    the same layout: the time of a step that does only its matmuls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, list[Any], dict[str, Any]]] = []
        self.flops = 0.0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        kwargs = kwargs or {}
        sizes = _MATMULS.get(func)
        if sizes is not None:
            m, k, n, batch = sizes(*args)
            self.flops += 2.0 * m * k * n * batch
            self.calls.append((func, [_like(a) for a in args], dict(kwargs)))
        return func(*args, **kwargs)

    @classmethod
    def record(cls, fn: Callable[[], Any]) -> UpdateMatmuls:
        with cls() as mode:
            fn()
        return mode

    def replay(self) -> None:
        for func, args, kwargs in self.calls:
            func(*args, **kwargs)


def _like(value: Any) -> Any:
    """A random tensor with ``value``'s sizes, strides (broadcast dimensions included), dtype
    and device; anything else as it is."""
    if not isinstance(value, torch.Tensor):
        return value
    layout = zip(value.shape, value.stride(), strict=True)
    span = 1 + sum((size - 1) * stride for size, stride in layout)
    base = torch.randn(span, dtype=value.dtype, device=value.device)
    return base.as_strided(value.shape, value.stride())


def available(impls: list[str], device: str = "cpu") -> list[str]:
    """The implementations of ``impls`` that run here: SBX needs sbx-rl (and is timed on the
    CPU only), CUDA graphs a CUDA device."""
    cuda = device.startswith("cuda")
    return [
        i
        for i in impls
        if (i != "sbx" or (importlib.util.find_spec("sbx") is not None and not cuda))
        and (i != "cudagraphs" or cuda)
    ]


def run(
    algos: list[str], rounds: int, steps: dict[str, int], impls: list[str], device: str = "cpu"
) -> dict:
    impls = available(impls, device)
    results: dict = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        },
        "rounds": rounds,
        "impls": impls,
        "algos": {},
    }
    for algo in algos:
        config = make_config(
            algorithm(algo),
            total_steps=steps[algo],
            eval_every=0,
            eval_episodes=1,
            drift_every=0,
            device=device,
            **SETTINGS[algo],
        )
        here = [impl for impl in impls if (algo, impl) not in MISSING]
        runs: dict[str, list[dict[str, float]]] = {impl: [] for impl in here}
        for r in range(rounds):
            order = here[r % len(here) :] + here[: r % len(here)]
            for impl in order:
                runs[impl].append(_isolated(impl, dataclasses.replace(config, seed=r)))
        speeds = {k: [x["steps_per_second"] for x in v] for k, v in runs.items()}
        row = {
            "env_id": config.env_id,
            "steps": config.total_steps,
            "hidden": list(config.hidden),
            "batch_size": config.batch_size,
            "train_freq": config.train_freq,
            "gradient_steps": config.gradient_steps,
            "steps_per_second": {k: statistics.median(v) for k, v in speeds.items()},
            "all_steps_per_second": speeds,
            "compile_seconds": {
                k: statistics.median(x["compile_seconds"] for x in v) for k, v in runs.items()
            },
        }
        if "sb3" in speeds:
            row["vs_sb3"] = {
                k: statistics.median(a / b for a, b in zip(v, speeds["sb3"], strict=True))
                for k, v in speeds.items()
            }
            row["speedup"] = row["vs_sb3"].get("native")
        if "sbx" in speeds:
            row["vs_sbx"] = {
                k: statistics.median(a / b for a, b in zip(v, speeds["sbx"], strict=True))
                for k, v in speeds.items()
            }
        same = results["algos"].get(algorithm(algo))  # the same update: measured once
        row["bound"] = same["bound"] if same else update_bound(config, compiled="compile" in impls)
        row["ceiling_steps_per_second"] = {
            count: ceiling(b, config.gradient_steps / config.train_freq)
            for count, b in row["bound"]["threads"].items()
        }
        results["algos"][algo] = row
    return results


def ceiling(bound: dict[str, float], updates_per_step: float) -> float:
    """Environment steps per second at the ceiling (see the module's text): one environment
    step and ``updates_per_step`` updates at the matmul bound, nothing else."""
    seconds = updates_per_step / bound["bound_updates_per_second"]
    return 1 / (seconds + 1 / bound["env_steps_per_second"])


def markdown(result: dict) -> str:
    impls = result["impls"]
    head = " | ".join(f"{i} steps/s" for i in impls)
    lines = [
        f"| algorithm | env | network | batch | steps | {head} | vs SB3 (median of rounds) | "
        "vs SBX | update / bound (eager, compiled; timed alone) | ceiling steps/s (share of it) |",
        "|---|---|---|---|---|" + "---|" * len(impls) + "---|---|---|---|",
    ]
    run_threads = str(result["machine"]["threads"])
    for algo, r in result["algos"].items():
        ratio = r["gradient_steps"] / r["train_freq"]  # gradient steps per environment step
        speeds = " | ".join(
            "-"
            if i not in r["steps_per_second"]
            else f"{r['steps_per_second'][i]:.0f}"
            + (f" ({ratio * r['steps_per_second'][i]:.0f} updates/s)" if ratio > 1 else "")
            for i in impls
        )
        vs = ", ".join(f"{i} {x:.2f}x" for i, x in r.get("vs_sb3", {}).items() if i != "sb3")
        vs_sbx = ", ".join(f"{i} {x:.2f}x" for i, x in r.get("vs_sbx", {}).items() if i != "sbx")
        bounds = []
        for count, b in r["bound"]["threads"].items():
            fractions = [
                f"{b[k] / b['bound_updates_per_second']:.0%}"
                for k in ("updates_per_second", "compiled_updates_per_second")
                if k in b
            ]
            threads = f"{count} thread{'s' if count != '1' else ''}"
            bounds.append(
                f"{threads}: {', '.join(fractions)} of {b['bound_updates_per_second']:.0f}/s"
            )
        bound = "; ".join(bounds)
        top = r.get("ceiling_steps_per_second", {}).get(run_threads)
        if top:
            shares = ", ".join(
                f"{i} {speed / top:.0%}" for i, speed in r["steps_per_second"].items()
            )
            top = f"{top:.0f} ({shares})"
        lines.append(
            f"| {algo.upper()} | {r['env_id']} | {'-'.join(map(str, r['hidden']))} | "
            f"{r['batch_size']} | {r['steps']} | {speeds} | {vs or '-'} | {vs_sbx or '-'} | "
            f"{bound} | "
            f"{top or '-'} |"
        )
    if "sbx" not in impls:
        lines.append("\n(SBX not installed here: pip install 'rlweights[bench]' adds it.)")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--algos",
        nargs="+",
        choices=list(SETTINGS),
        default=list(SETTINGS),
        help="rows: sac, td3, dqn, sac-utd20 (SAC at 20 gradient steps per environment step), "
        "tqc, droq (20 gradient steps per environment step)",
    )
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=IMPLS,
        default=list(IMPLS),
        help="native, compile (native --compile), cudagraphs (--compile --cudagraphs, on "
        "CUDA), sb3, sbx (when sbx-rl is installed; CPU)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each, rotating (3)")
    parser.add_argument(
        "--steps",
        type=int,
        default=1500,
        help="env steps per SAC/TD3/TQC run (1500; DQN: 10x, sac-utd20 and droq: a quarter, "
        "at least 300)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw results as JSON here")


def main_from_args(args: argparse.Namespace) -> int:
    if args.rounds < 1 or args.steps < 400:
        raise SystemExit("rlweights bench-train: --rounds must be >= 1 and --steps >= 400")
    steps = {"sac": args.steps, "td3": args.steps, "tqc": args.steps, "dqn": 10 * args.steps}
    steps["sac-utd20"] = steps["droq"] = max(300, args.steps // 4)
    result = run(args.algos, args.rounds, steps, list(args.impls), args.device)
    print(markdown(result), end="")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
