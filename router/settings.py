"""Settings: one frozen tree built once at the entry point from TOML and ``DICOM_ROUTER_*``.

Nothing else in the project reads the environment. Environment variables win over the file.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from ipaddress import ip_network
from pathlib import Path
from typing import Any

ENV_PREFIX = "DICOM_ROUTER_"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class SettingsError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


def parse_duration(value: object, *, name: str = "duration") -> float:
    """Seconds from ``30``, ``"30s"``, ``"5m"``, ``"24h"`` or ``"2d"``."""
    if isinstance(value, bool):
        raise SettingsError(f"{name}: expected a duration such as '30s', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise SettingsError(
                f"{name}: expected a duration such as '30s' or '24h', got {value!r}")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds < 0:
        raise SettingsError(f"{name}: must not be negative")
    return seconds


TLS_PROFILES = ("bcp195", "non-downgrading", "tls13")


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class DicomSettings:
    """DICOM SCP behaviour."""

    max_associations: int = 32
    # Receiver processes (the supervisor hands each connection to the least busy one); 0 =
    # receive in the main process's threads.
    processes: int = 2
    # What we advertise. Large PDUs are fast for big objects, and a whole PDU is held in memory
    # while it is read, so this is also a memory bound per association (0 = unlimited).
    max_pdu_size: int = 4 * 1024 * 1024
    max_incoming_pdu: int = 64 * 1024 * 1024  # hard cap on a PDU a peer may send us anyway
    require_known_calling_ae: bool = False
    known_calling_aets: tuple[str, ...] = ()
    # C-FIND, C-MOVE and C-GET from any calling AE; by default only from remote nodes allowed it.
    open_query_retrieve: bool = False
    network_timeout: float = 60.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    # -- the front door (router/dicom/gate.py): what a connection may cost before and while it
    # is an association. ARTIM (PS3.8 9.1.5): how long a new connection may take to send its
    # A-ASSOCIATE-RQ; until then it holds no association slot and no thread.
    artim_timeout: float = 10.0
    max_pending_connections: int = 256  # connections awaiting their A-ASSOCIATE-RQ, all sources
    max_connections_per_ip: int = 32  # open at once from one address (pending + associated)
    max_associations_per_ip: int = 16  # associations at once from one address
    # TCP load balancers allowed to send a PROXY protocol v2 header naming the real sender.
    trusted_proxies: tuple[str, ...] = ()
    require_called_aet: bool = False  # refuse A-ASSOCIATE-RQs not addressed to ae_title
    plain_listener: bool = True  # false: DICOM over TLS only (tls_port)
    tls: TlsServerSettings | None = None  # a DICOM TLS listener (PS3.15 B.9), off by default


@dataclass(frozen=True)
class DispatchSettings:
    """Delivery workers and retry policy."""

    retry_delays: tuple[float, ...] = (30.0, 60.0, 300.0, 900.0, 1800.0)
    retry_every_after: float = 1800.0
    max_age: float = 24 * 3600.0
    default_destination: str | None = None
    shutdown_grace: float = 20.0
    poll_interval: float = 1.0


@dataclass(frozen=True)
class IngestSettings:
    """What happens to received instances before they are routed."""

    # "new_version": same SOP Instance UID with other content is kept and routed again.
    # "reject": answered with a failure status (0xA700 is wrong here; we use 0xC001).
    # "keep_first": recorded as a conflicting duplicate and not routed.
    changed_duplicate_policy: str = "new_version"
    # Dataset limits (router/dicom/limits.py, docs/security.md): a received object beyond
    # them is refused 0xC000 with the limit as the recorded reason, never acknowledged and
    # then left undeliverable. Real objects stay far below these defaults.
    max_sequence_depth: int = 64  # at most MAX_SEQUENCE_DEPTH: pydicom reads recursively
    max_elements: int = 2_000_000  # data elements, items and fragments of one object
    max_value_length: int = 1 << 30  # bytes of one value other than pixel data
    # UIDs that are not PS3.5 9.1 UIDs (digits and dots, no empty component, at most 64):
    # "refuse" (0xC000), or "repair" (SOP Instance, Study and Series UIDs replaced by a
    # 2.25 UID derived from the original, which the receipt event keeps).
    invalid_uids: str = "refuse"
    # A dataset whose SOP Class UID is not its presentation context's: "refuse" (0xA900)
    # or "accept".
    sop_class_mismatch: str = "refuse"


MAX_SEQUENCE_DEPTH = 100  # pydicom survives about 190 levels at the top of a thread


@dataclass(frozen=True)
class WebSettings:
    """Sessions, logins and passwords of the web UI and API."""

    session_idle_timeout: float = 30 * 60.0
    session_max_age: float = 12 * 3600.0
    api_token_lifetime: float = 3600.0  # POST /api/v1/auth/token
    min_password_length: int = 12
    max_login_failures: int = 5  # per user name, then locked for lockout_time
    lockout_time: float = 15 * 60.0
    secure_cookies: bool = False  # set when served over TLS (directly or behind a proxy)
    # Reverse proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (CIDR networks);
    # empty: the audit trail records the connecting address, whatever headers say.
    trusted_proxies: tuple[str, ...] = ()
    # /metrics without a token (it names destinations and their backlog): for a scraper on a
    # network only monitoring reaches. Off: a bearer token with the metrics.read permission.
    public_metrics: bool = False


@dataclass(frozen=True)
class StorageSettings:
    """Blob retention, and the folders file destinations may write to."""

    # 0 keeps everything; N purges fully delivered jobs older than N days.
    retention_days: int = 0
    # Folders below which file destinations may write, besides <data_dir>/exports (always
    # allowed). Never inside the router's own state, whatever is listed here.
    destination_roots: tuple[Path, ...] = ()


@dataclass(frozen=True)
class SecuritySettings:
    """Where outbound connections may go (docs/security.md, "Destinations are not a pivot")."""

    # Destinations and remote nodes on loopback, or on this host at the router's own ports.
    allow_loopback_destinations: bool = False


@dataclass(frozen=True)
class AISettings:
    """AI processors: where they reach us, and which otherwise refused networks they may use."""

    # The router's base URL as AI processors reach it (callbacks, DICOMweb); empty: derived
    # from http_port on this host's name.
    public_url: str = ""
    # Link-local and cloud-metadata addresses are refused for outbound URLs unless listed here.
    allowed_networks: tuple[str, ...] = ()
    max_callback_bytes: int = 512 * 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Everything the router needs to start; built by :func:`load_settings`."""

    ae_title: str = "DICOMROUTER"
    dicom_host: str = "0.0.0.0"  # noqa: S104 - a DICOM node listens on the network by design
    dicom_port: int = 11112
    http_host: str = "0.0.0.0"  # noqa: S104
    http_port: int = 8080
    data_dir: Path = Path("./data")
    database_url: str = ""
    secret_key: str | None = None
    admin_password: str | None = None
    log_format: str = "text"
    log_level: str = "INFO"
    encrypt_events: bool = True
    dicom: DicomSettings = field(default_factory=DicomSettings)
    dispatch: DispatchSettings = field(default_factory=DispatchSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    web: WebSettings = field(default_factory=WebSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    ai: AISettings = field(default_factory=AISettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    destinations: tuple[Mapping[str, Any], ...] = ()
    rules: tuple[Mapping[str, Any], ...] = ()
    remote_nodes: tuple[Mapping[str, Any], ...] = ()

    @property
    def is_postgres(self) -> bool:
        return self.database_url.startswith(("postgresql://", "postgres://"))

    @property
    def sqlite_dir(self) -> Path:
        """Folder of the SQLite databases (one file per application and one for the views)."""
        if self.database_url.startswith("sqlite:///"):
            return Path(self.database_url.removeprefix("sqlite:///"))
        return self.data_dir / "db"


def _ae_title(value: object, name: str) -> str:
    text = str(value).strip()
    if not (1 <= len(text) <= 16) or not text.isascii() or "\\" in text:
        raise SettingsError(f"{name}: an AE title is 1 to 16 ASCII characters, got {value!r}")
    return text


def _int(value: object, name: str, lo: int, hi: int) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise SettingsError(f"{name}: expected an integer, got {value!r}") from None
    if not lo <= number <= hi:
        raise SettingsError(f"{name}: must be between {lo} and {hi}, got {number}")
    return number


def _bool(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name}: expected true or false, got {value!r}")


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML settings file with a clear error naming the file and the problem."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise SettingsError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None


def _section(doc: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, Mapping):
        raise SettingsError(f"[{name}] must be a table")
    return value


def _dicom(doc: Mapping[str, Any]) -> DicomSettings:
    s = _section(doc, "dicom")
    d = DicomSettings()
    known = s.get("known_calling_aets", [])
    if not isinstance(known, list):
        raise SettingsError("dicom.known_calling_aets must be a list of AE titles")
    settings = DicomSettings(
        max_associations=_int(s.get("max_associations", d.max_associations),
                              "dicom.max_associations", 1, 1000),
        processes=_int(s.get("processes", d.processes), "dicom.processes", 0, 64),
        max_pdu_size=_int(s.get("max_pdu_size", d.max_pdu_size), "dicom.max_pdu_size", 0, 2**31),
        max_incoming_pdu=_int(s.get("max_incoming_pdu", d.max_incoming_pdu),
                              "dicom.max_incoming_pdu", 4096, 2**31),
        require_known_calling_ae=_bool(s.get("require_known_calling_ae", False),
                                       "dicom.require_known_calling_ae"),
        known_calling_aets=tuple(_ae_title(a, "dicom.known_calling_aets") for a in known),
        open_query_retrieve=_bool(s.get("open_query_retrieve", False),
                                  "dicom.open_query_retrieve"),
        network_timeout=parse_duration(s.get("network_timeout", d.network_timeout),
                                       name="dicom.network_timeout"),
        acse_timeout=parse_duration(s.get("acse_timeout", d.acse_timeout),
                                    name="dicom.acse_timeout"),
        dimse_timeout=parse_duration(s.get("dimse_timeout", d.dimse_timeout),
                                     name="dicom.dimse_timeout"),
        artim_timeout=parse_duration(s.get("artim_timeout", d.artim_timeout),
                                     name="dicom.artim_timeout"),
        max_pending_connections=_int(s.get("max_pending_connections",
                                           d.max_pending_connections),
                                     "dicom.max_pending_connections", 1, 100000),
        max_connections_per_ip=_int(s.get("max_connections_per_ip", d.max_connections_per_ip),
                                    "dicom.max_connections_per_ip", 1, 100000),
        max_associations_per_ip=_int(s.get("max_associations_per_ip",
                                           d.max_associations_per_ip),
                                     "dicom.max_associations_per_ip", 1, 1000),
        trusted_proxies=_networks(s, "trusted_proxies", "dicom.trusted_proxies"),
        require_called_aet=_bool(s.get("require_called_aet", False), "dicom.require_called_aet"),
        plain_listener=_bool(s.get("plain_listener", True), "dicom.plain_listener"),
        tls=_dicom_tls(s),
    )
    if settings.artim_timeout <= 0:
        raise SettingsError("dicom.artim_timeout must be more than 0")
    if not settings.plain_listener and settings.tls is None:
        raise SettingsError("dicom.plain_listener = false needs a TLS listener (dicom.tls_port)")
    if settings.max_pdu_size == 0 or settings.max_pdu_size > settings.max_incoming_pdu - 6:
        raise SettingsError("dicom.max_pdu_size must be between 1 and max_incoming_pdu - 6 "
                            "(a peer may send PDUs as large as we advertise)")
    return settings


def _dicom_tls(s: Mapping[str, Any]) -> TlsServerSettings | None:
    """``tls_port`` with ``tls_certificate`` and ``tls_private_key`` turn the listener on."""
    if s.get("tls_port") in (None, ""):
        stray = sorted(k for k in s if k.startswith("tls_"))
        if stray:
            raise SettingsError(f"dicom.{stray[0]} is set but dicom.tls_port is not")
        return None
    port = _int(s["tls_port"], "dicom.tls_port", 0, 65535)
    files: dict[str, Path] = {}
    for key in ("tls_certificate", "tls_private_key", "tls_ca_certificates"):
        if s.get(key):
            files[key] = Path(str(s[key])).expanduser()
    for key in ("tls_certificate", "tls_private_key"):
        if key not in files:
            raise SettingsError(f"dicom.tls_port needs dicom.{key} (a PEM file)")
    verify = _bool(s.get("tls_verify_clients", False), "dicom.tls_verify_clients")
    if verify and "tls_ca_certificates" not in files:
        raise SettingsError("dicom.tls_verify_clients needs dicom.tls_ca_certificates "
                            "(the CA bundle client certificates must chain to)")
    profile = str(s.get("tls_profile", "bcp195"))
    if profile not in TLS_PROFILES:
        raise SettingsError(f"dicom.tls_profile must be one of {', '.join(TLS_PROFILES)}")
    return TlsServerSettings(
        port=port, certificate=files["tls_certificate"], private_key=files["tls_private_key"],
        ca_certificates=files.get("tls_ca_certificates"), verify_clients=verify,
        profile=profile,
        handshake_timeout=parse_duration(s.get("tls_handshake_timeout", 10.0),
                                         name="dicom.tls_handshake_timeout"))


def _dispatch(doc: Mapping[str, Any]) -> DispatchSettings:
    s = _section(doc, "dispatch")
    d = DispatchSettings()
    delays = s.get("retry_delays")
    return DispatchSettings(
        retry_delays=tuple(parse_duration(x, name="dispatch.retry_delays") for x in delays)
        if delays is not None else d.retry_delays,
        retry_every_after=parse_duration(s.get("retry_every", d.retry_every_after),
                                         name="dispatch.retry_every"),
        max_age=parse_duration(s.get("max_age", d.max_age), name="dispatch.max_age"),
        default_destination=s.get("default_destination"),
        shutdown_grace=parse_duration(s.get("shutdown_grace", d.shutdown_grace),
                                      name="dispatch.shutdown_grace"),
        poll_interval=parse_duration(s.get("poll_interval", d.poll_interval),
                                     name="dispatch.poll_interval"),
    )


def _ingest(doc: Mapping[str, Any]) -> IngestSettings:
    s = _section(doc, "ingest")
    policy = s.get("changed_duplicate_policy", "new_version")
    if policy not in {"new_version", "reject", "keep_first"}:
        raise SettingsError(
            "ingest.changed_duplicate_policy must be 'new_version', 'reject' or 'keep_first'"
        )
    d = IngestSettings()
    invalid_uids = s.get("invalid_uids", d.invalid_uids)
    if invalid_uids not in {"refuse", "repair"}:
        raise SettingsError("ingest.invalid_uids must be 'refuse' or 'repair'")
    mismatch = s.get("sop_class_mismatch", d.sop_class_mismatch)
    if mismatch not in {"refuse", "accept"}:
        raise SettingsError("ingest.sop_class_mismatch must be 'refuse' or 'accept'")
    return IngestSettings(
        changed_duplicate_policy=policy,
        max_sequence_depth=_int(s.get("max_sequence_depth", d.max_sequence_depth),
                                "ingest.max_sequence_depth", 1, MAX_SEQUENCE_DEPTH),
        max_elements=_int(s.get("max_elements", d.max_elements), "ingest.max_elements",
                          1000, 100_000_000),
        max_value_length=_int(s.get("max_value_length", d.max_value_length),
                              "ingest.max_value_length", 1 << 16, (1 << 32) - 2),
        invalid_uids=invalid_uids, sop_class_mismatch=mismatch,
    )


def _web(doc: Mapping[str, Any]) -> WebSettings:
    s = _section(doc, "web")
    d = WebSettings()
    return WebSettings(
        session_idle_timeout=parse_duration(
            s.get("session_idle_timeout", d.session_idle_timeout), name="web.session_idle_timeout"),
        session_max_age=parse_duration(s.get("session_max_age", d.session_max_age),
                                       name="web.session_max_age"),
        api_token_lifetime=parse_duration(s.get("api_token_lifetime", d.api_token_lifetime),
                                          name="web.api_token_lifetime"),
        min_password_length=_int(s.get("min_password_length", d.min_password_length),
                                 "web.min_password_length", 8, 72),
        max_login_failures=_int(s.get("max_login_failures", d.max_login_failures),
                                "web.max_login_failures", 1, 1000),
        lockout_time=parse_duration(s.get("lockout_time", d.lockout_time),
                                    name="web.lockout_time"),
        secure_cookies=_bool(s.get("secure_cookies", d.secure_cookies), "web.secure_cookies"),
        trusted_proxies=_networks(s, "trusted_proxies", "web.trusted_proxies"),
        public_metrics=_bool(s.get("public_metrics", d.public_metrics), "web.public_metrics"),
    )


def _storage(doc: Mapping[str, Any]) -> StorageSettings:
    s = _section(doc, "storage")
    roots = s.get("destination_roots", [])
    if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
        raise SettingsError("storage.destination_roots must be a list of folder paths")
    folders = tuple(Path(r).expanduser() for r in roots)
    for folder in folders:
        if not folder.is_absolute() or ".." in folder.parts or folder == Path(folder.anchor):
            raise SettingsError(f"storage.destination_roots: {str(folder)!r} must be an "
                                "absolute folder path, not the root, without '..'")
    return StorageSettings(retention_days=_int(s.get("retention_days", 0),
                                               "storage.retention_days", 0, 36500),
                           destination_roots=folders)


def _security(doc: Mapping[str, Any]) -> SecuritySettings:
    s = _section(doc, "security")
    return SecuritySettings(allow_loopback_destinations=_bool(
        s.get("allow_loopback_destinations", False), "security.allow_loopback_destinations"))


def _networks(section: Mapping[str, Any], key: str, name: str) -> tuple[str, ...]:
    networks = section.get(key, [])
    if not isinstance(networks, list) or not all(isinstance(n, str) for n in networks):
        raise SettingsError(f"{name} must be a list of CIDR networks")
    for network in networks:
        try:
            ip_network(network, strict=False)
        except ValueError:
            raise SettingsError(f"{name}: {network!r} is not a network") from None
    return tuple(networks)


def _ai(doc: Mapping[str, Any]) -> AISettings:
    s = _section(doc, "ai")
    networks = _networks(s, "allowed_networks", "ai.allowed_networks")
    url = str(s.get("public_url", "")).rstrip("/")
    if url and not url.startswith(("http://", "https://")):
        raise SettingsError("ai.public_url must start with http:// or https://")
    return AISettings(public_url=url, allowed_networks=networks,
                      max_callback_bytes=_int(s.get("max_callback_bytes",
                                                    AISettings.max_callback_bytes),
                                              "ai.max_callback_bytes", 1024, 2**40))


def _tables(doc: Mapping[str, Any], name: str) -> tuple[Mapping[str, Any], ...]:
    items = doc.get(name, [])
    if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
        raise SettingsError(f"[[{name}]] must be an array of tables")
    return tuple(items)


# [dicom] keys that DICOM_ROUTER_DICOM_<KEY> variables may set (scalars only).
_DICOM_ENV_KEYS = ("artim_timeout", "max_pending_connections", "max_connections_per_ip",
                   "max_associations_per_ip", "require_called_aet", "plain_listener",
                   "tls_port", "tls_certificate", "tls_private_key", "tls_ca_certificates",
                   "tls_verify_clients", "tls_profile", "tls_handshake_timeout")


def load_settings(
    environ: Mapping[str, str],
    config_path: Path | None = None,
    data_dir: Path | None = None,
) -> Settings:
    """Build the settings: defaults, then the TOML file, then the environment, then flags."""
    doc: Mapping[str, Any] = read_toml(config_path) if config_path else {}
    processes = environ.get(ENV_PREFIX + "RECEIVER_PROCESSES")
    if processes:
        doc = {**doc, "dicom": {**_section(doc, "dicom"), "processes": processes}}
    dicom_env = {key: value for key in _DICOM_ENV_KEYS
                 if (value := environ.get(f"{ENV_PREFIX}DICOM_{key.upper()}"))}
    if dicom_env:  # e.g. DICOM_ROUTER_DICOM_TLS_PORT
        doc = {**doc, "dicom": {**_section(doc, "dicom"), **dicom_env}}
    server = dict(_section(doc, "server"))
    for key in ("ae_title", "dicom_port", "http_port", "data_dir", "database_url", "secret_key",
                "admin_password", "log_format", "log_level", "dicom_host", "http_host",
                "encrypt_events"):
        env_value = environ.get(ENV_PREFIX + key.upper())
        if env_value is not None and env_value != "":
            server[key] = env_value
    if data_dir is not None:
        server["data_dir"] = str(data_dir)
    base = Settings()
    directory = Path(str(server.get("data_dir", base.data_dir))).expanduser()
    log_format = str(server.get("log_format", "text"))
    if log_format not in {"text", "json"}:
        raise SettingsError("log_format must be 'text' or 'json'")
    settings = replace(
        base,
        ae_title=_ae_title(server.get("ae_title", base.ae_title), "ae_title"),
        dicom_host=str(server.get("dicom_host", base.dicom_host)),
        dicom_port=_int(server.get("dicom_port", base.dicom_port), "dicom_port", 0, 65535),
        http_host=str(server.get("http_host", base.http_host)),
        http_port=_int(server.get("http_port", base.http_port), "http_port", 0, 65535),
        data_dir=directory,
        database_url=str(server.get("database_url") or ""),
        secret_key=server.get("secret_key"),
        admin_password=server.get("admin_password"),
        log_format=log_format,
        log_level=str(server.get("log_level", "INFO")).upper(),
        encrypt_events=_bool(server.get("encrypt_events", True), "encrypt_events"),
        dicom=_dicom(doc),
        dispatch=_dispatch(doc),
        ingest=_ingest(doc),
        web=_web(doc),
        storage=_storage(doc),
        ai=_ai(doc),
        security=_security(doc),
        destinations=_tables(doc, "destinations"),
        rules=_tables(doc, "rules"),
        remote_nodes=_tables(doc, "remote_nodes"),
    )
    if not settings.database_url:
        settings = replace(settings, database_url=f"sqlite:///{directory / 'db'}")
    elif not (settings.database_url.startswith("sqlite:///") or settings.is_postgres):
        raise SettingsError("database_url must start with sqlite:/// or postgresql://")
    return settings
