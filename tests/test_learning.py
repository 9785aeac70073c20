"""Learning parity with SB3 over seeds (slow): the native agent is not worse than SB3's
algorithm beyond the 95 % bootstrap intervals of the final return over 5 seeds, both trained
with the environment's preset and the same seeds by 'rlweights bench-learning'.

Run with ``python -m pytest -m slow tests/test_learning.py`` (about 10 to 20 minutes a row on
2 cores); the measured tables are in docs/benchmarks.md.
"""

from __future__ import annotations

import json

import pytest

from rlweights.bench.learning import summarise
from rlweights.cli import main

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "run", ["dqn:CartPole-v1:50000", "sac:Pendulum-v1:20000", "td3:Pendulum-v1:20000"]
)
def test_native_learns_as_well_as_sb3_over_five_seeds(tmp_path, run):
    args = ["bench-learning", "--runs", run, "--seeds", "0", "1", "2", "3", "4"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    rows = {r["impl"]: r for r in summarise(json.loads((tmp_path / "curves.json").read_text()))}
    native, sb3 = rows["native"], rows["sb3"]
    assert len(native["finals"]) == len(sb3["finals"]) == 5
    assert native["final_high"] >= sb3["final_low"], (native, sb3)
