"""Seeding and random-number state: one seed for python, numpy and torch, and the RNG states a
checkpoint keeps so that a resumed run draws what an unstopped one would."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["MAX_SEED", "rng_state", "seed_everything", "set_rng_state"]


MAX_SEED = 2**31 - 1
"""The largest seed. Seeds are 31-bit: numpy takes up to 2**32 - 1, and parallel learners add their
rank's offset (rlweights.agents.parallel) to the seed."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (environments are seeded through ``reset(seed=...)``)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global RNG states of python, numpy and torch, as plain tensors and numbers (so
    that a checkpoint holding them loads with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the random generators of python, numpy and torch from ``rng_state()``'s output."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
