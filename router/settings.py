"""Settings: one frozen tree built once at the entry point from TOML and ``DICOM_ROUTER_*``.

Nothing else in the project reads the environment. Environment variables win over the file.
Each section is a frozen dataclass whose annotations (types, ranges, defaults) are the one
description the TOML file and the environment are validated against by pydantic, every problem
listed with its path (router.config_types; pydantic is imported only to validate, never by a
process that merely receives its settings). ``DICOM_ROUTER_<KEY>`` sets ``[server] <key>`` and
``DICOM_ROUTER_<SECTION>_<KEY>`` a section's scalar ``<key>``; unknown names are errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import socket
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types as at

from router.config_types import (
    SECTION,
    AETitle,
    After,
    Before,
    ByteSize,
    Doc,
    Duration,
    FieldProblem,
    Folder,
    Networks,
    Problem,
    SettingsError,
    UserPath,
    WriteOnly,
    aliases_of,
    config_keys,
    did_you_mean,
    ints,
    join_path,
    parse_duration,
    problems_of,
    unwrapped,
    validated,
    validation_error,
)
from router.settings_audit import AtnaSettings, AuditSettings

__all__ = [
    "ENV_PREFIX",
    "Settings",
    "SettingsError",
    "load_settings",
    "parse_duration",
    "read_toml",
    "settings_problems",
]

ENV_PREFIX = "DICOM_ROUTER_"
TLS_PROFILES = ("bcp195", "non-downgrading", "tls13")
MAX_SEQUENCE_DEPTH = 100  # pydicom survives about 190 levels at the top of a thread

def _stripped(value: object) -> object:
    return value.strip() if isinstance(value, str) else value


StrippedAETitle = Annotated[AETitle, Before(_stripped)]
Port = Annotated[int, ints(0, 65535)]
TlsProfile = Literal["bcp195", "non-downgrading", "tls13"]


@dataclasses.dataclass(frozen=True)
class TlsServerSettings:
    """The DICOM TLS listener: its port, our certificate and how peers are verified."""

    port: int
    certificate: Path
    private_key: Path
    # CA bundle that client certificates must chain to; with verify_clients, a peer without a
    # valid certificate is refused during the handshake (mutual TLS).
    ca_certificates: Path | None = None
    verify_clients: bool = False
    profile: str = "bcp195"  # see router/dicom/tls.py
    handshake_timeout: float = 10.0


@dataclasses.dataclass(frozen=True)
class DicomSettings:
    """DICOM SCP behaviour."""

    __pydantic_config__ = SECTION

    max_associations: Annotated[int, ints(1, 1000)] = 32
    # Receiver processes (the supervisor hands each connection to the least busy one); 0 =
    # receive in the main process's threads.
    processes: Annotated[int, ints(0, 64)] = 2
    # What we advertise. Large PDUs are fast for big objects, and a whole PDU is held in memory
    # while it is read, so this is also a memory bound per association (0 = unlimited).
    max_pdu_size: Annotated[int, ints(0, 2**31)] = 4 * 1024 * 1024
    # Hard cap on a PDU a peer may send us anyway.
    max_incoming_pdu: Annotated[int, ints(4096, 2**31)] = 64 * 1024 * 1024
    require_known_calling_ae: bool = False
    known_calling_aets: tuple[StrippedAETitle, ...] = ()
    # C-FIND, C-MOVE and C-GET from any calling AE; by default only from remote nodes allowed it.
    open_query_retrieve: bool = False
    network_timeout: Duration = 60.0
    acse_timeout: Duration = 30.0
    dimse_timeout: Duration = 60.0
    # -- the front door (router/dicom/gate.py): what a connection may cost before and while it
    # is an association. ARTIM (PS3.8 9.1.5): how long a new connection may take to send its
    # A-ASSOCIATE-RQ; until then it holds no association slot and no thread.
    artim_timeout: Annotated[Duration, at.Gt(0)] = 10.0
    # Connections awaiting their A-ASSOCIATE-RQ, all sources.
    max_pending_connections: Annotated[int, ints(1, 100000)] = 256
    # Open at once from one address (pending + associated).
    max_connections_per_ip: Annotated[int, ints(1, 100000)] = 32
    max_associations_per_ip: Annotated[int, ints(1, 1000)] = 16  # from one address
    # TCP load balancers allowed to send a PROXY protocol v2 header naming the real sender.
    trusted_proxies: Networks = ()
    require_called_aet: bool = False  # refuse A-ASSOCIATE-RQs not addressed to ae_title
    plain_listener: bool = True  # false: DICOM over TLS only (tls_port)
    # A DICOM TLS listener (PS3.15 B.9), off unless tls_port is set: see :attr:`tls`.
    tls_port: Port | None = None
    tls_certificate: UserPath | None = None
    tls_private_key: UserPath | None = None
    tls_ca_certificates: UserPath | None = None
    tls_verify_clients: bool = False
    tls_profile: TlsProfile = "bcp195"  # see router/dicom/tls.py
    tls_handshake_timeout: Duration = 10.0
    # Storage Commitment (docs/storage-commitment.md): "" = an instance is committed once
    # received and stored; a destination's name = once delivered there, waited for at most
    # commitment_timeout after the request (then reported failed).
    commitment_destination: str = ""
    commitment_timeout: Annotated[Duration, at.Gt(0)] = 600.0

    @property
    def tls(self) -> TlsServerSettings | None:
        """The TLS listener's settings, or None when there is none."""
        if self.tls_port is None or self.tls_certificate is None or not self.tls_private_key:
            return None
        return TlsServerSettings(
            port=self.tls_port, certificate=self.tls_certificate,
            private_key=self.tls_private_key, ca_certificates=self.tls_ca_certificates,
            verify_clients=self.tls_verify_clients, profile=self.tls_profile,
            handshake_timeout=self.tls_handshake_timeout)

    def __post_init__(self) -> None:
        problems: dict[str, str] = {}
        if self.tls_port is None:
            stray = [f.name for f in dataclasses.fields(self) if f.name.startswith("tls_")
                     and getattr(self, f.name) != f.default]
            if stray:
                problems["tls_port"] = f"required by {', '.join(stray)}"
        else:
            for key in ("tls_certificate", "tls_private_key"):
                if getattr(self, key) is None:
                    problems[key] = "required by tls_port (a PEM file)"
        if self.tls_verify_clients and self.tls_ca_certificates is None:
            problems["tls_ca_certificates"] = ("required by tls_verify_clients (the CA bundle "
                                               "client certificates must chain to)")
        if not self.plain_listener and self.tls_port is None:
            problems["plain_listener"] = "false needs a TLS listener (tls_port)"
        if self.max_pdu_size == 0 or self.max_pdu_size > self.max_incoming_pdu - 6:
            problems["max_pdu_size"] = ("must be between 1 and max_incoming_pdu - 6 (a peer "
                                        "may send PDUs as large as we advertise)")
        if problems:
            raise FieldProblem(problems)


