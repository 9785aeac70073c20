"""rlweights.files: atomic writes and what a failed one leaves."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import SUBPROCESS_TIMEOUT

# A process whose files may not grow past 100 kB (RLIMIT_FSIZE: writes past it fail with
# EFBIG, as they would with ENOSPC on a full disk) writes a 400 kB checkpoint over a small one.
TOO_LARGE = """
import resource, signal, sys
from pathlib import Path
import torch
from rlweights.files import WriteError, atomic_write

path = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    atomic_write(path, lambda f: torch.save({"x": torch.zeros(100_000)}, f))
except WriteError as exc:
    print(exc)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_write_that_the_file_system_refuses_inside_torch_save_is_a_write_error(tmp_path):
    """torch.save turns the OSError of its file's write into a RuntimeError ('unexpected
    pos'); atomic_write still reports the operating system's reason, and leaves the file."""
    path = tmp_path / "model.pt"
    path.write_bytes(b"the previous checkpoint")
    done = subprocess.run(
        [sys.executable, "-c", TOO_LARGE, str(path)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"could not write {path}: File too large"
    assert path.read_bytes() == b"the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
