"""Benchmark of weight averaging across processes: rw.distributed.all_average_ against
PyTorch's average_parameters (torch.distributed.algorithms.model_averaging), with N
processes (default 2) joined by gloo on 127.0.0.1 (loopback).

Every process builds the same networks and runs the same interleaved schedule: each round
times every implementation (rotating which goes first) after a barrier; the times reported
are rank 0's, medians over rounds, with the ratio to average_parameters per round. "all_reduce
of one flat buffer" is the floor: the collective alone, nothing around it.

Run as 'rlweights bench-distributed' or 'python scripts/bench_distributed.py'.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import statistics
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import rlweights as rw
from rlweights.bench.models import MODELS
from rlweights.files import write_json

__all__ = ["add_arguments", "main_from_args", "markdown", "run"]

BASELINE = "torch average_parameters"


def _candidates(build: Any) -> dict[str, Any]:
    """{name: call} for one network size, each on its own copy of the network."""
    import torch  # here and below, not at import: the command's --help starts without torch
    import torch.distributed as dist
    from torch.distributed.algorithms.model_averaging.utils import average_parameters

    torch_net, plain, flat = build(), build(), build()
    rw.flatten_(flat)
    floor = torch.zeros(sum(p.numel() for p in flat.parameters()))
    return {
        BASELINE: lambda: average_parameters(iter(list(torch_net.parameters())), None),
        "rw.all_average_ (module, not flat)": lambda: rw.distributed.all_average_(plain),
        "rw.all_average_ (flat module)": lambda: rw.distributed.all_average_(flat),
        "all_reduce of one flat buffer (floor)": lambda: dist.all_reduce(floor),
    }


def _worker(rank: int, world: int, port: int, models: list[str], rounds: int, queue: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    try:
        result: dict[str, Any] = {}
        for model in models:
            torch.manual_seed(rank)
            calls = _candidates(MODELS[model])
            params = sum(p.numel() for p in MODELS[model]().parameters())
            inner = 50 if params < 1_000_000 else 3
            for call in calls.values():
                call()  # warm-up (and the cross-process layout check)
            times: dict[str, list[float]] = {name: [] for name in calls}
            names = list(calls)
            for r in range(rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    dist.barrier()
                    start = time.perf_counter()
                    for _ in range(inner):
                        calls[name]()
                    times[name].append((time.perf_counter() - start) / inner)
            ratios = {
                name: statistics.median(
                    b / t for b, t in zip(times[BASELINE], times[name], strict=True)
                )
                for name in names
            }
            result[model] = {
                "params": params,
                "us": {name: statistics.median(v) * 1e6 for name, v in times.items()},
                "speedup": ratios,
            }
        if rank == 0:
            queue.put(result)
    finally:
        dist.destroy_process_group()


def run(models: list[str], rounds: int = 15, processes: int = 2) -> dict[str, Any]:
    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(rank, processes, port, models, rounds, queue))
        for rank in range(processes)
    ]
    for p in procs:
        p.start()
    try:
        result = queue.get(timeout=1800)
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    return {
        "torch": torch.__version__,
        "processes": processes,
        "backend": "gloo (127.0.0.1)",
        "threads_per_process": 1,
        "rounds": rounds,
        "models": result,
    }


def markdown(result: dict[str, Any]) -> str:
    models = result["models"]
    names = list(next(iter(models.values()))["us"])
    header = " | ".join(f"{m} ({models[m]['params']:,})" for m in models)
    lines = [
        f"torch {result['torch']}, {result['processes']} processes, {result['backend']}, "
        f"{result['threads_per_process']} thread each, {result['rounds']} rounds "
        f"(medians; speedup = median of per-round ratios to `{BASELINE}`).",
        "",
        f"| implementation | {header} |",
        "|---|" + "---:|" * len(models),
    ]
    for name in names:
        cells = []
        for row in models.values():
            us, x = row["us"][name], row["speedup"][name]
            time_text = f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} us"
            cells.append(f"{time_text} ({x:.2f}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models",
        nargs="+",
        default=["sac_critic", "mlp_16m"],
        choices=sorted(MODELS),
        help="networks to average (default: sac_critic mlp_16m)",
    )
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (15)")
    parser.add_argument("--processes", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--json", type=Path, help="also write the raw results as JSON here")


def main_from_args(args: argparse.Namespace) -> int:
    if args.rounds < 1 or args.processes < 2:
        raise SystemExit("rlweights bench-distributed: --rounds >= 1 and --processes >= 2")
    result = run(args.models, args.rounds, args.processes)
    print(markdown(result), end="")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
