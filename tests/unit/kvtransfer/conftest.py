"""Fixtures of the KV transfer tests; the helpers live in ``kv_helpers.py``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.kvtransfer.kv_helpers import CPU_BACKENDS, Pair, connect


@pytest.fixture(params=CPU_BACKENDS)
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    p = connect(request.param)
    yield p
    p.close()
