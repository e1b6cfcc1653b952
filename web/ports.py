"""The router as the web side sees it: the part of :class:`router.service.Router` that
handlers use, and nothing else. ``create_app`` and the handlers are typed against it, so
mypy checks each use; a new use by the web side is added here first."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from projections.db import ViewDatabase
    from projections.freshness import FreshReads
    from projections.progress import ViewProgress
    from router.ai.callbacks import AICallbacks
    from router.ai.requests import AIRequests
    from router.application.admin_state import AdminState
    from router.application.commands import Commands
    from router.application.receive import Receiver
    from router.application.reidentification import ReidentificationMap
    from router.application.remote_nodes import RemoteNodes
    from router.application.retention import Retention
    from router.application.retrieve import Retriever
    from router.application.runtime_settings import RuntimeSettingsStore
    from router.application.sessions import Sessions
    from router.application.stores import EventStores
    from router.application.users import Users
    from router.cluster.nodes import NodeRegistry
    from router.dicom.gate import Gate
    from router.dispatch.policy import DestinationPolicy
    from router.secrets import SecretBox
    from router.service import ViewName
    from router.settings import Settings
    from router.storage.blobs import BlobStore


class ViewWaits(Protocol):
    """What the web side uses of the projection runner: the views' committed positions and a
    way to end a view's pause so that a waiting request is answered sooner."""

    progress: ViewProgress

    def hurry(self, view: str) -> None: ...


class RouterPort(Protocol):
    # configuration and secrets
    settings: Settings
    box: SecretBox  # session-token keys, destination checks, re-identification seeds
    policy: DestinationPolicy
    runtime: RuntimeSettingsStore
    # the write side: commands and the state they decide on
    admin: AdminState
    commands: Commands
    users: Users
    sessions: Sessions
    remote_nodes: RemoteNodes
    retriever: Retriever
    retention: Retention
    reidentification: ReidentificationMap
    ai_requests: AIRequests
    ai_callbacks: AICallbacks
    receiver: Receiver  # STOW-RS and browser uploads
    stores: EventStores  # the admin log's history (audit "state as of", bulk actions, send)
    blobs: BlobStore
    # the read side
    fresh: FreshReads
    nodes: NodeRegistry

    @property
    def runner(self) -> ViewWaits:  # the jobs API waits for the audit view (audit_in_step)
        ...

    def view_db(self, name: ViewName) -> ViewDatabase: ...

    # health and metrics
    def health(self) -> dict[str, Any]: ...

    @property
    def gate(self) -> Gate | None: ...
