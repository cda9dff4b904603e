"""Runs the kernel checks under the Triton interpreter in a child process.

Why a child: ``TRITON_INTERPRET=1`` only works if it is set before ``import triton`` (triton's
own ``tl.sum``/``tl.max``/``tl.cdiv`` are ``@triton.jit`` functions, decided at that import),
and setting it in the shared pytest process would turn every later Triton kernel of that
process into an interpreted one and leak into the servers that end-to-end tests spawn. So the
test process never sets it: one long-lived child per session has it in its own environment.

Protocol: one JSON object per line. Parent → child ``{"check": name, "case": {...}}``; child →
parent ``{"ok": bool, "result": float | None, "error": str | None, "skip": str | None}``.

``skip`` is set when this triton's interpreter cannot run kernels at all here: triton 3.6's
interpreter holds scalars as 1-element arrays, and numpy >= 2.4 refuses ``int()`` of those, so
every loop with a run-time bound fails. The compiled kernels are unaffected (the GPU tests and
``sm90_compile`` cover them); the skip names the versions.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict
from typing import Any

import pytest

from tests import REPO_ROOT

CASE_TIMEOUT_S = 300.0


def expect_pass(reply: dict[str, Any]) -> None:
    """Pass, fail with the child's traceback, or skip when the interpreter cannot run here."""
    if reply.get("skip"):
        pytest.skip(reply["skip"])
    assert reply["ok"], reply["error"]


class InterpreterWorker:
    """Parent side: a child Python with ``TRITON_INTERPRET=1`` that runs one check per request."""

    def __init__(self) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the child
        env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.unit.engine.kernels.interpreter_worker"],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )

    def run(self, check: str, case: Any) -> dict[str, Any]:
        return self._ask({"check": check, "case": asdict(case)})

    def probe(self) -> dict[str, Any]:
        """Whether the interpreter can run kernels here at all (``skip`` says why not)."""
        return self._ask({"check": "probe"})

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=CASE_TIMEOUT_S):
                self.close()
                raise TimeoutError(f"interpreter worker gave no answer in {CASE_TIMEOUT_S:.0f} s")
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"interpreter worker died:\n{self._stderr_tail()}")
        return json.loads(line)

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._stderr.close()

    def _stderr_tail(self, chars: int = 4000) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-chars:]


def _serve() -> None:
    """Child side. Protocol lines go to a private copy of stdout; anything else printed (by us,
    torch or triton) goes to stderr and cannot corrupt the protocol."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("the interpreter worker needs TRITON_INTERPRET=1 in its environment")
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    import torch

    from tests.unit.engine.kernels.kernel_cases import CHECKS

    torch.set_num_threads(1)
    unusable = interpreter_unusable()
    for line in sys.stdin:
        request = json.loads(line)
        if request["check"] == "probe":
            _reply(protocol, {"ok": unusable is None, "result": None, "error": None, "skip": unusable})
            continue
        check, case_type = CHECKS[request["check"]]
        case = case_type(**{name: _tuples(value) for name, value in request["case"].items()})
        reply = {"ok": False, "result": None, "error": None, "skip": unusable}
        if unusable is None:
            try:
                reply.update(ok=True, result=check(case))
            except Exception:  # noqa: BLE001 - every failure goes back to the test that asked
                reply.update(error=traceback.format_exc())
        _reply(protocol, reply)


def _reply(protocol, reply: dict[str, Any]) -> None:
    protocol.write(json.dumps(reply) + "\n")
    protocol.flush()


def interpreter_unusable() -> str | None:
    """None if a loop with a run-time bound runs in this triton's interpreter, else why not."""
    import numpy
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def probe(out_ptr, n):
        total = 0.0
        for _ in range(tl.program_id(0), n):
            total += 1.0
        tl.store(out_ptr, total)

    out = torch.zeros(1)
    try:
        probe[(1,)](out, 3)
    except Exception as exc:  # noqa: BLE001 - reported as the reason to skip
        return f"triton {triton.__version__}'s interpreter fails under numpy {numpy.__version__}: {exc!r}"
    return None if out.item() == 3.0 else f"triton {triton.__version__}'s interpreter miscounts a loop"


def _tuples(value: Any) -> Any:
    """JSON lists back to the (nested) tuples the frozen case dataclasses hold."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


if __name__ == "__main__":
    _serve()