@dataclasses.dataclass(frozen=True)
class DispatchSettings:
    """Delivery workers and retry policy."""

    __pydantic_config__ = SECTION
    __config_aliases__ = {"retry_every": "retry_every_after"}  # file key -> field

    retry_delays: tuple[Duration, ...] = (30.0, 60.0, 300.0, 900.0, 1800.0)
    # Written ``retry_every`` in the file: the delay once retry_delays are used up.
    retry_every_after: Duration = 1800.0
    max_age: Duration = 24 * 3600.0
    default_destination: str | None = None
    shutdown_grace: Duration = 20.0
    poll_interval: Duration = 1.0


@dataclasses.dataclass(frozen=True)
class IngestSettings:
    """What happens to received instances before they are routed."""

    __pydantic_config__ = SECTION

    # "new_version": same SOP Instance UID with other content is kept and routed again.
    # "reject": answered with a failure status (0xA700 is wrong here; we use 0xC001).
    # "keep_first": recorded as a conflicting duplicate and not routed.
    changed_duplicate_policy: Literal["new_version", "reject", "keep_first"] = "new_version"
    # Dataset limits (router/dicom/limits.py, docs/security.md): a received object beyond
    # them is refused 0xC000 with the limit as the recorded reason, never acknowledged and
    # then left undeliverable. Real objects stay far below these defaults.
    # At most MAX_SEQUENCE_DEPTH: pydicom reads recursively.
    max_sequence_depth: Annotated[int, ints(1, MAX_SEQUENCE_DEPTH)] = 64
    # Data elements, items and fragments of one object.
    max_elements: Annotated[int, ints(1000, 100_000_000)] = 2_000_000
    # Bytes of one value other than pixel data.
    max_value_length: Annotated[int, ints(1 << 16, (1 << 32) - 2)] = 1 << 30
    # UIDs that are not PS3.5 9.1 UIDs (digits and dots, no empty component, at most 64):
    # "refuse" (0xC000), or "repair" (SOP Instance, Study and Series UIDs replaced by a
    # 2.25 UID derived from the original, which the receipt event keeps).
    invalid_uids: Literal["refuse", "repair"] = "refuse"
    # A dataset whose SOP Class UID is not its presentation context's: "refuse" (0xA900)
    # or "accept".
    sop_class_mismatch: Literal["refuse", "accept"] = "refuse"


