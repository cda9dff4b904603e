"""The scheduler's garbage-collector policy (scheduler_proc/heap.py): arrivals are frozen in
bursts, a full collection comes back when memory doubled, idle moments freeze once."""

import gc

import pytest

from scheduler_proc import heap


@pytest.fixture
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


class Tracked:
    pass


def test_arrivals_are_frozen_every_n(unfrozen, monkeypatch):
    monkeypatch.setattr(heap, "_peak_rss", lambda: 1)
    monkeypatch.setattr(heap, "_peak_rss_after_collect", [1])
    freezes: list[int] = []  # counted by call: other threads may free frozen objects meanwhile
    real_freeze = gc.freeze
    monkeypatch.setattr(gc, "freeze", lambda: (freezes.append(1), real_freeze()))
    freezer = heap.ArrivalFreezer(every=4)
    kept = [Tracked() for _ in range(10)]
    freezer.note(3)
    assert not freezes and gc.get_freeze_count() == 0
    freezer.note(4)
    assert len(freezes) == 1 and gc.get_freeze_count() >= len(kept)
    kept += [Tracked() for _ in range(10)]
    freezer.note(7)  # 3 since the last freeze
    assert len(freezes) == 1
    freezer.note(8)
    assert len(freezes) == 2 and gc.get_freeze_count() >= len(kept)


def test_a_full_collection_runs_when_memory_doubled(unfrozen, monkeypatch):
    monkeypatch.setattr(heap, "_peak_rss_after_collect", [100])
    monkeypatch.setattr(heap, "_peak_rss", lambda: 201)
    cycle = Tracked()
    cycle.me = cycle
    gc.freeze()  # the cycle is among the frozen: only a full collection (after unfreezing) frees it
    del cycle
    freezer = heap.ArrivalFreezer(every=1)
    garbage_before = gc.get_freeze_count()
    freezer.note(1)
    assert heap._peak_rss_after_collect[0] == 201  # the baseline moved
    assert gc.get_freeze_count() < garbage_before  # the cycle was collected, the rest frozen again


def test_idle_freezes_once_per_idle_period(unfrozen, monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "freeze", lambda: calls.append(1))
    idle = heap.IdleFreezer()
    idle.note(True)
    idle.note(True)
    idle.note(False)
    idle.note(True)
    assert len(calls) == 2
