"""Draining (what launch.py asks for on SIGTERM): new requests are refused with
``shutting_down``, live ones finish within ``--drain-timeout``, the rest fail, the loop ends."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import pytest

from tests.fakes.frontend import FakeInstance, frontend_config
from tokenizer_proc.client import Client, ServerError
from tokenizer_proc.frontend import run_frontend


@contextlib.contextmanager
def draining_frontend(ipc_dir: str, drain_timeout: float) -> Iterator[
    tuple[FakeInstance, Client, threading.Event, threading.Thread]
]:
    """A front end over one fake instance, with the drain request the test sets."""
    cfg = frontend_config(ipc_dir, drain_timeout=drain_timeout)
    fake = FakeInstance(cfg.unified[0], name="fake-0").start()
    stop, drain = threading.Event(), threading.Event()
    thread = threading.Thread(target=run_frontend, args=(cfg, stop, drain), daemon=True)
    thread.start()
    client = Client(cfg.client_addr, timeout=5.0)
    try:
        client.wait_ready(timeout=5)
        yield fake, client, drain, thread
    finally:
        client.close()
        stop.set()
        thread.join(timeout=5)
        fake.stop()
    assert not thread.is_alive()


def test_live_requests_finish_new_ones_are_refused_then_the_loop_ends(ipc_dir):
    with draining_frontend(ipc_dir, drain_timeout=10) as (fake, client, drain, thread):
        fake.generating.clear()
        rid = client.submit("x", max_new_tokens=2)
        assert fake.got_request.wait(5)
        drain.set()
        while client.status()["ready"]:  # until the loop has seen the drain request
            time.sleep(0.01)
        with pytest.raises(ServerError) as err:
            client.generate("x", max_new_tokens=1)
        assert err.value.code == "shutting_down"
        fake.generating.set()
        assert client.result(rid)["text"] == "He"
        thread.join(timeout=5)
        assert not thread.is_alive()


def test_what_is_left_at_the_drain_timeout_fails_with_shutting_down(ipc_dir):
    with draining_frontend(ipc_dir, drain_timeout=0.5) as (fake, client, drain, thread):
        fake.generating.clear()
        rid = client.submit("x", max_new_tokens=2)
        assert fake.got_request.wait(5)
        start = time.monotonic()
        drain.set()
        with pytest.raises(ServerError) as err:
            client.result(rid)
        assert err.value.code == "shutting_down"
        assert 0.4 < time.monotonic() - start < 3.0
        thread.join(timeout=5)
        assert not thread.is_alive()
