"""Background threads run at a lower priority than the rest of the process."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from router.priority import BACKGROUND_NICE, lower_this_thread
from tests.conftest import make_settings, wait_for


def nice_of(thread: threading.Thread) -> int:
    assert thread.native_id is not None
    return os.getpriority(os.PRIO_PROCESS, thread.native_id)


def test_only_the_calling_thread_is_lowered() -> None:
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: dict[str, int] = {}

    def lowered() -> None:
        lower_this_thread()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    thread = threading.Thread(target=lowered)
    thread.start()
    thread.join()
    assert seen["nice"] == min(base + BACKGROUND_NICE, 19)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base


def test_forwarding_and_view_threads_run_lowered_and_the_listener_does_not(
        tmp_path: Path, start_router: Callable[..., Any]) -> None:
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    config = tmp_path / "router.toml"
    config.write_text(f'[[destinations]]\nname = "archive"\ntype = "file"\n'
                      f'path = "{tmp_path / "out"}"\n')
    start_router(make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}", config))
    wait_for(lambda: any(t.name.startswith("lane-") for t in threading.enumerate()), 10,
             "the destination's lane")
    threads = {t.name: t for t in threading.enumerate()}
    background = [t for name, t in threads.items()
                  if name.startswith(("lane-", "view-", "dispatcher", "outcomes"))]
    assert {t.name.split("-")[0] for t in background} >= {"lane", "view", "dispatcher",
                                                            "outcomes"}
    lowered = min(base + BACKGROUND_NICE, 19)
    for thread in background:
        # A thread just started may not have run its first line (lower_this_thread) yet.
        wait_for(lambda t=thread: t.native_id is not None and nice_of(t) == lowered, 10,
                 f"{thread.name} to run lowered")
    assert nice_of(threads["dicom-gate"]) == base  # the front door (and TLS tunnels)
    assert nice_of(threads["dicom-serve"]) == base