@dataclasses.dataclass(frozen=True)
class WebSettings:
    """Sessions, logins and passwords of the web UI and API."""

    __pydantic_config__ = SECTION

    session_idle_timeout: Duration = 30 * 60.0
    session_max_age: Duration = 12 * 3600.0
    api_token_lifetime: Duration = 3600.0  # POST /api/v1/auth/token
    min_password_length: Annotated[int, ints(8, 72)] = 12
    # Per user name, then locked for lockout_time.
    max_login_failures: Annotated[int, ints(1, 1000)] = 5
    lockout_time: Duration = 15 * 60.0
    secure_cookies: bool = False  # set when served over TLS (directly or behind a proxy)
    # Reverse proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (CIDR networks);
    # empty: the audit trail records the connecting address, whatever headers say.
    trusted_proxies: Networks = ()
    # /metrics without a token (it names destinations and their backlog): for a scraper on a
    # network only monitoring reaches. Off: a bearer token with the metrics.read permission.
    public_metrics: bool = False


Secret = Annotated[str | None, WriteOnly()]


@dataclasses.dataclass(frozen=True)
class StorageSettings:
    """Blob retention, and the folders file destinations may write to."""

    __pydantic_config__ = SECTION

    # Changeable at run time too (router.application.runtime_settings, the settings page).
    retention_days: Annotated[int, ints(0, 36500), Doc(
        "Purge the stored objects of fully delivered jobs older than this many days "
        "(0 keeps everything).")] = 0
    # Folders below which file destinations may write, besides <data_dir>/exports (always
    # allowed). Never inside the router's own state, whatever is listed here.
    destination_roots: tuple[Folder, ...] = ()
    # Where received objects are kept: "local" (<data_dir>/blobs) or "s3" (a bucket, with
    # <data_dir>/blob-cache as a read cache of at most cache_size; router/storage/s3_blobs.py).
    backend: Literal["local", "s3"] = "local"
    bucket: str = ""
    prefix: str = ""  # keys are <prefix><ab>/<cd>/<sha256>
    endpoint_url: str = ""  # empty: AWS
    region: str = "us-east-1"
    # Both empty: boto3's own chain (an instance role...). The secret may be sealed
    # ("enc:v1:...", made by ``dicom-router seal-secret storage.secret_access_key``).
    access_key_id: str = ""
    secret_access_key: Secret = field(default=None, repr=False)  # never in a log line
    cache_size: ByteSize = 10 * 1000**3

    def __post_init__(self) -> None:
        if self.backend != "s3":
            return
        from router.storage.s3_names import s3_store_problems

        problems = s3_store_problems(self)
        if problems:
            raise FieldProblem(problems)


@dataclasses.dataclass(frozen=True)
class SecuritySettings:
    """Where outbound connections may go (docs/security.md, "Destinations are not a pivot")."""

    __pydantic_config__ = SECTION

    # Destinations and remote nodes on loopback, or on this host at the router's own ports.
    allow_loopback_destinations: bool = False


def _base_url(value: str) -> str:
    url = value.rstrip("/")
    if url and not url.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return url


@dataclasses.dataclass(frozen=True)
class AISettings:
    """AI processors: where they reach us, and which otherwise refused networks they may use."""

    __pydantic_config__ = SECTION

    # The router's base URL as AI processors reach it (callbacks, DICOMweb); empty: derived
    # from http_port on this host's name.
    public_url: Annotated[str, After(_base_url)] = ""
    # Link-local and cloud-metadata addresses are refused for outbound URLs unless listed here.
    allowed_networks: Networks = ()
    max_callback_bytes: Annotated[int, ints(1024, 2**40)] = 512 * 1024 * 1024


