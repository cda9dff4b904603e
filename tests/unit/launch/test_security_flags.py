"""A cluster mode (tcp:// between processes) needs CURVE keys or an explicit --insecure."""

from __future__ import annotations

import os

import pytest

import launch
from protocol.security import generate


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_cluster_mode_without_keys_is_refused_with_how_to_make_them(mode):
    with pytest.raises(ValueError, match=r"--cluster-key-dir.*launch.py keys.*--insecure"):
        launch.parse_args(["--mode", mode])


def test_frontend_without_keys_is_refused():
    with pytest.raises(ValueError, match="--cluster-key-dir"):
        launch.parse_args(["--mode", "frontend", "--prefill", "tcp://h:1", "--decode", "tcp://h:2"])


def test_insecure_is_explicit_and_local_modes_need_nothing():
    _, args, _ = launch.parse_args(["--mode", "prefill", "--insecure"])
    assert args.insecure and args.cluster_key_dir is None
    _, args, _ = launch.parse_args(["--mode", "pd"])
    assert args.cluster_key_dir is None


def test_keys_are_checked_and_made_absolute(tmp_path, monkeypatch):
    (d,) = generate(str(tmp_path / "keys"), ["prefill0"])
    monkeypatch.chdir(tmp_path)
    _, args, _ = launch.parse_args(["--mode", "prefill", "--cluster-key-dir", "keys/prefill0"])
    assert args.cluster_key_dir == str(d) and os.path.isabs(args.cluster_key_dir)
    with pytest.raises(ValueError, match="not both"):
        launch.parse_args(["--mode", "prefill", "--cluster-key-dir", str(d), "--insecure"])
    with pytest.raises(ValueError, match="missing CURVE key file"):
        launch.parse_args(["--mode", "decode", "--cluster-key-dir", str(tmp_path)])
