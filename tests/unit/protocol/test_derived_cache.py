"""protocol.derived_cache: a value derived from a file is computed once per version of the file,
rebuilt when the file changes or its entry is unreadable, and still served when the cache
directory cannot be written."""

from __future__ import annotations

import os

import pytest

from protocol import derived_cache


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(derived_cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _counting(value):
    calls = []

    def build():
        calls.append(1)
        return value

    return build, calls


def test_built_once_per_version_of_the_file(cache, tmp_path) -> None:
    source = tmp_path / "model.gguf"
    source.write_bytes(b"one")
    build, calls = _counting({"a": [1, 2], "b": None})
    assert derived_cache.derived_json(str(source), "kind", build) == {"a": [1, 2], "b": None}
    assert derived_cache.derived_json(str(source), "kind", build) == {"a": [1, 2], "b": None}
    assert len(calls) == 1
    other, other_calls = _counting("x")
    assert derived_cache.derived_json(str(source), "other-kind", other) == "x" and len(other_calls) == 1
    source.write_bytes(b"three")  # another size (and time): another version
    assert derived_cache.derived_json(str(source), "kind", build) == {"a": [1, 2], "b": None}
    assert len(calls) == 2
    assert not list(cache.glob("*.partial"))
    # the earlier version's entry of "kind" went; "other-kind" of the earlier version stays
    assert sorted(p.name.split("-")[0] for p in cache.glob("*.json")) == ["kind", "other"]
    assert derived_cache.entry_path(str(source), "kind").exists()


def test_an_unreadable_entry_is_rebuilt(cache, tmp_path) -> None:
    source = tmp_path / "model.gguf"
    source.write_bytes(b"data")
    build, calls = _counting([3])
    derived_cache.derived_json(str(source), "kind", build)
    derived_cache.entry_path(str(source), "kind").write_text("{not json")
    assert derived_cache.derived_json(str(source), "kind", build) == [3]
    assert len(calls) == 2
    assert derived_cache.derived_json(str(source), "kind", build) == [3] and len(calls) == 2


def test_a_cache_that_cannot_be_written_costs_only_time(tmp_path, monkeypatch, caplog) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(derived_cache.CACHE_DIR_ENV, str(blocker / "cache"))  # under a file: no dir
    source = tmp_path / "model.gguf"
    source.write_bytes(b"data")
    build, calls = _counting({"k": 1})
    assert derived_cache.derived_json(str(source), "kind", build) == {"k": 1}
    assert derived_cache.derived_json(str(source), "kind", build) == {"k": 1}
    assert len(calls) == 2
    assert "cannot keep kind" in caplog.text


def test_default_directory_follows_xdg(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(derived_cache.CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert derived_cache.cache_dir() == tmp_path / "pdserve"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert derived_cache.cache_dir() == derived_cache.Path(os.path.expanduser("~")) / ".cache" / "pdserve"
