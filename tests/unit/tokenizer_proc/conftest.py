"""Fixtures of the front end's tests: a front end thread with fake instance threads."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from frontend_fakes import (
    Deployment,
    FakeInstance,
    frontend_config,
    pd_fakes,
    start_deployment,
    stop_deployment,
)

from protocol import transport
from tokenizer_proc.client import Client


@pytest.fixture
def ipc_dir() -> Iterator[str]:
    path = transport.ipc_dir()  # short: ipc paths are limited to about 100 characters
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_deployment(ipc_dir) -> Iterator:
    """Start a front end with one fake instance per keyword map (default: one); everything
    stops at the end of the test."""
    started: list[Deployment] = []

    def make(*fakes_kw: dict, wait_ready: bool = True, **args) -> Deployment:
        kws = fakes_kw or ({},)
        cfg = frontend_config(ipc_dir, num_instances=len(kws), **args)
        fakes = [
            FakeInstance(addr, name=f"fake-{i}", **kw)
            for i, (addr, kw) in enumerate(zip(cfg.unified, kws, strict=True))
        ]
        dep = start_deployment(cfg, fakes)
        started.append(dep)
        if wait_ready:
            with dep.client() as client:
                client.wait_ready(timeout=5)
        return dep

    yield make
    for dep in started:
        stop_deployment(dep)


@pytest.fixture
def make_pd(ipc_dir) -> Iterator:
    """Start a front end with fake prefill and decode instances, one per keyword map in
    ``prefill`` and ``decode`` (default: 1P1D); everything stops at the end of the test."""
    started: list[Deployment] = []

    def make(
        prefill: list[dict] | None = None, decode: list[dict] | None = None, wait_ready: bool = True, **args
    ) -> Deployment:
        prefill, decode = prefill or [{}], decode or [{}]
        cfg = frontend_config(ipc_dir, num_prefill=len(prefill), num_decode=len(decode), **args)
        dep = start_deployment(cfg, pd_fakes(cfg, prefill, decode))
        started.append(dep)
        if wait_ready:
            with dep.client() as client:
                client.wait_ready(timeout=5)
        return dep

    yield make
    for dep in started:
        stop_deployment(dep)


@pytest.fixture
def deployment(make_deployment) -> Deployment:
    return make_deployment()


@pytest.fixture
def client(deployment) -> Iterator[Client]:
    with deployment.client() as c:
        yield c
