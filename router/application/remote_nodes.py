"""Remote DICOM nodes (declared in TOML as ``[[remote_nodes]]`` or edited in the UI/API) and the
retrieve jobs, as every process sees them: commands that record admin events, and a follower
of the admin log that keeps the current nodes and jobs in memory.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from eventsourcing.application import AggregateNotFoundError

from router.application.commands import CONFIG_ACTOR, Actor, CommandError, NotFoundError
from router.application.stores import EventStores
from router.config_types import (
    SECTION,
    AETitle,
    After,
    Description,
    Doc,
    PeerPort,
    Strict,
    problems_of,
    validated,
    validation_error,
)
from router.dicom.tls import TlsClientSettings
from router.dispatch.policy import DestinationPolicy
from router.domain.remote import RemoteNode, Retrieve, remote_node_id

logger = logging.getLogger(__name__)

Service = Literal["find", "move", "get"]
SERVICES: tuple[Service, ...] = ("find", "move", "get")  # C-FIND, C-MOVE, C-GET of us
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
TLS_KEYS = ("tls", "tls_ca_certificates", "tls_certificate", "tls_private_key", "tls_profile",
            "tls_server_name")
_TOPICS = tuple(f"router.domain.remote:{name}" for name in (
    "RemoteNode.Created", "RemoteNode.Updated", "RemoteNode.Deleted", "RemoteNode.Detached",
    "Retrieve.Requested",
    "Retrieve.Progressed", "Retrieve.Completed", "Retrieve.Failed"))


class RemoteNodeError(CommandError):
    """A remote node's settings are invalid; ``errors`` maps each bad field to a message."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        self.errors = dict(errors)
        super().__init__("; ".join(f"{key}: {message}" for key, message in self.errors.items()))


def _name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError("1-64 letters, digits, '.', '_' or '-'")
    return value


def _host(host: str) -> str:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST.match(host):
            raise ValueError("a host name or an IP address") from None
    return host


def _in_order(services: tuple[Service, ...]) -> tuple[Service, ...]:
    return tuple(s for s in SERVICES if s in services)


@dataclass(frozen=True)
class RemoteNodeConfig:
    """A remote AE as stored in its events (validated from TOML/JSON by parse_remote_node)."""

    __pydantic_config__ = SECTION

    name: Annotated[str, After(_name), Doc(
        "1-64 letters, digits, '.', '_' or '-'; in an API body, required when creating and"
        " the URL's name when replacing")]
    ae_title: Annotated[AETitle, After(str.strip)]
    host: Annotated[str, After(_host), Doc("a host name or an IP address")]
    port: PeerPort
    # What the node may ask of us, in SERVICES order.
    services: Annotated[tuple[Service, ...], After(_in_order), Doc(
        "what it may ask of us (C-FIND, C-MOVE, C-GET); in the API, none unless listed"
        " (least privilege). Any node is a valid C-MOVE destination, and we may echo, query"
        " and retrieve any node")] = SERVICES
    description: Description = ""
    # DICOM TLS for our associations to it (C-ECHO, C-FIND, C-MOVE, C-GET, and C-MOVE
    # sub-operations we send it): as a DICOM destination's tls_* settings.
    tls: Annotated[bool, Strict(), Doc("our associations to it over DICOM TLS")] = False
    tls_ca_certificates: Annotated[str, Doc(
        "PEM bundle its certificate chains to; empty: this machine's CAs")] = ""
    tls_certificate: Annotated[str, Doc(
        "our client certificate, a PEM file, if it requires one")] = ""
    tls_private_key: Annotated[str, Doc("its private key, a PEM file (not encrypted)")] = ""
    tls_profile: Annotated[str, Doc("bcp195, non-downgrading or tls13")] = "bcp195"
    tls_server_name: Annotated[str, Doc(
        "the name in its certificate; empty: the host")] = ""

    def to_dict(self) -> dict[str, Any]:
        data = {"ae_title": self.ae_title, "host": self.host, "port": self.port,
                "services": list(self.services), "description": self.description}
        if self.tls:  # absent otherwise: nodes without TLS are stored as before
            data.update({key: getattr(self, key) for key in TLS_KEYS})
        return data

    def allows(self, service: str) -> bool:
        return service in self.services


