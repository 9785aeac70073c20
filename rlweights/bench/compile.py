"""When compiling a native agent's gradient step pays for itself (``rlweights bench-compile``).

For each algorithm, with the preset that ``rlweights train --algo ALGO`` uses: the seconds that
compiling costs before the compiled step runs, with an empty inductor cache (cold: the first
run of this code) and with the cache that run left (warm: every later run), each in a fresh
process; and the time of one gradient step, eager and compiled, in interleaved rounds on one
fixed batch. The compile seconds are the first few compiled steps less as many eager ones
(TD3 compiles a second graph, its delayed actor step, at its second call; DroQ at its 20th:
the steps counted reach past the policy delay). The break-even is
the gradient steps after which the compiled step's saving has paid for its compiling:
``compile seconds / (eager - compiled seconds per step)``.

``rlweights train --compile auto`` compiles a run that plans about twice the cold break-even
(:data:`rlweights.agents.compiled.COMPILE_PAYS_FROM`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from rlweights.files import write_json

__all__ = ["add_arguments", "main_from_args", "markdown", "run"]

FIRST = 6  # compiled steps counted as compiling at least: past TD3's second graph


def _measure(algo: str, threads: int, rounds: int, steps: int) -> dict[str, Any]:
    """In a fresh process (its inductor cache set by the caller): compile seconds and the
    seconds per step, eager and compiled."""
    from rlweights.agents.registry import make_config
    from rlweights.bench.train import agents_and_batch

    torch.set_num_threads(threads)
    config = make_config(algo)
    env, agents, batch = agents_and_batch(config)
    env.close()
    first = max(FIRST, getattr(config, "policy_delay", 1) + 1)  # past the delayed actor's graph

    def seconds(agent: Any, count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            agent.train_step(batch)
        return (time.perf_counter() - start) / count

    seconds(agents[False], 20)  # warm-up
    eager = statistics.median(seconds(agents[False], 1) for _ in range(20))
    start = time.perf_counter()
    for _ in range(first):
        agents[True].train_step(batch)
    compile_seconds = time.perf_counter() - start - first * eager
    compiled = agents[True].compiled is not None and not agents[True].compiled.failed
    seconds(agents[True], 20)
    per: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for c in (False, True) if r % 2 == 0 else (True, False):
            per[c].append(seconds(agents[c], steps))
    return {
        "compile_seconds": compile_seconds,
        "compiled": compiled,
        "eager_seconds_per_step": statistics.median(per[False]),
        "compiled_seconds_per_step": statistics.median(per[True]),
    }


def break_even(compile_seconds: float, eager: float, compiled: float) -> float | None:
    """Gradient steps until the compiled step's saving pays for compiling (None: never)."""
    return compile_seconds / (eager - compiled) if compiled < eager else None


def run(algos: list[str], repeats: int, rounds: int, steps: int, threads: int) -> dict:
    from rlweights.agents.compiled import COMPILE_PAYS_FROM
    from rlweights.bench.train import in_fresh_process

    result: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": threads,
        "repeats": repeats,
        "algos": {},
    }
    for algo in algos:
        samples: dict[str, list[dict[str, Any]]] = {"cold": [], "warm": []}
        for _ in range(repeats):
            with tempfile.TemporaryDirectory(prefix="rlweights-inductor-") as cache:
                env = {
                    "TORCHINDUCTOR_CACHE_DIR": cache,
                    "TRITON_CACHE_DIR": f"{cache}/triton",
                    "OMP_NUM_THREADS": str(threads),
                }
                for kind in ("cold", "warm"):  # the warm process reads what the cold one wrote
                    sample = in_fresh_process(_measure, algo, threads, rounds, steps, env=env)
                    samples[kind].append(sample)
        everything = samples["cold"] + samples["warm"]
        eager = statistics.median(s["eager_seconds_per_step"] for s in everything)
        compiled = statistics.median(s["compiled_seconds_per_step"] for s in everything)
        row: dict[str, Any] = {
            "eager_ms_per_step": 1e3 * eager,
            "compiled_ms_per_step": 1e3 * compiled,
            "compiled": all(s["compiled"] for s in everything),
            "samples": samples,
            "compile_pays_from": COMPILE_PAYS_FROM.get(algo, "not set"),
        }
        for kind in ("cold", "warm"):
            seconds = statistics.median(s["compile_seconds"] for s in samples[kind])
            row[f"compile_seconds_{kind}"] = seconds
            row[f"break_even_{kind}"] = break_even(seconds, eager, compiled)
        result["algos"][algo] = row
    return result


def markdown(result: dict) -> str:
    def steps(value: float | None) -> str:
        return "never" if value is None else f"{value:,.0f}"

    lines = [
        "| algorithm | eager ms/step | compiled ms/step | compile s, cold / warm | "
        "break-even gradient steps, cold / warm | --compile auto compiles from |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for algo, r in result["algos"].items():
        pays = r["compile_pays_from"]  # None: never; "not set": not measured before
        pays = "never (eager)" if pays is None else f"{pays:,}" if isinstance(pays, int) else pays
        lines.append(
            f"| {algo} | {r['eager_ms_per_step']:.2f} | {r['compiled_ms_per_step']:.2f} | "
            f"{r['compile_seconds_cold']:.1f} / {r['compile_seconds_warm']:.1f} | "
            f"{steps(r['break_even_cold'])} / {steps(r['break_even_warm'])} | "
            f"{pays} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rlweights.agents.registry import ALGOS

    parser.add_argument("--algos", nargs="+", choices=sorted(ALGOS), default=list(ALGOS))
    parser.add_argument(
        "--repeats", type=int, default=3, help="cold and warm processes per algorithm (3)"
    )
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (7)")
    parser.add_argument("--steps", type=int, default=200, help="gradient steps per round (200)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1, rlweights train's default)"
    )
    parser.add_argument("--json", help="also write the raw results as JSON here")


def main_from_args(args: argparse.Namespace) -> int:
    for name in ("repeats", "rounds", "steps", "threads"):
        if getattr(args, name) < 1:
            print(f"rlweights bench-compile: error: --{name} must be at least 1", file=sys.stderr)
            return 2
    result = run(args.algos, args.repeats, args.rounds, args.steps, args.threads)
    print(markdown(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
