"""router.gc_tuning: what a router process does to the collector once it has started."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from router.gc_tuning import THRESHOLDS, freeze_startup_heap


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


class _Node:
    other: _Node | None = None


def test_startup_objects_leave_the_collector_and_later_cycles_are_still_freed(
    restored_gc: None,
) -> None:
    long_lived = {"key": list(range(3))}
    freeze_startup_heap()
    assert gc.get_threshold() == THRESHOLDS
    assert gc.get_freeze_count() > 0
    assert all(obj is not long_lived for obj in gc.get_objects())  # never scanned again

    freed: list[bool] = []
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    weakref.finalize(a, freed.append, True)
    del a, b
    gc.collect()
    assert freed == [True]
