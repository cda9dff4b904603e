"""The real Triton compiler (not the interpreter) accepts every kernel for an H100, in a child
process without ``TRITON_INTERPRET`` (see ``sm90_compile.py``)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.engine.kernels.interpreter_worker import REPO_ROOT


def _has_ptxas() -> bool:
    """Found without importing triton (this process must not fix its interpreter mode)."""
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return False
    return Path(spec.origin).parent.joinpath("backends", "nvidia", "bin", "ptxas").exists()


@pytest.mark.skipif(not _has_ptxas(), reason="this triton has no bundled ptxas")
def test_every_kernel_compiles_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.unit.engine.kernels.sm90_compile"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok ") >= 10, proc.stdout
