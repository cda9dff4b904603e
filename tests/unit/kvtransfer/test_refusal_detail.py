"""The KV sender's refusal of a registration names only the mismatching field to a peer it
cannot authenticate (tcp without CURVE keys: ``--insecure``), and the whole reason, both values,
to a peer on a private ipc address (docs/design.md, "Peers and links")."""

from __future__ import annotations

import re
import shutil
import tempfile

import pytest

from kvtransfer import RegistrationRefused, make_backend
from tests.unit.kvtransfer.kv_helpers import HEAD_DIM, layout, pool


@pytest.mark.parametrize(("where", "detailed"), [("tcp://127.0.0.1:*", False), ("ipc", True)])
def test_a_refusal_reveals_this_sides_values_only_to_an_authenticated_peer(where: str, detailed: bool):
    directory = tempfile.mkdtemp(prefix="kv-", dir="/tmp")  # short: ipc paths are limited
    bind = f"ipc://{directory}/sender" if where == "ipc" else where
    sender = make_backend("zmq", "prefill", layout("zmq"), *pool(0), address=bind)
    wide = layout("zmq", head_dim=2 * HEAD_DIM)
    receiver = make_backend("zmq", "decode", wide, *pool(head_dim=2 * HEAD_DIM))
    try:
        with pytest.raises(RegistrationRefused, match="head_dim mismatch") as refused:
            receiver.register(sender.address, timeout=5.0)
    finally:
        receiver.close()
        sender.close()
        shutil.rmtree(directory, ignore_errors=True)
    reveals = re.search(rf"has {HEAD_DIM}\b", str(refused.value)) is not None
    assert reveals is detailed, str(refused.value)
