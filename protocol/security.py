"""Authentication and encryption between pdserve processes with ZeroMQ CURVE (docs/design.md,
"Security").

A cluster key directory, made by ``python launch.py keys --out DIR --names NAME...``, holds for
one process (one ``launch.py``): ``identity.key_secret`` (its own key pair: what it presents
when it connects), ``cluster.key_secret`` (the deployment's server key pair, the same in every
directory: what every bound socket presents) and ``allowed/*.key`` (the public keys of the
processes it accepts connections from). The files are zmq.auth certificates.

A bound socket is a CURVE server; each connecting peer's public key is checked by a ZAP handler
(one thread per zmq context) against the allow list, and a refusal is logged with the key's
short fingerprint and the peer's address. A peer without any key fails the handshake before ZAP:
that is logged from the socket's monitor.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

log = logging.getLogger("pdserve.security")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
IDENTITY_FILE = "identity.key_secret"
CLUSTER_FILE = "cluster.key_secret"
ALLOWED_DIR = "allowed"
HANDSHAKE_FAILURES = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
KEYGEN_HINT = "make keys with: python launch.py keys --out DIR --names frontend prefill0 decode0"


def fingerprint(public_key: bytes) -> str:
    """A short, loggable name of a Z85 public key."""
    return public_key[:8].decode("ascii", errors="replace")


@dataclass(frozen=True)
class ClusterKeys:
    """One process's CURVE keys. Keys are Z85 bytes, as zmq.auth loads them."""

    public: bytes
    secret: bytes = field(repr=False)  # never in a log line
    cluster_public: bytes
    cluster_secret: bytes = field(repr=False)
    allowed: frozenset[bytes]
    directory: str

    @classmethod
    def load(cls, directory: str) -> ClusterKeys:
        """The keys in ``directory``; raises ValueError naming what is missing."""
        root = Path(directory)
        public, secret = _load_pair(root / IDENTITY_FILE)
        cluster_public, cluster_secret = _load_pair(root / CLUSTER_FILE)
        allowed_dir = root / ALLOWED_DIR
        allowed = frozenset(zmq.auth.load_certificates(allowed_dir)) if allowed_dir.is_dir() else frozenset()
        if not allowed:
            raise ValueError(f"no allowed public keys (*.key) in {allowed_dir}; {KEYGEN_HINT}")
        return cls(public, secret, cluster_public, cluster_secret, allowed, str(root))

    @classmethod
    def from_dir(cls, directory: str | None) -> ClusterKeys | None:
        """``load``, or None when no directory is given (a local or explicitly insecure deployment)."""
        return None if directory is None else cls.load(directory)


def _load_pair(path: Path) -> tuple[bytes, bytes]:
    if not path.is_file():
        raise ValueError(f"missing CURVE key file {path}; {KEYGEN_HINT}")
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise ValueError(f"{path} holds no secret key")
    return public, secret


def generate(out: str, names: list[str]) -> list[Path]:
    """Make one key directory per name under ``out`` (0700, secret files 0600); each accepts
    every name's public key. Returns the directories; raises ValueError if one exists."""
    root = Path(out)
    dirs = [root / name for name in names]
    if len(set(names)) != len(names) or not names:
        raise ValueError("give one or more distinct --names")
    for d in dirs:
        if d.exists():
            raise ValueError(f"{d} exists; remove it or choose another --out")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = root / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    try:
        zmq.auth.create_certificates(staging, "cluster")
        for name in names:
            zmq.auth.create_certificates(staging, name)
        for d, name in zip(dirs, names, strict=True):
            (d / ALLOWED_DIR).mkdir(mode=0o700, parents=True)
            os.chmod(d, 0o700)
            _copy_secret(staging / f"{name}.key_secret", d / IDENTITY_FILE)
            _copy_secret(staging / "cluster.key_secret", d / CLUSTER_FILE)
            for peer in names:
                shutil.copyfile(staging / f"{peer}.key", d / ALLOWED_DIR / f"{peer}.key")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dirs


def _copy_secret(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o600)


# --------------------------------------------------------------------------------------------
# Sockets
# --------------------------------------------------------------------------------------------


def make_server(sock: zmq.Socket, keys: ClusterKeys) -> None:
    """Before ``bind``: present the cluster key, accept only allowed clients, log refusals."""
    _ensure_zap_handler(sock.context, keys)
    sock.curve_server = True
    sock.curve_publickey = keys.cluster_public
    sock.curve_secretkey = keys.cluster_secret
    _watch_handshakes(sock)


