"""Fixtures of the front end's tests: a front end thread with fake instance threads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from protocol.config import FrontendConfig
from tests.fakes.frontend import (
    Deployment,
    FakeInstance,
    frontend_config,
    pd_fakes,
    start_deployment,
    stop_deployment,
)
from tokenizer_proc.client import Client


@pytest.fixture
def make_deployment(ipc_dir) -> Iterator:
    """Start a front end with one fake instance per keyword map (default: one); everything
    stops at the end of the test."""

    def fakes(cfg: FrontendConfig, kws: tuple[dict, ...]) -> list[FakeInstance]:
        return [
            FakeInstance(addr, name=f"fake-{i}", **kw)
            for i, (addr, kw) in enumerate(zip(cfg.unified, kws, strict=True))
        ]

    with _deployments() as start:

        def make(*fakes_kw: dict, wait_ready: bool = True, **args) -> Deployment:
            kws = fakes_kw or ({},)
            cfg = frontend_config(ipc_dir, num_instances=len(kws), **args)
            return start(cfg, fakes(cfg, kws), wait_ready)

        yield make


@pytest.fixture
def make_pd(ipc_dir) -> Iterator:
    """Start a front end with fake prefill and decode instances, one per keyword map in
    ``prefill`` and ``decode`` (default: 1P1D); everything stops at the end of the test."""
    with _deployments() as start:

        def make(
            prefill: list[dict] | None = None, decode: list[dict] | None = None, wait_ready: bool = True,
            **args,
        ) -> Deployment:
            prefill, decode = prefill or [{}], decode or [{}]
            cfg = frontend_config(ipc_dir, num_prefill=len(prefill), num_decode=len(decode), **args)
            return start(cfg, pd_fakes(cfg, prefill, decode), wait_ready)

        yield make


@contextlib.contextmanager
def _deployments() -> Iterator:
    """A starter of deployments (optionally waiting until ready) that stops each at the end."""
    started: list[Deployment] = []

    def start(cfg: FrontendConfig, fakes: list[FakeInstance], wait_ready: bool) -> Deployment:
        dep = start_deployment(cfg, fakes)
        started.append(dep)
        if wait_ready:
            with dep.client() as client:
                client.wait_ready(timeout=5)
        return dep

    try:
        yield start
    finally:
        for dep in started:
            stop_deployment(dep)


@pytest.fixture
def deployment(make_deployment) -> Deployment:
    return make_deployment()


@pytest.fixture
def client(deployment) -> Iterator[Client]:
    with deployment.client() as c:
        yield c