def parse_remote_node(data: Mapping[str, Any]) -> RemoteNodeConfig:
    """A validated node from TOML/JSON-shaped ``data``; RemoteNodeError lists every problem."""
    if not isinstance(data, Mapping):
        raise RemoteNodeError({"body": "a remote node is a table of settings"})
    try:
        node = validated(RemoteNodeConfig, {str(key): value for key, value in data.items()})
    except validation_error() as exc:
        raise RemoteNodeError({p.path: p.message
                               for p in problems_of(exc, RemoteNodeConfig)}) from None
    tls = TlsClientSettings.of(node)
    problems = tls.problems() if tls is not None else {}
    if problems:
        raise RemoteNodeError(problems)
    # Without TLS the tls_* keys mean nothing: stored as the defaults.
    return node if node.tls else dataclasses.replace(
        node, tls_ca_certificates="", tls_certificate="", tls_private_key="",
        tls_profile="bcp195", tls_server_name="")


def stored_remote_node(name: str, config: Mapping[str, Any]) -> RemoteNodeConfig:
    """A node as its events recorded it, validated when it was saved: built as is (every
    process follows the admin log; validating again would load pydantic in each)."""
    return RemoteNodeConfig(name=name, **{**config, "services": tuple(
        s for s in SERVICES if s in config.get("services", SERVICES))})


@dataclass(frozen=True)
class RemoteNodeState:
    """A live remote node and its version (the number of changes)."""

    config: RemoteNodeConfig
    version: int
    created_by: str
    detached: bool = False  # detached from the TOML file: the file no longer changes it

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(frozen=True)
class RetrieveState:
    """A retrieve job as shown and as matched to incoming C-STOREs."""

    id: str
    user: str
    correlation_id: str
    node: str
    node_ae: str
    method: str  # "move" | "get"
    level: str  # "STUDY" | "SERIES"
    target: str  # sealed JSON {"study": uid, "series": uid | null}
    message_id: int
    runner: str
    status: str  # running | completed | partial | failed
    counts: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    dimse_status: int | None = None
    requested_at: float = 0.0
    updated_at: float = 0.0

    @property
    def running(self) -> bool:
        return self.status == "running"


# How long a C-STORE waits for the once-a-second re-read of the retrieve jobs (a few ms when
# the database is up) before it goes on with what is already known.
SUB_OPERATION_LOOKUP_WAIT = 0.5