def _database_url(value: str) -> str:
    if value and not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ValueError("must start with sqlite:/// or postgresql://")
    return value


_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _node_id(value: str) -> str:
    if value and not _NODE_ID.match(value):
        raise ValueError("must be 1-63 letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit")
    return value


def default_node_id() -> str:
    """This host's name, cut to what a node id may hold (``node`` if nothing is left)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip(".-_")[:63]
    return name or "node"


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


Tables = tuple[dict[str, Any], ...]  # validated by their own models (destinations, rules...)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the router needs to start; built by :func:`load_settings`.

    The scalar fields are the file's ``[server]`` table.
    """

    __pydantic_config__ = SECTION

    ae_title: StrippedAETitle = "DICOMROUTER"
    dicom_host: str = "0.0.0.0"  # noqa: S104 - a DICOM node listens on the network by design
    dicom_port: Port = 11112
    http_host: str = "0.0.0.0"  # noqa: S104
    http_port: Port = 8080
    data_dir: UserPath = Path("./data")
    database_url: Annotated[str, After(_database_url)] = ""
    secret_key: Secret = None
    # This node's name in its events, the jobs view and the health page (several nodes on
    # one PostgreSQL database must each have their own); default: the host's name.
    node_id: Annotated[str, After(_node_id)] = ""
    admin_password: Secret = None
    log_format: Literal["text", "json"] = "text"
    log_level: Annotated[str, Before(_upper)] = "INFO"
    encrypt_events: bool = True
    # False: never create or alter tables (PostgreSQL, serving as a role that owns nothing:
    # `dicom-router migrate` runs as the tables' owner; docs/audit-trail.md).
    manage_schema: bool = True
    dicom: DicomSettings = field(default_factory=DicomSettings)
    dispatch: DispatchSettings = field(default_factory=DispatchSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    web: WebSettings = field(default_factory=WebSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    ai: AISettings = field(default_factory=AISettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    atna: AtnaSettings = field(default_factory=AtnaSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    destinations: Tables = ()
    rules: Tables = ()
    remote_nodes: Tables = ()
    transforms: Tables = ()  # [[transforms]] (router.transforms), named by destinations and rules

    @property
    def is_postgres(self) -> bool:
        return self.database_url.startswith(("postgresql://", "postgres://"))

    @property
    def sqlite_dir(self) -> Path:
        """Folder of the SQLite databases (one file per application and one for the views)."""
        if self.database_url.startswith("sqlite:///"):
            return Path(self.database_url.removeprefix("sqlite:///"))
        return self.data_dir / "db"


SECTIONS: dict[str, type[Any]] = {
    "dicom": DicomSettings, "dispatch": DispatchSettings, "ingest": IngestSettings,
    "web": WebSettings, "storage": StorageSettings, "ai": AISettings,
    "security": SecuritySettings, "atna": AtnaSettings, "audit": AuditSettings}
TABLES = ("destinations", "rules", "remote_nodes", "transforms")
SERVER_KEYS = tuple(f.name for f in dataclasses.fields(Settings)
                    if f.name not in SECTIONS and f.name not in TABLES)


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML settings file with a clear error naming the file and the problem."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise SettingsError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None


def load_settings(
    environ: Mapping[str, str],
    config_path: Path | None = None,
    data_dir: Path | None = None,
) -> Settings:
    """Build the settings: defaults, then the TOML file, then the environment, then flags.

    Raises :class:`SettingsError` listing every problem, each with its path.
    """
    doc: Mapping[str, Any] = read_toml(config_path) if config_path else {}
    settings, problems = settings_problems(doc, environ, data_dir)
    if settings is None:
        raise SettingsError(problems)
    return settings


def settings_problems(doc: Mapping[str, Any], environ: Mapping[str, str],
                      data_dir: Path | None = None) -> tuple[Settings | None, list[Problem]]:
    """The settings from a parsed file and the environment, or None and every problem."""
    problems: list[Problem] = []
    tables: dict[str, Any] = {}
    for key, value in doc.items():
        if key == "server" or key in SECTIONS or key in TABLES:
            tables[key] = value
        else:
            problems.append(Problem(key, did_you_mean(key, ["server", *SECTIONS, *TABLES])))
    overrides, sources = _environment(environ, problems)
    server = tables.pop("server", {})
    if not isinstance(server, Mapping):
        problems.append(Problem("server", "expected a table"))
        server = {}
    data: dict[str, Any] = {}
    for key, value in server.items():
        if key in SERVER_KEYS:
            data[key] = value
        else:  # sections and tables are top-level tables, not [server] keys
            problems.append(Problem(f"server.{key}", did_you_mean(key, SERVER_KEYS)))
    data.update(overrides.pop("server", {}))
    if data_dir is not None:
        data["data_dir"] = str(data_dir)
    for section, values in overrides.items():
        table = tables.get(section, {})
        tables[section] = {**table, **values} if isinstance(table, Mapping) else table
    for section, model in SECTIONS.items():
        tables[section] = _unaliased(section, model, tables.get(section, {}), problems)
    try:
        settings = validated(Settings, {**data, **tables})
    except validation_error() as exc:
        problems += [_located(p, sources) for p in problems_of(exc, Settings)]
        return None, problems
    if problems:
        return None, problems
    if not settings.database_url:
        directory = settings.data_dir / "db"
        settings = dataclasses.replace(settings, database_url=f"sqlite:///{directory}")
    if not settings.node_id:
        settings = dataclasses.replace(settings, node_id=default_node_id())
    return settings, []


def _unaliased(section: str, model: type[Any], table: Any, problems: list[Problem]) -> Any:
    """A section's table with its aliases (``retry_every``) renamed to the fields."""
    aliases = aliases_of(model)
    if not aliases or not isinstance(table, Mapping):
        return table
    renamed = dict(table)
    for alias, name in aliases.items():
        if alias in renamed:
            if name in renamed:
                problems.append(Problem(f"{section}.{alias}", f"the same setting as {name}"))
            renamed[name] = renamed.pop(alias)
    return renamed


def _located(problem: Problem, sources: Mapping[str, str]) -> Problem:
    """The problem's file path (``server.`` for top-level keys), naming the variable it came
    from when the environment set it."""
    path = problem.path
    head = path.split(".")[0].split("[")[0]
    if head in SERVER_KEYS:
        path = f"server.{path}"
    source = sources.get(path)
    return Problem(f"{path} ({source})" if source else path, problem.message)


def environment_names() -> dict[str, tuple[str, str]]:
    """``DICOM_ROUTER_*`` name -> (table, key) for every setting the environment may set:
    the scalars of [server] and of each section (lists are set in the file)."""
    names: dict[str, tuple[str, str]] = {}
    for section, model in SECTIONS.items():
        hints = typing.get_type_hints(model)
        for key in config_keys(model):
            name = key if key in hints else _field_of_alias(model, key)
            if typing.get_origin(unwrapped(hints[name])) is not tuple:
                names[f"{ENV_PREFIX}{section}_{key}".upper()] = (section, key)
    names[ENV_PREFIX + "RECEIVER_PROCESSES"] = ("dicom", "processes")
    # [server] keys win: DICOM_ROUTER_DICOM_PORT is server.dicom_port.
    names.update({f"{ENV_PREFIX}{key}".upper(): ("server", key) for key in SERVER_KEYS})
    return names


def _field_of_alias(model: type[Any], alias: str) -> str:
    return aliases_of(model)[alias]


def _environment(environ: Mapping[str, str], problems: list[Problem]
                 ) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Values by table from ``DICOM_ROUTER_*`` variables (empty ones are unset), and the
    variable that set each path; unknown names are added to ``problems``."""
    names = environment_names()
    overrides: dict[str, dict[str, str]] = {}
    sources: dict[str, str] = {}
    for variable, value in sorted(environ.items()):
        if not variable.startswith(ENV_PREFIX) or value == "":
            continue
        if variable not in names:
            close = difflib.get_close_matches(variable, list(names), n=1)
            hint = f"did you mean {close[0]}?" if close else "see README, Configure it"
            problems.append(Problem(variable, f"unknown setting ({hint})"))
            continue
        table, key = names[variable]
        overrides.setdefault(table, {})[key] = value
        sources[join_path(table, key)] = variable
    return overrides, sources