def make_client(sock: zmq.Socket, keys: ClusterKeys) -> None:
    """Before ``connect``: present this process's key, accept only a server with the cluster key."""
    sock.curve_serverkey = keys.cluster_public
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret


def _ensure_zap_handler(ctx: zmq.Context, keys: ClusterKeys) -> None:
    """Start this context's ZAP handler unless it runs already (its endpoint is then bound)."""
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.bind(ZAP_ENDPOINT)
    except zmq.ZMQError as e:
        sock.close()
        if e.errno != zmq.EADDRINUSE:
            raise
        return
    threading.Thread(target=_serve_zap, args=(sock, keys), name="zap", daemon=True).start()


def _serve_zap(sock: zmq.Socket, keys: ClusterKeys) -> None:
    """Answer ZAP requests until the context terminates (RFC 27)."""
    try:
        while True:
            frames = sock.recv_multipart()
            try:
                reply = zap_reply(frames, keys)
            except Exception:  # noqa: BLE001 - a bad request is refused; the handler keeps serving
                log.exception("refused a malformed ZAP request")
                reply = [frames[0], frames[1] if len(frames) > 1 else b"", b"500", b"error", b"", b""]
            sock.send_multipart(reply)
    except zmq.ContextTerminated:
        pass
    finally:
        sock.close(linger=0)


def zap_reply(frames: list[bytes], keys: ClusterKeys) -> list[bytes]:
    """The ZAP reply to one request: 200 for an allowed CURVE key, else 400 (logged)."""
    version, request_id = frames[0], frames[1] if len(frames) > 1 else b""
    if len(frames) < 6:
        return [version, request_id, b"500", b"malformed ZAP request", b"", b""]
    address, mechanism, credentials = frames[3].decode(errors="replace"), frames[5], frames[6:]
    if mechanism != b"CURVE" or not credentials or len(credentials[0]) != 32:
        log.warning("refused a %s connection from %s: CURVE required", mechanism.decode(errors="replace"),
                    address)
        return [version, request_id, b"400", b"CURVE required", b"", b""]
    public = z85.encode(credentials[0])
    if public not in keys.allowed:
        log.warning("refused a connection from %s: key %s is not in the allow list of %s",
                    address, fingerprint(public), keys.directory)
        return [version, request_id, b"400", b"key not allowed", b"", b""]
    return [version, request_id, b"200", b"OK", fingerprint(public).encode(), b""]


def _watch_handshakes(sock: zmq.Socket) -> None:
    """Log every failed handshake on ``sock`` (a peer without a key never reaches ZAP)."""
    monitor = sock.get_monitor_socket(HANDSHAKE_FAILURES | zmq.EVENT_MONITOR_STOPPED)
    threading.Thread(target=_log_handshake_failures, args=(monitor,), name="curve-monitor",
                     daemon=True).start()


def _log_handshake_failures(monitor: zmq.Socket) -> None:
    from zmq.utils.monitor import recv_monitor_message

    try:
        while True:
            event = recv_monitor_message(monitor)
            if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                return
            log.warning("refused a peer on %s: CURVE handshake failed (%s, code %s); a peer needs "
                        "a key from the cluster key directory", event["endpoint"].decode(errors="replace"),
                        zmq.Event(event["event"]).name, event["value"])
    except zmq.ZMQError:
        pass
    finally:
        monitor.close(linger=0)


def main(argv: list[str]) -> int:
    """``launch.py keys --out DIR --names NAME...``."""
    import argparse

    parser = argparse.ArgumentParser(prog="launch.py keys", description="Make CURVE key directories, "
                                     "one per pdserve process (launch.py), for --cluster-key-dir.")
    parser.add_argument("--out", required=True, help="directory to create the key directories in")
    parser.add_argument("--names", nargs="+", required=True, metavar="NAME",
                        help="one per launch.py of the deployment, e.g. frontend prefill0 decode0")
    ns = parser.parse_args(argv)
    try:
        dirs = generate(ns.out, ns.names)
    except ValueError as e:
        print(f"launch.py keys: {e}", file=sys.stderr)
        return 2
    for d in dirs:
        print(f"{d}: give it to that process as --cluster-key-dir {d}")
    return 0