class RemoteState:
    """Follows the remote-node and retrieve events of the admin log; cheap to read."""

    def __init__(self, app: Any, refresh_interval: float = 1.0) -> None:
        self._app = app
        self._interval = refresh_interval
        self._lock = threading.Lock()
        self._position = 0
        self._checked = 0.0
        self._nodes: dict[str, RemoteNodeState] = {}
        self._retrieves: dict[str, RetrieveState] = {}
        self._refresher: threading.Thread | None = None
        self.refresh()

    def _fresh(self) -> None:
        if time.monotonic() - self._checked > self._interval:
            self.refresh()

    def _fresh_within(self, wait: float) -> None:
        """Like ``_fresh`` but waits at most ``wait`` seconds for the read, on a helper thread:
        a C-STORE never hangs on a database that is away (it goes on with what is known; the
        save itself then answers the sender)."""
        if time.monotonic() - self._checked <= self._interval:
            return
        refresher = self._refresher
        if refresher is None or not refresher.is_alive():
            self._checked = time.monotonic()  # one refresher at a time
            refresher = threading.Thread(target=self._refresh_quietly, daemon=True,
                                         name="remote-state-refresh")
            self._refresher = refresher
            refresher.start()
        refresher.join(wait)

    def _refresh_quietly(self) -> None:
        try:
            self.refresh()
        except Exception as exc:
            logger.warning("remote nodes and retrieves not refreshed: %s", type(exc).__name__)

    def nodes(self) -> dict[str, RemoteNodeState]:
        self._fresh()
        return dict(self._nodes)

    def node(self, name: str) -> RemoteNodeState | None:
        return self.nodes().get(name)

    def node_for_ae(self, ae_title: str, recheck: bool = False) -> RemoteNodeState | None:
        """The node with this AE title; ``recheck``: read the log again before saying none
        (a node created a moment ago in another process is then found)."""
        wanted = ae_title.strip()
        found = next((n for n in self.nodes().values() if n.config.ae_title == wanted), None)
        if found is None and recheck:
            self.refresh()
            found = next((n for n in self._nodes.values() if n.config.ae_title == wanted), None)
        return found

    def retrieves(self, node: str | None = None, limit: int = 50) -> list[RetrieveState]:
        self._fresh()
        jobs = [r for r in self._retrieves.values() if node is None or r.node == node]
        jobs.sort(key=lambda r: r.requested_at, reverse=True)
        return jobs[:limit]

    def retrieve(self, retrieve_id: str) -> RetrieveState | None:
        self._fresh()
        return self._retrieves.get(retrieve_id)

    def running_for(self, calling_ae: str, message_id: int | None) -> RetrieveState | None:
        """The running C-MOVE job a C-STORE sub-operation from ``calling_ae`` belongs to.

        With a Move Originator Message ID, a miss re-reads the log at once (the job may have
        been requested by another process a moment ago); without one (most C-STOREs are not
        sub-operations) only the usual once-a-second refresh applies: no query per C-STORE.
        """
        if message_id is None:
            self._fresh_within(SUB_OPERATION_LOOKUP_WAIT)
        for attempt in range(2):
            candidates = [r for r in self._retrieves.values() if r.running
                          and r.method == "move" and r.node_ae == calling_ae.strip()]
            if message_id is not None:
                candidates = [r for r in candidates if r.message_id == message_id]
            if len(candidates) == 1:
                return candidates[0]
            if attempt == 0 and message_id is not None:
                self.refresh()
            else:
                break
        return None

    def refresh(self) -> None:
        """Apply the events recorded since the last refresh (by any process or node).

        Readers never lock: the dicts are rebuilt aside and swapped in whole.
        """
        with self._lock:
            self._checked = time.monotonic()
            changed: dict[Any, None] = {}
            while batch := self._app.recorder.select_notifications(
                    start=self._position, limit=500, topics=_TOPICS, inclusive_of_start=False):
                for notification in batch:
                    changed[notification.originator_id] = None
                    self._position = notification.id
            if not changed:
                return
            nodes, retrieves = dict(self._nodes), dict(self._retrieves)
            for originator_id in changed:
                aggregate = self._app.repository.get(originator_id)
                if isinstance(aggregate, RemoteNode):
                    self._remember_node(aggregate, nodes)
                elif isinstance(aggregate, Retrieve):
                    retrieves[str(aggregate.id)] = _retrieve_state(aggregate)
            self._nodes, self._retrieves = nodes, retrieves

    def _remember_node(self, aggregate: RemoteNode, nodes: dict[str, RemoteNodeState]) -> None:
        if aggregate.deleted:
            nodes.pop(aggregate.name, None)
            return
        known = nodes.get(aggregate.name)
        created_by = known.created_by if known else _first_actor(self._app, aggregate.id)
        try:
            config = stored_remote_node(aggregate.name, aggregate.config)
        except (TypeError, ValueError):
            logger.error("remote node %s has an invalid stored configuration", aggregate.name)
            return
        nodes[aggregate.name] = RemoteNodeState(config, aggregate.version, created_by,
                                                getattr(aggregate, "detached", False))


