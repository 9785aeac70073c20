"""Side-by-side benchmark of target-network (Polyak) updates and policy EMAs.

Run as 'rlweights bench' or 'python scripts/bench_ops.py'. Every competitor (SB3's
polyak_update, CleanRL's inline loop, torch's foreach and AveragedModel, ema-pytorch,
rlweights) gets its own online/target pair of the same network; they run interleaved
(A B C ... A B C ..., the order rotating each round) and the table reports medians of
per-round times and of per-round ratios, because these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import rlweights as rw
from rlweights.bench.models import MODELS, sac_critic
from rlweights.files import write_json

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["markdown", "run"]

TAU = 0.005
SB3 = "SB3 polyak_update"
FOREACH = "torch._foreach_lerp_"
RW = "rw.polyak_ (make_target)"
RAW = "one flat lerp_, unchecked"
COPY = "flat copy_ (memory bound)"


@dataclass
class _Competitor:
    name: str
    call: Callable[[], object]
    bytes_per_call: int


def _pair(build: Callable[[], nn.Module], device: torch.device) -> tuple[nn.Module, nn.Module]:
    import torch  # here and below, not at import: the command's --help starts without torch

    online = build().to(device)
    target = build().to(device)
    target.load_state_dict(online.state_dict())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(0.01)
    target.requires_grad_(False)
    return online, target


def _competitors(build: Callable[[], nn.Module], device: torch.device) -> list[_Competitor]:
    import torch

    numel = sum(p.numel() for p in build().parameters())
    lerp_bytes, copy_bytes = 3 * 4 * numel, 2 * 4 * numel  # float32: read 2 + write 1, r1 + w1
    out = []
    try:
        from stable_baselines3.common.utils import polyak_update

        online, target = _pair(build, device)
        out.append(
            _Competitor(
                SB3,
                # The call exactly as SB3's SAC.train makes it, generators included.
                lambda o=online, t=target: polyak_update(o.parameters(), t.parameters(), TAU),
                lerp_bytes,
            )
        )
    except ImportError:
        pass

    online, target = _pair(build, device)

    def cleanrl(o: nn.Module = online, t: nn.Module = target) -> None:
        # CleanRL's inline form (sac_continuous_action.py): out of place, through .data.
        for param, target_param in zip(o.parameters(), t.parameters(), strict=False):
            target_param.data.copy_(TAU * param.data + (1 - TAU) * target_param.data)

    out.append(_Competitor("CleanRL inline loop", cleanrl, lerp_bytes))

    online, target = _pair(build, device)
    o_list, t_list = list(online.parameters()), list(target.parameters())

    def foreach(o: list = o_list, t: list = t_list) -> None:
        with torch.no_grad():
            torch._foreach_lerp_(t, o, TAU)

    out.append(_Competitor(FOREACH, foreach, lerp_bytes))

    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    online, _ = _pair(build, device)
    ema = AveragedModel(online, multi_avg_fn=get_ema_multi_avg_fn(1 - TAU))
    ema.update_parameters(online)  # the first call copies; later ones average
    out.append(
        _Competitor("AveragedModel EMA", lambda e=ema, o=online: e.update_parameters(o), lerp_bytes)
    )
    try:
        from ema_pytorch import EMA as EmaPytorch

        online, _ = _pair(build, device)
        # Its fastest setting, updating at every call (its defaults: every 10th, per tensor).
        other = EmaPytorch(
            online,
            beta=1 - TAU,
            update_after_step=0,
            update_every=1,
            use_foreach=True,
            include_online_model=False,
        )
        other.update()  # the first call copies; later ones average
        out.append(_Competitor("ema-pytorch EMA (foreach)", other.update, lerp_bytes))
    except ImportError:
        pass
    online, _ = _pair(build, device)
    out.append(_Competitor("rw.EMA", rw.EMA(online, tau=TAU).update, lerp_bytes))

    online, target = _pair(build, device)
    out.append(
        _Competitor(
            "rw.polyak_ (plain modules)",
            lambda o=online, t=target: rw.polyak_(t, o, TAU),
            lerp_bytes,
        )
    )

    online, _ = _pair(build, device)
    target = rw.make_target(online)
    out.append(_Competitor(RW, lambda o=online, t=target: rw.polyak_(t, o, TAU), lerp_bytes))

    src = torch.randn(numel, device=device)
    dst = torch.randn(numel, device=device)
    # What the safety checks cost: the same flat lerp_ without validation or version bumps.
    out.append(_Competitor(RAW, lambda d=dst, s=src: d.lerp_(s, TAU), lerp_bytes))
    out.append(_Competitor(COPY, lambda d=dst, s=src: d.copy_(s), copy_bytes))
    return out


def _time_batch(call: Callable[[], object], inner: int, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(inner):
        call()
    sync()
    return (time.perf_counter() - start) / inner


def _bench_model(name: str, device: torch.device, rounds: int, min_batch_s: float) -> dict:
    import torch

    build = MODELS[name]
    torch.manual_seed(0)
    model = build()
    numel = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    comps = _competitors(build, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    inner = {}
    for c in comps:  # warm up and size each batch to at least min_batch_s
        once = min(_time_batch(c.call, 1, sync) for _ in range(3))
        inner[c.name] = max(1, int(min_batch_s / max(once, 1e-7)))
    times: dict[str, list[float]] = {c.name: [] for c in comps}
    for r in range(rounds):
        order = comps[r % len(comps) :] + comps[: r % len(comps)]
        for c in order:
            times[c.name].append(_time_batch(c.call, inner[c.name], sync))
    rows = {}
    for c in comps:
        t = times[c.name]
        row = {
            "median_us": statistics.median(t) * 1e6,
            "bandwidth_gbs": c.bytes_per_call / statistics.median(t) / 1e9,
        }
        for ref, key in ((SB3, "speedup_vs_sb3"), (COPY, "time_vs_copy")):
            if ref in times:
                ratios = [
                    (b / a if key == "speedup_vs_sb3" else a / b)
                    for a, b in zip(t, times[ref], strict=True)
                ]
                row[key] = statistics.median(ratios)
        rows[c.name] = row
    if FOREACH in times:
        rows[RW]["speedup_vs_foreach"] = statistics.median(
            b / a for a, b in zip(times[RW], times[FOREACH], strict=True)
        )
    rows[RW]["bandwidth_vs_copy"] = rows[RW]["bandwidth_gbs"] / rows[COPY]["bandwidth_gbs"]
    return {"params": numel, "tensors": tensors, "rounds": rounds, "rows": rows}


def _kernels_per_update(device: torch.device) -> int | None:
    """CUDA kernels launched by one rw.polyak_ on a make_target pair (SAC critic)."""
    import torch

    if device.type != "cuda":
        return None
    online = sac_critic().to(device)
    target = rw.make_target(online)
    rw.polyak_(target, online, TAU)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        rw.polyak_(target, online, TAU)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def run(
    models: list[str], device: str = "cpu", rounds: int = 15, min_batch_s: float = 0.002
) -> dict:
    """Benchmark each model; returns a JSON-able dict (see ``markdown``)."""
    import torch

    dev = torch.device(device)
    result = {
        "device": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else platform.processor() or platform.machine(),
        "device_type": dev.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "tau": TAU,
        "models": {name: _bench_model(name, dev, rounds, min_batch_s) for name in models},
    }
    result["kernels_per_update"] = _kernels_per_update(dev)
    result["goals"] = _goals(result)
    return result


def _goals(result: dict) -> list[dict]:
    models = result["models"]
    goals = []

    def goal(text: str, value: float | None, ok: bool | None) -> None:
        goals.append({"goal": text, "measured": value, "met": ok})

    if result["device_type"] == "cpu":
        if "sac_critic" in models:
            row = models["sac_critic"]["rows"][RW]
            v = row.get("speedup_vs_sb3")
            goal("SAC critic: rw.polyak_ >= 6x faster than SB3", v, None if v is None else v >= 6)
            v = row.get("speedup_vs_foreach")
            goal("SAC critic: rw.polyak_ >= 1.2x faster than _foreach_lerp_", v, v >= 1.2)
        if "mlp_16m" in models:
            v = models["mlp_16m"]["rows"][RW]["time_vs_copy"]
            goal("16M: rw.polyak_ within 1.25x of a same-size copy_", v, v <= 1.25)
    else:
        k = result.get("kernels_per_update")
        goal("one kernel per (device, dtype) group (SAC critic: 1)", k, k == 1)
        if "mlp_16m" in models:
            v = models["mlp_16m"]["rows"][RW]["bandwidth_vs_copy"]
            goal("16M: rw.polyak_ >= 80% of copy_ bandwidth", v, v >= 0.8)
        if "sac_critic" in models:
            v = models["sac_critic"]["rows"][RW].get("speedup_vs_sb3")
            goal("SAC critic: speedup vs SB3 (recorded)", v, None)
    return goals


def markdown(result: dict) -> str:
    """The result as markdown tables, one per model, plus the goals."""
    lines = [
        f"Device: {result['device']} ({result['device_type']}), torch {result['torch']}, "
        f"{result['threads']} threads, tau={result['tau']}, float32.",
        "",
    ]
    for name, m in result["models"].items():
        lines += [
            f"**{name}** ({m['params']:,} parameters, {m['tensors']} tensors, "
            f"median of {m['rounds']} interleaved rounds)",
            "",
            "| implementation | time per update | speedup vs SB3 | time vs copy_ | GB/s |",
            "|---|---:|---:|---:|---:|",
        ]
        for impl, row in m["rows"].items():
            speed = f"{row['speedup_vs_sb3']:.2f}x" if "speedup_vs_sb3" in row else "n/a"
            lines.append(
                f"| {impl} | {_fmt_time(row['median_us'])} | {speed} | "
                f"{row['time_vs_copy']:.2f}x | {row['bandwidth_gbs']:.1f} |"
            )
        extra = m["rows"][RW].get("speedup_vs_foreach")
        if extra is not None:
            lines += ["", f"rw.polyak_ runs at {extra:.2f}x the speed of torch._foreach_lerp_."]
        lines.append("")
    if result.get("kernels_per_update") is not None:
        lines += [f"CUDA kernels per rw.polyak_ (SAC critic): {result['kernels_per_update']}", ""]
    lines += ["| goal | measured | met |", "|---|---:|:---:|"]
    for g in result["goals"]:
        value = "n/a" if g["measured"] is None else f"{g['measured']:.2f}"
        met = {True: "yes", False: "**no**", None: "-"}[g["met"]]
        lines.append(f"| {g['goal']} | {value} | {met} |")
    return "\n".join(lines) + "\n"


def _fmt_time(us: float) -> str:
    return f"{us:.1f} us" if us < 1000 else f"{us / 1000:.2f} ms"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models",
        nargs="+",
        choices=sorted(MODELS),
        default=list(MODELS),
        help="networks to benchmark (default: all three)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument(
        "--rounds", type=int, default=15, help="interleaved rounds per model (default: 15)"
    )
    parser.add_argument(
        "--min-batch-ms",
        type=float,
        default=2.0,
        help="each timed batch repeats the update for at least this long (default: 2)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw results as JSON here")


def main_from_args(args: argparse.Namespace) -> int:
    import torch

    if args.rounds < 1:
        raise SystemExit("rlweights bench: --rounds must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("rlweights bench: --device cuda asked for, but torch sees no CUDA device")
    result = run(args.models, args.device, args.rounds, args.min_batch_ms / 1000)
    print(markdown(result), end="")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
