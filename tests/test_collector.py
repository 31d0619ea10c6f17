"""Full garbage collections are paced: at most one per CHAT_GC_FULL_EVERY seconds (chatsite/collector.py)."""

from __future__ import annotations

import gc

import pytest

from chatsite import collector


@pytest.fixture
def gc_as_found():
    thresholds, callbacks = gc.get_threshold(), list(gc.callbacks)
    yield
    gc.set_threshold(*thresholds)
    gc.callbacks[:] = callbacks


def test_after_a_full_collection_the_next_waits_until_the_period_has_passed(gc_as_found):
    clock = [100.0]
    gc.set_threshold(700, 10, 10)
    pacer = collector.FullCollectionPacer(300, clock=lambda: clock[0], size=lambda: 100)

    pacer("stop", {"generation": 2})
    assert gc.get_threshold() == (700, 10, collector.NEVER)
    clock[0] += 299
    pacer("stop", {"generation": 0})
    pacer("stop", {"generation": 1})
    assert gc.get_threshold() == (700, 10, collector.NEVER)
    clock[0] += 1
    pacer("start", {"generation": 0})
    assert gc.get_threshold() == (700, 10, collector.NEVER)  # only a finished collection counts
    pacer("stop", {"generation": 0})
    assert gc.get_threshold() == (700, 10, 10)  # CPython's own rule decides again
    pacer("stop", {"generation": 2})
    assert gc.get_threshold() == (700, 10, collector.NEVER)


def test_a_process_grown_by_half_since_the_last_full_collection_may_collect_before_the_period(gc_as_found):
    clock, size = [100.0], [1000]
    gc.set_threshold(700, 10, 10)
    pacer = collector.FullCollectionPacer(300, clock=lambda: clock[0], size=lambda: size[0])
    pacer("stop", {"generation": 2})
    size[0] = 1499
    clock[0] += 2
    pacer("stop", {"generation": 1})
    assert gc.get_threshold()[2] == collector.NEVER
    size[0] = 1500
    clock[0] += 0.5
    pacer("stop", {"generation": 1})
    assert gc.get_threshold()[2] == collector.NEVER  # measured at most once a second
    clock[0] += 0.5
    pacer("stop", {"generation": 1})
    assert gc.get_threshold()[2] == 10


def test_the_servers_collector_is_paced_once_and_a_real_full_collection_restarts_the_wait(gc_as_found, settings):
    collector.configure(300)
    collector.configure(300)
    pacers = [hook for hook in gc.callbacks if isinstance(hook, collector.FullCollectionPacer)]
    assert len(pacers) == 1 and gc.get_threshold()[2] == collector.NEVER
    pacers[0].last_full = 0.0
    gc.collect(0)  # a young collection after the period: full collections are allowed again
    assert gc.get_threshold()[2] == pacers[0].threshold2
    gc.collect()
    assert gc.get_threshold()[2] == collector.NEVER and pacers[0].last_full > 0
