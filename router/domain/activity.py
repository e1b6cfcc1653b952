"""The router's own life in the access log: each process start and its stop (ATNA's
Application Activity). Event names and this module's path are stored topics: keep them.
"""

from __future__ import annotations

from eventsourcing.domain import Aggregate, event


class NodeActivity(Aggregate):
    """One run of a router process on a node, from its start to its stop."""

    @event("Started")
    def __init__(self, *, actor: str, source_ip: str, correlation_id: str, node: str,
                 ae_title: str, version: str) -> None:
        self.node = node
        self.stopped = False

    @event("Stopped")
    def stop(self, *, actor: str, source_ip: str, correlation_id: str, node: str) -> None:
        """The process stopped gracefully (a killed one records no stop)."""
        self.stopped = True
