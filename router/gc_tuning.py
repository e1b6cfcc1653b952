"""Keeping Python's cyclic garbage collector away from what lives as long as the process.

After start-up a router process holds hundreds of thousands of long-lived container objects
(pydicom's data dictionaries, pynetdicom's SOP class tables, eventsourcing's topics, the
modules themselves). With the default thresholds every 700 allocations start a collection,
and each full one walks all of them, on the thread that happened to allocate: a C-STORE
allocates a few thousand objects (raw elements, events, rows). Measured on ct4 (one router,
six fresh CT studies in turn, four associations): CPU per instance, receivers 3.5-3.7 -> 3.0-3.2
ms and supervisor 2.8 -> 2.3 ms; receive 294-311 -> 337-402 instances/s (docs/benchmarks.md,
seventh session).
"""

from __future__ import annotations

import gc

# Young collections every 20,000 net allocations instead of 700; older generations a little
# less often too. Garbage without cycles is still freed at once by reference counting.
THRESHOLDS = (20_000, 50, 100)


def freeze_startup_heap() -> None:
    """Call once start-up is done: collect once, then move every object that survived into
    the permanent generation (never scanned again) and raise the thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
