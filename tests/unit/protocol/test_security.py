"""CURVE keys and the ZAP check: key directories are made and loaded, a socket pair with an
allowed key talks, and a peer with a wrong key or none is refused, with the refusal logged."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import stat
import time

import pytest
import zmq
from zmq.utils import z85

import launch
from protocol import transport
from protocol.messages import Shutdown
from protocol.security import ClusterKeys, fingerprint, generate, zap_reply

NAMES = ["frontend", "prefill0", "decode0"]
REFUSAL_WAIT_S = 2.0


@pytest.fixture
def key_dirs(tmp_path):
    return generate(str(tmp_path / "keys"), NAMES)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_generate_makes_private_directories_that_load(key_dirs):
    keys = [ClusterKeys.load(str(d)) for d in key_dirs]
    assert len({k.public for k in keys}) == len(NAMES)  # one identity each
    assert len({k.cluster_public for k in keys}) == 1  # one server key for the deployment
    assert all(k.allowed == frozenset(x.public for x in keys) for k in keys)
    for d in key_dirs:
        assert _mode(d) == 0o700
        assert _mode(d / "identity.key_secret") == 0o600 and _mode(d / "cluster.key_secret") == 0o600
        assert not any(p.name.endswith("_secret") for p in (d / "allowed").iterdir())


def test_generate_refuses_an_existing_directory(key_dirs):
    with pytest.raises(ValueError, match="exists"):
        generate(str(key_dirs[0].parent), ["frontend"])


def test_load_names_the_missing_file_and_how_to_make_keys(tmp_path):
    with pytest.raises(ValueError, match=r"identity.key_secret.*launch.py keys"):
        ClusterKeys.load(str(tmp_path))
    assert ClusterKeys.from_dir(None) is None


def test_launch_keys_command(tmp_path, capsys):
    assert launch.main(["keys", "--out", str(tmp_path / "k"), "--names", "a", "b"]) == 0
    assert "--cluster-key-dir" in capsys.readouterr().out
    a, b = (ClusterKeys.load(str(tmp_path / "k" / name)) for name in "ab")
    assert a.allowed == b.allowed and a.public != b.public


def test_ipc_dir_is_private():
    directory = transport.ipc_dir()
    try:
        assert _mode(directory) == 0o700
    finally:
        os.rmdir(directory)
    assert transport.is_private("ipc:///tmp/x") and not transport.is_private("tcp://127.0.0.1:1")


def _pair(server_keys, client_keys):
    ctx = zmq.Context()
    server = transport.bind(ctx, zmq.PULL, "tcp://127.0.0.1:*", keys=server_keys)
    addr = server.getsockopt_string(zmq.LAST_ENDPOINT)
    client = transport.connect(ctx, zmq.PUSH, addr, keys=client_keys)
    return ctx, server, client


def _delivered(server_keys, client_keys) -> bool:
    ctx, server, client = _pair(server_keys, client_keys)
    try:
        with contextlib.suppress(zmq.Again):  # no connection: the frame is not even queued
            transport.send(client, Shutdown("hello"), zmq.NOBLOCK)
        got = server.poll(int(REFUSAL_WAIT_S * 1000))
        return bool(got) and transport.recv(server) == Shutdown("hello")
    finally:
        client.close()
        server.close()
        ctx.term()


def test_allowed_key_talks(key_dirs):
    ctx, server, client = _pair(ClusterKeys.load(str(key_dirs[1])), ClusterKeys.load(str(key_dirs[0])))
    try:
        transport.send(client, Shutdown("hello"))
        assert server.poll(5000)
        assert transport.recv(server) == Shutdown("hello")
    finally:
        client.close()
        server.close()
        ctx.term()


def _log_has(caplog, text: str) -> bool:
    deadline = time.monotonic() + REFUSAL_WAIT_S
    while time.monotonic() < deadline:
        if text in caplog.text:
            return True
        time.sleep(0.05)
    return False


def test_wrong_key_is_refused_and_logged(key_dirs, tmp_path, caplog):
    server_keys = ClusterKeys.load(str(key_dirs[1]))
    (stranger_dir,) = generate(str(tmp_path / "other"), ["mallory"])
    stranger = ClusterKeys.load(str(stranger_dir))
    # It knows the server's public key (that is no secret), but its own key is not allowed.
    stranger = dataclasses.replace(stranger, cluster_public=server_keys.cluster_public)
    with caplog.at_level(logging.WARNING, logger="pdserve.security"):
        assert not _delivered(server_keys, stranger)
        assert _log_has(caplog, f"key {fingerprint(stranger.public)} is not in the allow list")


def test_keyless_peer_is_refused_and_logged(key_dirs, caplog):
    with caplog.at_level(logging.WARNING, logger="pdserve.security"):
        assert not _delivered(ClusterKeys.load(str(key_dirs[1])), None)
        assert _log_has(caplog, "CURVE handshake failed")


def test_zap_reply():
    allowed_public, _ = zmq.curve_keypair()
    keys = ClusterKeys(b"", b"", b"", b"", frozenset([allowed_public]), "d")
    request = [b"1.0", b"7", b"", b"10.0.0.9", b"", b"CURVE"]
    assert zap_reply([*request, z85.decode(allowed_public)], keys)[2] == b"200"
    other, _ = zmq.curve_keypair()
    assert zap_reply([*request, z85.decode(other)], keys)[2] == b"400"
    assert zap_reply([b"1.0", b"7", b"", b"10.0.0.9", b"", b"NULL"], keys)[2] == b"400"
    assert zap_reply([b"1.0"], keys)[2] == b"500"
