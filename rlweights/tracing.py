"""What torch.compile is told about the core's functions, without importing torch._dynamo.

``torch.compiler.assume_constant_result`` imports ``torch._dynamo`` (and with it sympy and
much of torch's compiler) when it is applied; applied at import time as a decorator, it made
every process pay for the compiler, also those that never compile. The mark it sets is
applied here instead, and a test holds it equal to the one torch's decorator sets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["constant_when_traced"]

_F = TypeVar("_F", bound=Callable[..., object])


def constant_when_traced(fn: _F) -> _F:
    """Mark ``fn`` as ``torch.compiler.assume_constant_result`` does: while torch.compile
    traces a function that calls ``fn``, it runs ``fn`` for real once and builds the answer
    into the compiled code as a constant. Eager calls are untouched."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn
