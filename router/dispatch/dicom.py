"""Destination kind ``dicom``: C-STORE to a remote AE over one reused association.

The adapter keeps an association open while instances keep coming (released after
``idle_close`` idle seconds), widens its presentation contexts as new SOP classes and transfer
syntaxes appear, streams files as stored and decompresses only when the peer insists. The
association itself is router.dicom.store_scu's (not pynetdicom's: about half the CPU), opened
to an address the address policy checked (router.dispatch.ssrf), never to the name itself.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import ssl
import threading
import time
from typing import Annotated

import annotated_types as at
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import A_ASSOCIATE

from router.config_types import (
    STRICT,
    AETitle,
    After,
    Concurrency,
    Description,
    DestinationName,
    Doc,
    Duration,
    PeerPort,
    StrictBool,
    StrictInt,
    TransformNames,
)
from router.dicom.store_scu import FileDataset, LinkError, Rejected, StoreLink, dataset_offset
from router.dicom.tls import TlsClientSettings, TlsConfigError
from router.dispatch.base import (
    DeliveryError,
    Outgoing,
    PermanentDeliveryError,
    RefusedAddressError,
    SeatUnavailable,
    TransientDeliveryError,
    UnreachableError,
)
from router.dispatch.seats import EXTRA_OPEN_TIMEOUT, seats_for
from router.dispatch.ssrf import AddressPolicy, AddressRefusedError
from router.dispatch.transcode import blob_error, decoded_for_peer, read_dataset

logger = logging.getLogger(__name__)

VERIFICATION = UID("1.2.840.10008.1.1")
MAX_CONTEXTS = 128  # the protocol's limit (odd context IDs 1..255)
FALLBACK_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# Proposed (uncompressed) from the first association on, so that a mixed study does not cost
# one re-association per SOP class: CT, MR, CR, DX, MG, US, US multi-frame, SC, NM, PET, XA,
# enhanced CT and MR, RT image/dose/structure set/plan, basic/enhanced/comprehensive SR,
# dose SR, key object selection, grayscale presentation state, encapsulated PDF.
_COMMON_SUFFIXES = (
    "2 4 1 1.1 1.2 6.1 3.1 7 20 128 12.1 2.1 4.1 481.1 481.2 481.3 481.5 "
    "88.11 88.22 88.33 88.67 88.59 11.1 104.1"
)
COMMON_SOP_CLASSES = tuple(f"1.2.840.10008.5.1.4.1.1.{s}" for s in _COMMON_SUFFIXES.split())
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash
_HOST = re.compile(r"^[A-Za-z0-9._:-]{1,253}$")
_WARNINGS = frozenset({0x0001, 0x0107, 0x0116})
_TRANSIENT_STATUSES = frozenset({0x0210, 0x0213})
_STATUS_MEANINGS = {
    0x0117: "invalid SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorised",
    0x0211: "unrecognised operation",
    0x0212: "mistyped argument",
    0xFE00: "cancelled",
}


def _host(host: str) -> str:
    if not _HOST.match(host):
        raise ValueError("must be a host name or an IP address")
    return host


@dataclasses.dataclass(frozen=True, kw_only=True)
class DicomDestinationConfig:
    """A remote DICOM AE (PACS, viewer, another router) reached by C-STORE."""

    __pydantic_config__ = STRICT

    name: DestinationName
    host: Annotated[str, After(_host), Doc("host name or IP address of the peer")]
    port: Annotated[PeerPort, Doc("the peer's DICOM port")]
    ae_title: Annotated[AETitle, Doc("the peer's AE title")]
    calling_ae: Annotated[AETitle | None, Doc(
        "ours as the peer knows us; empty: the router's own")] = None
    # Connection, ACSE and DIMSE timeouts.
    timeout: Annotated[Duration, at.Gt(0), at.Le(3600), Doc(
        "connect, association and response timeout: seconds or e.g. 30s")] = 30.0
    # An idle association stays open this long.
    idle_close: Annotated[Duration, at.Interval(ge=0, le=3600), Doc(
        "an idle association stays open this long: seconds or e.g. 5s")] = 5.0
    # What we advertise for receiving.
    max_pdu: Annotated[StrictInt, Doc("bytes; 0 = unlimited")] = 0
    concurrency: Concurrency = 2
    enabled: StrictBool = True
    description: Description = ""
    # DICOM TLS (PS3.15 B.9): the peer's certificate must chain to tls_ca_certificates (else
    # to the system's CAs) and carry the host's name (or tls_server_name).
    tls: Annotated[StrictBool, Doc(
        "open the association over TLS (the peer's TLS port)")] = False
    tls_ca_certificates: Annotated[str, Doc(
        "PEM bundle the peer's certificate chains to; empty: this machine's CAs")] = ""
    tls_certificate: Annotated[str, Doc("our certificate, a PEM file, for peers that "
                                        "require one")] = ""
    tls_private_key: Annotated[str, Doc("its private key, a PEM file (not encrypted)")] = ""
    tls_profile: Annotated[str, Doc("bcp195, non-downgrading or tls13")] = "bcp195"
    tls_server_name: Annotated[str, Doc(
        "the name in the peer's certificate; empty: the host")] = ""
    transforms: TransformNames = ()  # router.transforms, applied to each copy sent

    def problems(self) -> dict[str, str]:
        """Field -> message for values that are well-typed but unusable."""
        tls = TlsClientSettings.of(self)
        problems: dict[str, str] = tls.problems() if tls is not None else {}
        if self.max_pdu != 0 and not 4096 <= self.max_pdu <= 2**32 - 1:
            problems["max_pdu"] = "must be 0 (unlimited) or at least 4096 bytes"
        return problems


def is_valid_ae_title(value: str) -> bool:
    """1-16 printable ASCII characters without backslash, not only spaces."""
    return bool(_AE_TITLE.match(value)) and bool(value.strip())


def _reason(rejected: Rejected) -> str:
    """The standard's words for an A-ASSOCIATE-RJ's result, source and reason."""
    primitive = A_ASSOCIATE()
    try:
        primitive.result = rejected.result
        primitive.result_source = rejected.source
        primitive.diagnostic = rejected.reason
        return str(primitive.reason_str)
    except (ValueError, KeyError, TypeError):
        return f"result {rejected.result}, source {rejected.source}, reason {rejected.reason}"


def _open_failure(error: LinkError, where: str, timeout: float) -> DeliveryError:
    """The delivery error for an association that could not be opened."""
    if isinstance(error, Rejected) and error.result in (0x01, 0x02):
        kind = "permanently" if error.result == 0x01 else "transiently"
        message = f"{where} {kind} rejected the association: {_reason(error)}"
        if error.result == 0x01:
            return PermanentDeliveryError(message)
        return TransientDeliveryError(message)
    # Everything short of a DICOM answer is "unreachable": the test button then cannot tell a
    # closed port from an open one that speaks something else (no port scanner).
    if error.kind == "resolve":
        return UnreachableError(f"cannot resolve or reach {where}: {error.detail}")
    if error.kind == "connect":
        return UnreachableError(f"cannot connect to {where} (refused or timed out)")
    if error.kind == "aborted":
        return TransientDeliveryError(f"{where} aborted the association request")
    if error.kind == "tls":
        return TransientDeliveryError(f"TLS with {where} failed: {error.detail}")
    if error.kind == "protocol":
        return UnreachableError(
            f"{where} answered the association request in a way we cannot use: {error.detail}")
    return UnreachableError(
        f"no answer from {where} to the association request (connection closed, "
        f"or nothing within {timeout:g} s)"
    )


class DicomAdapter:
    """C-STORE SCU for one destination; one worker thread uses an instance at a time."""

    def __init__(self, config: DicomDestinationConfig, *, calling_ae: str,
                 policy: AddressPolicy) -> None:
        self._config = config
        self._policy = policy
        self._calling_ae = config.calling_ae or calling_ae
        self._where = f"{config.ae_title}@{config.host}:{config.port}"
        self._lock = threading.Lock()
        self._assoc: StoreLink | None = None
        self._requested: frozenset[tuple[str, str]] = frozenset()
        # SOP class -> stored syntaxes to propose besides the fallbacks, least recent first
        self._wanted: dict[str, list[str]] = {str(sop): [] for sop in COMMON_SOP_CLASSES}
        self._message_id = 0
        self._last_used = 0.0
        self._timer: threading.Timer | None = None
        self.associations_opened = 0
        self._seats = seats_for(config.host, config.port, config.ae_title, self._calling_ae)
        self._seated = False  # self._assoc counts in self._seats
        self._tls = TlsClientSettings.of(config)
        self._tls_context: ssl.SSLContext | None = None  # made on first use

    def ready(self) -> bool:
        """False while the peer takes no more of our associations and we hold none: the
        lane's worker then leaves the queue to the workers that hold one."""
        return self._assoc is not None or self._seats.available()

    def send(self, item: Outgoing) -> str:
        """C-STORE ``item``; warnings count as success, the detail names the status."""
        with self._lock:
            try:
                return self._send_locked(item)
            finally:
                self._touch()

    def check(self) -> str:
        """C-ECHO on a fresh association of its own."""
        started = time.monotonic()
        others = self._seats.taken()
        try:
            link = self._associate([(VERIFICATION, ImplicitVRLittleEndian)],
                                   "Verification context", others)
        except SeatUnavailable:
            return (f"C-ECHO not made: {self._where} is serving {others} association(s) of "
                    "ours and takes no more at the moment")
        try:
            code: int | None = link.echo(message_id=1)
        except LinkError:
            code = None
        finally:
            link.release()
        if code != 0x0000:
            shown = "no response" if code is None else f"status 0x{code:04X}"
            raise TransientDeliveryError(f"C-ECHO to {self._where} failed: {shown}")
        return f"C-ECHO ok in {1000 * (time.monotonic() - started):.0f} ms"

    def close(self) -> None:
        """Release the association (if any) and stop the idle timer."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._drop_association()

    # -- association management ------------------------------------------------------------

    def _associate(self, pairs: list[tuple[str, str]], proposed: str,
                   others: int = 0) -> StoreLink:
        """A new association while ``others`` of ours to this peer are open. An extra one
        the peer does not take within a short time is SeatUnavailable, not a failure: the
        peer is evidently up and serving the others (see router.dispatch.seats)."""
        config = self._config
        timeout = min(config.timeout, EXTRA_OPEN_TIMEOUT) if others else config.timeout
        addresses = self._checked_addresses()
        tls = self._tls_context_or_error()
        for number, address in enumerate(addresses, 1):
            try:
                link = StoreLink.open(address, config.port, calling=self._calling_ae,
                                      called=config.ae_title, pairs=pairs,
                                      max_pdu=config.max_pdu, timeout=timeout, tls=tls,
                                      server_name=self._tls.server_name or config.host
                                      if self._tls is not None else "")
                break
            except LinkError as exc:
                if exc.kind == "connect" and number < len(addresses):
                    continue  # the name's next address
                if others and self._seats.taken():
                    self._seats.learn(others)
                    raise SeatUnavailable(f"{self._where} takes no more associations") from None
                raise _open_failure(exc, self._where, timeout) from None
        if not link.accepted_pairs():
            link.release()
            raise PermanentDeliveryError(f"{self._where} accepted none of the proposed {proposed}")
        return link

    def _tls_context_or_error(self) -> ssl.SSLContext | None:
        if self._tls is None:
            return None
        if self._tls_context is None:
            try:
                self._tls_context = self._tls.context()
            except TlsConfigError as exc:  # files changed since the destination was saved
                raise TransientDeliveryError(f"TLS settings of {self._where}: {exc}") from None
        return self._tls_context

    def _checked_addresses(self) -> list[str]:
        """The peer's addresses, resolved now and each allowed by the address policy."""
        try:
            return self._policy.addresses(self._config.host, self._config.port)
        except AddressRefusedError as exc:
            raise RefusedAddressError(f"{self._where}: {exc}") from None
        except OSError as exc:
            raise UnreachableError(f"cannot resolve or reach {self._where}: {exc}") from None

    def _want(self, item: Outgoing) -> None:
        syntaxes = self._wanted.pop(item.sop_class_uid, [])
        # Deflated files are sent inflated: their odd-length streams trip up some peers.
        stored = _proposed_syntax(item.transfer_syntax_uid)
        if stored not in syntaxes and stored not in FALLBACK_SYNTAXES:
            syntaxes.append(stored)
        self._wanted[item.sop_class_uid] = syntaxes  # most recently used last

    def _contexts(self) -> tuple[list[tuple[str, str]], frozenset[tuple[str, str]]]:
        """One context per (SOP class, syntax), newest SOP classes first, at most 128."""
        pairs: list[tuple[str, str]] = []
        for sop_class in reversed(self._wanted):
            extra = [ts for ts in FALLBACK_SYNTAXES if ts not in self._wanted[sop_class]]
            wanted = [(sop_class, ts) for ts in [*self._wanted[sop_class], *extra]]
            if len(pairs) + len(wanted) > MAX_CONTEXTS:
                break
            pairs.extend(wanted)
        return pairs, frozenset(pairs)

    def _association_for(self, item: Outgoing) -> StoreLink:
        needed = (item.sop_class_uid, _proposed_syntax(item.transfer_syntax_uid))
        link = self._assoc
        if link is not None and link.is_established and needed in self._requested:
            return link
        self._drop_association()
        pairs, requested = self._contexts()
        proposed = f"presentation contexts for {_uid_name(item.sop_class_uid)}"
        with self._seats.opening:
            if not self._seats.available():
                raise SeatUnavailable(f"{self._where} takes no more associations")
            self._assoc = self._associate(pairs, proposed, self._seats.taken())
            self._seats.opened()
        self._seated = True
        self._requested = requested
        self.associations_opened += 1
        logger.debug("association %d to %s", self.associations_opened, self._where)
        return self._assoc

    def _drop_association(self) -> None:
        link, self._assoc = self._assoc, None
        self._requested = frozenset()
        if self._seated:
            self._seated = False
            self._seats.closed()
        if link is not None:
            link.release()

    def _touch(self) -> None:
        """Note the use; make sure a timer will release the association once idle."""
        self._last_used = time.monotonic()
        if self._assoc is None:
            return
        if self._config.idle_close == 0:
            self._drop_association()
        elif self._timer is None:
            self._start_timer(self._config.idle_close)

    def _start_timer(self, delay: float) -> None:
        timer = threading.Timer(delay, self._on_idle)
        timer.daemon = True
        self._timer = timer
        timer.start()

    def _on_idle(self) -> None:
        with self._lock:
            if self._timer is not threading.current_thread():
                return  # cancelled by close() or replaced
            self._timer = None
            remaining = self._last_used + self._config.idle_close - time.monotonic()
            if self._assoc is not None and remaining > 0:
                self._start_timer(remaining)
            else:
                self._drop_association()

    # -- sending ------------------------------------------------------------------------------

    def _send_locked(self, item: Outgoing) -> str:
        self._want(item)
        link = self._association_for(item)
        payload, syntax, note = self._payload(link, item)
        self._message_id = self._message_id % 65535 + 1
        try:
            code = link.store(item.sop_class_uid, item.sop_instance_uid, syntax, payload,
                              self._message_id)
        except OSError as exc:
            self._drop_association()
            raise blob_error(exc) from None
        except LinkError:
            self._drop_association()
            raise TransientDeliveryError(
                f"association with {self._where} ended before a C-STORE response "
                f"(aborted, closed or no answer within {self._config.timeout:g} s)"
            ) from None
        return _interpret_status(code) + note

    def _payload(self, link: StoreLink, item: Outgoing) -> tuple[FileDataset | bytes, str, str]:
        """What to send (the stored file's data set as is, or a re-encoded one), in which
        accepted transfer syntax, and a note for the delivery detail."""
        stored = UID(item.transfer_syntax_uid)
        accepted = {UID(ts) for ts in link.accepted_syntaxes(item.sop_class_uid)}
        sop_name = _uid_name(item.sop_class_uid)
        if not accepted:
            raise PermanentDeliveryError(f"{self._where} does not accept {sop_name}")
        if stored in accepted and not stored.is_deflated:
            offset = _dataset_offset(item)
            if offset is not None:
                return FileDataset(item.path, offset), stored, ""
            dataset, note = read_dataset(item), " (file meta re-read by pydicom)"
            return _encoded(dataset, stored, sop_name, self._where), stored, note
        if not any(not ts.is_compressed for ts in accepted):
            names = ", ".join(sorted(ts.name for ts in accepted))
            raise PermanentDeliveryError(
                f"{self._where} accepts {sop_name} only as {names}; cannot convert "
                f"from {stored.name}"
            )
        dataset, note = decoded_for_peer(item, sop_name, self._where)
        syntax = next(ts for ts in _UNCOMPRESSED_PREFERENCE if ts in accepted)
        return _encoded(dataset, syntax, sop_name, self._where), syntax, note


# Decoded data sets are sent in the first of these the peer accepted.
_UNCOMPRESSED_PREFERENCE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)


def _dataset_offset(item: Outgoing) -> int | None:
    """Where the stored file's data set starts, however large its file meta (a STOW-RS or AI
    object may carry a large one)."""
    try:
        with open(item.path, "rb") as stored:
            return dataset_offset(stored)
    except OSError as exc:
        raise blob_error(exc) from None


def _encoded(dataset: Dataset, syntax: UID, sop_name: str, where: str) -> bytes:
    """The data set encoded in ``syntax`` (pixel data as they are: decoded when needed)."""
    try:
        raw = encode(dataset, syntax.is_implicit_VR, syntax.is_little_endian,
                     syntax.is_deflated)
    except Exception as exc:  # pydicom raises many types for values it cannot write
        logger.warning("C-STORE to %s not sent: %s", where, type(exc).__name__)
        raw = None
    if raw is None:
        raise PermanentDeliveryError(
            f"cannot send {sop_name} to {where} as {syntax.name} (encoding failed)")
    return bytes(raw)


def _proposed_syntax(transfer_syntax: str) -> str:
    return ExplicitVRLittleEndian if UID(transfer_syntax).is_deflated else transfer_syntax


def _interpret_status(code: int) -> str:
    """Success detail, or the error a C-STORE status calls for (hex status, no comment)."""
    if code == 0x0000:
        return "stored"
    if code in _WARNINGS or 0xB000 <= code <= 0xBFFF:
        return f"warning 0x{code:04X}"
    if 0xA700 <= code <= 0xA7FF or code in _TRANSIENT_STATUSES:
        raise TransientDeliveryError(f"peer is out of resources (status 0x{code:04X})")
    if 0xA900 <= code <= 0xA9FF:
        meaning = "data set does not match SOP class"
    elif 0xC000 <= code <= 0xCFFF:
        meaning = "cannot understand"
    else:
        meaning = _STATUS_MEANINGS.get(code, "failure")
    raise PermanentDeliveryError(f"peer refused the instance: status 0x{code:04X} ({meaning})")


def _uid_name(uid: str) -> str:
    name = UID(uid).name
    return name if name else uid
