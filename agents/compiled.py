"""A native agent's whole gradient step compiled as one unit (``rlweights train --compile``).

The compiled step is the agent's own ``gradient_step``, the one the eager run executes,
wrapped in ``torch.compile(fullgraph=True)``: one graph, no host sync, no graph break. In this
torch, ``loss.backward()`` and ``optimizer.step()`` break a graph (and a step compiled piece
by piece is slower than an eager one), so the one place where the two differ,
``minimize``, takes the gradients there with
``torch.func.grad_and_value`` (the same modules, called on their parameters as inputs) and
Adam as tensor code on the ``torch.optim.Adam`` objects' own state (``tensor_adam_step_``:
checkpoints and ``--resume`` see the same optimizer state either way). The target update
and the policy EMA are the capturable rlweights routines (``rlweights.capture``), eagerly
too.

Random draws (the policy's noise) are made outside the graph, in the eager step's order, so
that a compiled run draws the numbers the eager one draws.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BACKEND",
    "COMPILE_PAYS_FROM",
    "CompiledStep",
    "compile_pays",
    "forget_adam_state_",
    "planned_gradient_steps",
    "prepare_adam",
    "tensor_adam_step_",
]

BACKEND = "inductor"
"""The torch.compile backend of the compiled steps: inductor generates the fused kernels; the tests
also use "aot_eager" (the same tracing and functionalization, no code generation, seconds
instead of a minute of compiling)."""


COMPILE_PAYS_FROM: dict[str, int | None] = {"sac": 16_000, "td3": 30_000, "ddpg": 24_000}
"""``rlweights train --compile auto`` (the default) compiles the gradient step of a run that plans
at least this many gradient steps: about twice as many as it takes, on the CPU, for the compiled
step's saving to pay for compiling with an empty inductor cache (docs/benchmarks.md, "When
compiling pays"). DQN (None) is left eager: its compiled step gains too little per step for its
runs' lengths. An algorithm not listed has not been measured: eager unless --compile on."""
COMPILE_PAYS_FROM |= {"tqc": 3_500, "droq": 28_000, "dqn": None}


def planned_gradient_steps(config: Any) -> int:
    """The gradient steps a run of ``config`` makes: ``gradient_steps`` at every
    ``train_freq``-th environment step after ``learning_starts``."""
    trained = max(config.total_steps - config.learning_starts, 0)
    return trained // config.train_freq * config.gradient_steps


def compile_pays(config: Any) -> tuple[bool, str]:
    """``--compile auto``: whether a run of ``config`` compiles its gradient step, and why, in
    a few words. On the CPU only: on CUDA, where compiling has not been measured, auto stays
    eager (``--compile on`` compiles)."""
    planned = planned_gradient_steps(config)
    if config.algo not in COMPILE_PAYS_FROM:
        return False, f"eager (when compiling {config.algo} pays is not measured; --compile on)"
    threshold = COMPILE_PAYS_FROM[config.algo]
    if threshold is None:
        return False, f"eager ({config.algo}'s compiled step does not pay for its compiling)"
    if not config.device.startswith("cpu"):
        return False, "eager (on CUDA only --compile on compiles)"
    if planned < threshold:
        return False, f"eager ({planned} gradient steps; compiling pays from about {threshold})"
    return True, f"compiled ({planned} gradient steps; compiling pays from about {threshold})"


def prepare_adam(optimizer: torch.optim.Optimizer) -> None:
    """Create the state an Adam step writes (``torch.optim.Adam`` creates it lazily, at its
    first step): step count, first and second moments, as the fused and capturable forms keep
    them (the step count a float32 tensor on the parameter's device)."""
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("weight_decay") or group.get("maximize"):
            raise ValueError("the compiled step takes Adam without amsgrad, weight decay, maximize")
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }


def forget_adam_state_(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> None:
    """Adam's state of ``params`` back to a fresh one (step count and moments zero), in place:
    what ``rw.reset_optimizer_state_`` does for an eager step, but keeping the tensors that a
    compiled step reads (a new state object would leave it reading the old ones)."""
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in ids and optimizer.state[p]:
                for value in optimizer.state[p].values():
                    value.zero_()


def tensor_adam_step_(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], grads: Iterable[Tensor]
) -> None:
    """One Adam step of ``params`` (all in the optimizer's first group) down ``grads``, as
    ``torch.optim.Adam`` takes it, written as tensor code on the optimizer's state (see
    ``prepare_adam``): traceable, no host sync."""
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    lr, eps = group["lr"], group["eps"]
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            state = optimizer.state[p]
            step = state["step"]
            step.add_(1)
            state["exp_avg"].lerp_(g, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            # The step size and the bias correction, computed once into a buffer of their
            # own (stacked): inlined, inductor's CPU loop recomputes their powers for every
            # vector of the parameter (the step is re-read after each store), a slower pass
            # (docs/benchmarks.md). Same arithmetic, bit-identical results.
            scalars = torch.stack([lr / (1 - beta1**step), (1 - beta2**step).sqrt()])
            denom = (state["exp_avg_sq"].sqrt() / scalars[1]).add_(eps)
            p.sub_(scalars[0] * state["exp_avg"] / denom)


class CompiledStep:
    """``fn`` compiled with ``torch.compile(fullgraph=True)``. Every call first runs
    ``checks`` (the capturable routines' and constraints' layout checks: a few pointer
    comparisons), so that weights moved since the step was built raise
    ``LayoutChangedError`` instead of a compiled write into old memory. Where
    compiling is impossible here (no C++ compiler for the CPU backend, an unsupported torch),
    the first call says so in one line and returns None from then on: the caller goes on
    eagerly."""

    def __init__(
        self,
        fn: Callable[..., Any],
        name: str,
        cudagraphs: bool = False,
        checks: Sequence[Callable[[], None]] = (),
        cpp_wrapper: bool = False,
    ):
        # "reduce-overhead": the compiled step is recorded as a CUDA graph and replayed (the
        # batch is copied into the graph's own input buffers; the weights, optimizer state
        # and routines' tensors stay where they are)
        self.mode = "reduce-overhead" if cudagraphs else None
        # ``cpp_wrapper`` (the agents ask for it on the CPU): inductor's C++ wrapper calls the
        # step's kernels and matmuls from C++ instead of a Python function: a faster update on
        # the CPU, bit-identical, for a longer cold compile (docs/benchmarks.md). Where it
        # cannot compile, the step is compiled again without it.
        use_cpp = cpp_wrapper and not cudagraphs and BACKEND == "inductor"
        self.options: dict[str, Any] | None = {"cpp_wrapper": True} if use_cpp else None
        self._source = fn
        self.fn = self._compile()
        self.name = name
        self.cudagraphs = cudagraphs
        self.checks = list(checks)
        self.failed = False
        self._tried = False

    def _compile(self) -> Callable[..., Any]:
        return torch.compile(
            self._source, fullgraph=True, mode=self.mode, backend=BACKEND, options=self.options
        )

    def __call__(self, *args: Any) -> Any:
        if self.failed:
            return None
        for check in self.checks:  # a moved layout: LayoutChangedError, before any write
            check()
        if self.cudagraphs:  # a new training step: earlier outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        if self._tried:
            return self.fn(*args)
        from torch._dynamo.exc import BackendCompilerFailed, TorchRuntimeError, Unsupported

        try:
            out = self.fn(*args)  # a failure to compile raises before the step runs
        except (BackendCompilerFailed, TorchRuntimeError, Unsupported) as exc:
            if self.options is not None:  # without the C++ wrapper, before training eagerly
                self.options = None
                self.fn = self._compile()
                return self(*args)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            print(
                f"rlweights train: --compile: {self.name} could not be compiled here "
                f"({first[:160]}); training eagerly",
                file=sys.stderr,
                flush=True,
            )
            self.failed = True
            return None
        self._tried = True
        return out