def _first_actor(app: Any, aggregate_id: uuid.UUID) -> str:
    events = list(app.events.get(aggregate_id, lte=1))
    return str(getattr(events[0], "actor", "")) if events else ""


def _retrieve_state(r: Retrieve) -> RetrieveState:
    return RetrieveState(
        id=str(r.id), user=r.user, correlation_id=r.correlation_id,
        node=r.node, node_ae=r.node_ae, method=r.method, level=r.level, target=r.target,
        message_id=r.message_id, runner=r.runner, status=r.status, counts=dict(r.counts),
        reason=r.reason, dimse_status=r.dimse_status,
        requested_at=r.created_on.timestamp(), updated_at=r.modified_on.timestamp())


class RemoteNodes:
    """Commands on remote nodes; reads go through :attr:`state`."""

    def __init__(self, stores: EventStores, state: RemoteState,
                 policy: DestinationPolicy) -> None:
        self._app = stores.admin
        self.state = state
        self._policy = policy

    def put(self, data: Mapping[str, Any], actor: Actor) -> bool:
        """Create or replace a node (by name); False when nothing changed. Refused when the
        address policy does not allow its host and port (we connect to it: echo, find,
        retrieve, and C-MOVE sub-operations)."""
        config = parse_remote_node(data)
        problems = self._policy.remote_node_problems(config.host, config.port)
        if problems:
            raise RemoteNodeError(problems)
        clash = self.state.node_for_ae(config.ae_title, recheck=True)
        if clash is not None and clash.name != config.name:
            raise RemoteNodeError({"ae_title": f"already used by remote node {clash.name!r}"})
        existing = self._get(config.name)
        stored = config.to_dict()
        if existing is not None and not existing.deleted and existing.config == stored:
            return False
        if existing is None:
            aggregate = RemoteNode(config.name, **actor.ctx(), config=stored)
        else:
            existing.update(**actor.ctx(), config=stored)
            aggregate = existing
        self._app.save(aggregate)
        self.state.refresh()
        return True

    def delete(self, name: str, actor: Actor) -> None:
        aggregate = self._get(name)
        if aggregate is None or aggregate.deleted:
            raise NotFoundError(f"remote node {name!r} does not exist")
        aggregate.delete(**actor.ctx())
        self._app.save(aggregate)
        self.state.refresh()

    def detach(self, name: str, actor: Actor, reason: str = "") -> bool:
        """Detach a node from the TOML file (the file no longer overwrites or deletes it);
        False if it already was."""
        aggregate = self._get(name)
        if aggregate is None or aggregate.deleted:
            raise NotFoundError(f"remote node {name!r} does not exist")
        if getattr(aggregate, "detached", False):
            return False
        aggregate.detach(**actor.ctx(), reason=reason)
        self._app.save(aggregate)
        self.state.refresh()
        return True

    def apply(self, items: Sequence[Mapping[str, Any]],
              actor: Actor = CONFIG_ACTOR) -> dict[str, int]:
        """Make the store match a TOML file's ``[[remote_nodes]]`` (idempotent).

        Nodes the file declared before and no longer declares are deleted; nodes created in
        the UI or API, and nodes an admin detached from the file, are left alone.
        """
        changed = {"remote_nodes": 0, "deleted": 0, "detached": 0}
        for item in items:
            existing = self._get(str(item.get("name")))
            if existing is not None and getattr(existing, "detached", False):
                changed["detached"] += 1
                continue
            changed["remote_nodes"] += self.put(item, actor)
        declared = {str(item.get("name")) for item in items}
        for name, node in self.state.nodes().items():
            if name not in declared and node.created_by == actor.name and not node.detached:
                self.delete(name, actor)
                changed["deleted"] += 1
        return changed

    def _get(self, name: str) -> RemoteNode | None:
        try:
            aggregate: Any = self._app.repository.get(remote_node_id(name))
        except AggregateNotFoundError:
            return None
        return aggregate if isinstance(aggregate, RemoteNode) else None
