"""The cuda_ipc backend checks a peer's shared KV arrays before opening any handle (no CUDA
needed: a refused description is never opened)."""

from __future__ import annotations

import pytest
import torch

from kvtransfer.cuda_ipc_backend import check_shared

PAGE_SHAPE = (16, 2, 32)


def _shared(**changes):
    d = {
        "size": [10, *PAGE_SHAPE], "stride": [1024, 64, 32, 1], "offset": 0, "dtype": "float16",
        "device_uuid": "GPU-0", "handle": b"h", "storage_bytes": 10 * 1024 * 2, "storage_offset": 0,
        "ref_handle": b"r", "ref_offset": 0, "event_handle": b"e", "event_sync": True,
    }
    d.update(changes)
    return d


def test_a_well_formed_description_passes():
    check_shared(_shared(), PAGE_SHAPE, torch.float16)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"dtype": "__class__"}, "dtype"),
        ({"dtype": "float32"}, "dtype"),
        ({"size": [10, 16, 2, 64]}, "shape"),
        ({"size": "10"}, "size and stride"),
        ({"stride": [1024, 64, 32]}, "size and stride"),
        ({"offset": -1}, "non-negative"),
        ({"handle": "not bytes"}, "bytes"),
        ({"event_sync": 1}, "event_sync"),
        ({"storage_bytes": 100}, "past the end"),
        ({"offset": 1}, "past the end"),
    ],
)
def test_a_bad_description_is_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        check_shared(_shared(**changes), PAGE_SHAPE, torch.float16)


def test_not_a_map_is_refused():
    with pytest.raises(ValueError, match="map"):
        check_shared(["size"], PAGE_SHAPE, torch.float16)
