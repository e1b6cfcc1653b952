"""Destination kind ``dicom``: C-STORE to a remote AE over one reused association.

The adapter keeps an association open while instances keep coming (released after
``idle_close`` idle seconds), widens its presentation contexts as new SOP classes and transfer
syntaxes appear, streams files as stored and decompresses only when the peer insists.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT
from pynetdicom.presentation import PresentationContext

from router.dicom.tuning import wake_reactor
from router.dispatch.base import (
    DeliveryError,
    Outgoing,
    PermanentDeliveryError,
    TransientDeliveryError,
)
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


@dataclass(frozen=True, kw_only=True)
class DicomDestinationConfig:
    """A remote DICOM AE (PACS, viewer, another router) reached by C-STORE."""

    name: str
    host: str
    port: int
    ae_title: str
    calling_ae: str | None = None
    timeout: float = 30.0  # connection, ACSE and DIMSE timeouts, seconds
    idle_close: float = 5.0  # seconds an idle association stays open
    max_pdu: int = 0  # what we advertise for receiving; 0 = unlimited
    concurrency: int = 2
    enabled: bool = True
    description: str = ""

    def problems(self) -> dict[str, str]:
        """Field -> message for values that are well-typed but unusable."""
        problems: dict[str, str] = {}
        if not _HOST.match(self.host):
            problems["host"] = "must be a host name or an IP address"
        if not 1 <= self.port <= 65535:
            problems["port"] = "must be between 1 and 65535"
        for key in ("ae_title", "calling_ae"):
            value = getattr(self, key)
            if value is not None and not is_valid_ae_title(value):
                problems[key] = "must be 1-16 printable ASCII characters, no backslash"
        if not 0 < self.timeout <= 3600:
            problems["timeout"] = "must be more than 0 and at most 3600 seconds"
        if not 0 <= self.idle_close <= 3600:
            problems["idle_close"] = "must be between 0 and 3600 seconds"
        if self.max_pdu != 0 and not 4096 <= self.max_pdu <= 2**32 - 1:
            problems["max_pdu"] = "must be 0 (unlimited) or at least 4096 bytes"
        return problems


def is_valid_ae_title(value: str) -> bool:
    """1-16 printable ASCII characters without backslash, not only spaces."""
    return bool(_AE_TITLE.match(value)) and bool(value.strip())


class _Negotiation:
    """What happened while one association was being requested (filled by event handlers)."""

    def __init__(self, timeout: float) -> None:
        self.connected = False
        self.answer: object = None  # the first A-ASSOCIATE / A-ABORT primitive received
        self.timeout = timeout
        self.handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_connect),
            (evt.EVT_ACSE_RECV, self._on_acse),
        ]

    def _on_connect(self, event: evt.Event) -> None:
        # pynetdicom never disables Nagle: without this, each small PDU waits up to 40 ms.
        self.connected = True
        wrapper = event.assoc.dul.socket
        sock = wrapper.socket if wrapper is not None else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.timeout)  # a peer that stops reading cannot block us forever

    def _on_acse(self, event: evt.Event) -> None:
        if self.answer is None:
            self.answer = event.primitive  # type: ignore[attr-defined]

    def failure(self, assoc: Association, where: str, proposed: str) -> DeliveryError:
        """The error for an association that was not established."""
        # pynetdicom gives up without reading the answer if the peer closed the connection
        # right after sending it (as a rejecting storescp does): look in the DUL's queue.
        answer = self.answer or assoc.dul.peek_next_pdu()
        if not self.connected:
            return TransientDeliveryError(f"cannot connect to {where} (refused or timed out)")
        if isinstance(answer, A_ASSOCIATE) and answer.result in (0x01, 0x02):
            kind = "permanently" if answer.result == 0x01 else "transiently"
            message = f"{where} {kind} rejected the association: {answer.reason_str}"
            if answer.result == 0x01:
                return PermanentDeliveryError(message)
            return TransientDeliveryError(message)
        if isinstance(answer, A_ASSOCIATE):
            return PermanentDeliveryError(f"{where} accepted none of the proposed {proposed}")
        if isinstance(answer, A_ABORT | A_P_ABORT):
            return TransientDeliveryError(f"{where} aborted the association request")
        return TransientDeliveryError(
            f"no answer from {where} to the association request (connection closed, "
            f"or nothing within {self.timeout:g} s)"
        )


class DicomAdapter:
    """C-STORE SCU for one destination; one worker thread uses an instance at a time."""

    def __init__(self, config: DicomDestinationConfig, *, calling_ae: str) -> None:
        self._config = config
        self._calling_ae = config.calling_ae or calling_ae
        self._where = f"{config.ae_title}@{config.host}:{config.port}"
        self._ae = self._new_ae()
        self._lock = threading.Lock()
        self._assoc: Association | None = None
        self._requested: frozenset[tuple[str, str]] = frozenset()
        # SOP class -> stored syntaxes to propose besides the fallbacks, least recent first
        self._wanted: dict[str, list[str]] = {str(sop): [] for sop in COMMON_SOP_CLASSES}
        self._message_id = 0
        self._last_used = 0.0
        self._timer: threading.Timer | None = None
        self.associations_opened = 0
        # Stream files from disk instead of decoding them (needs an exact context; we
        # decode ourselves when conversion is needed). A process-wide pynetdicom switch.
        _config.STORE_SEND_CHUNKED_DATASET = True

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
        ae = self._new_ae()
        assoc = self._associate(ae, [build_context(VERIFICATION)], "Verification context")
        try:
            status = assoc.send_c_echo()
        finally:
            _finish(assoc)
        code = status.get("Status") if status else None
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

    def _new_ae(self) -> AE:
        ae = AE(ae_title=self._calling_ae)
        timeout = self._config.timeout
        ae.connection_timeout = timeout
        ae.acse_timeout = timeout
        ae.dimse_timeout = timeout
        # pynetdicom aborts an association with no incoming data for this long; our own
        # idle timer releases it gracefully first.
        ae.network_timeout = max(timeout, self._config.idle_close + timeout)
        return ae

    def _associate(self, ae: AE, contexts: list[PresentationContext], proposed: str) -> Association:
        negotiation = _Negotiation(timeout=self._config.timeout)
        try:
            assoc = ae.associate(
                self._config.host,
                self._config.port,
                contexts=contexts,
                ae_title=self._config.ae_title,
                max_pdu=self._config.max_pdu,
                evt_handlers=negotiation.handlers,
            )
        except OSError as exc:  # host name resolution
            raise TransientDeliveryError(
                f"cannot resolve or reach {self._where}: {type(exc).__name__}"
            ) from None
        if not assoc.is_established:
            raise negotiation.failure(assoc, self._where, proposed)
        return assoc

    def _want(self, item: Outgoing) -> None:
        syntaxes = self._wanted.pop(item.sop_class_uid, [])
        # Deflated files are sent inflated: their odd-length streams trip up some peers.
        stored = _proposed_syntax(item.transfer_syntax_uid)
        if stored not in syntaxes and stored not in FALLBACK_SYNTAXES:
            syntaxes.append(stored)
        self._wanted[item.sop_class_uid] = syntaxes  # most recently used last

    def _contexts(self) -> tuple[list[PresentationContext], frozenset[tuple[str, str]]]:
        """One context per (SOP class, syntax), newest SOP classes first, at most 128."""
        pairs: list[tuple[str, str]] = []
        for sop_class in reversed(self._wanted):
            extra = [ts for ts in FALLBACK_SYNTAXES if ts not in self._wanted[sop_class]]
            wanted = [(sop_class, ts) for ts in [*self._wanted[sop_class], *extra]]
            if len(pairs) + len(wanted) > MAX_CONTEXTS:
                break
            pairs.extend(wanted)
        contexts = [build_context(sop_class, [ts]) for sop_class, ts in pairs]
        return contexts, frozenset(pairs)

    def _association_for(self, item: Outgoing) -> Association:
        needed = (item.sop_class_uid, _proposed_syntax(item.transfer_syntax_uid))
        assoc = self._assoc
        if assoc is not None and assoc.is_established and needed in self._requested:
            return assoc
        self._drop_association()
        contexts, requested = self._contexts()
        proposed = f"presentation contexts for {_uid_name(item.sop_class_uid)}"
        self._assoc = self._associate(self._ae, contexts, proposed)
        self._requested = requested
        self.associations_opened += 1
        logger.debug("association %d to %s", self.associations_opened, self._where)
        return self._assoc

    def _drop_association(self) -> None:
        assoc, self._assoc = self._assoc, None
        self._requested = frozenset()
        if assoc is not None:
            _finish(assoc)

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
        assoc = self._association_for(item)
        payload, note = self._payload(assoc, item)
        try:
            self._message_id = self._message_id % 65535 + 1
            _park_reactor(assoc)
            status = assoc.send_c_store(payload, msg_id=self._message_id)
        except OSError as exc:
            raise blob_error(exc) from None
        except (ValueError, AttributeError) as exc:
            logger.warning("C-STORE to %s not sent: %s", self._where, type(exc).__name__)
            raise PermanentDeliveryError(
                f"cannot send {_uid_name(item.sop_class_uid)} stored as "
                f"{_uid_name(item.transfer_syntax_uid)} to {self._where} (encoding failed)"
            ) from None
        except RuntimeError:  # the association ended between our check and the send
            self._drop_association()
            raise TransientDeliveryError(f"association with {self._where} was lost") from None
        code = status.get("Status") if status else None
        if code is None:
            self._drop_association()
            raise TransientDeliveryError(
                f"association with {self._where} ended before a C-STORE response "
                f"(aborted, closed or no answer within {self._config.timeout:g} s)"
            )
        return _interpret_status(int(code)) + note

    def _payload(self, assoc: Association, item: Outgoing) -> tuple[Any, str]:
        """The file path (streamed as stored) or a decoded dataset pynetdicom can convert."""
        stored = UID(item.transfer_syntax_uid)
        accepted = {
            UID(cx.transfer_syntax[0])
            for cx in assoc.accepted_contexts
            if cx.abstract_syntax == item.sop_class_uid and cx.as_scu
        }
        sop_name = _uid_name(item.sop_class_uid)
        if not accepted:
            raise PermanentDeliveryError(f"{self._where} does not accept {sop_name}")
        if stored in accepted and not stored.is_deflated:
            if _meta_matches(item):
                return item.path, ""
            # Streaming takes the UIDs of the command from the file meta: decode instead.
            return read_dataset(item), " (file meta UIDs differ from the data set)"
        if not any(not ts.is_compressed for ts in accepted):
            names = ", ".join(sorted(ts.name for ts in accepted))
            raise PermanentDeliveryError(
                f"{self._where} accepts {sop_name} only as {names}; cannot convert "
                f"from {stored.name}"
            )
        return decoded_for_peer(item, sop_name, self._where)


def _proposed_syntax(transfer_syntax: str) -> str:
    return ExplicitVRLittleEndian if UID(transfer_syntax).is_deflated else transfer_syntax


def _meta_matches(item: Outgoing) -> bool:
    """Whether the file meta names the same SOP class and instance as the data set."""
    meta = read_file_meta_info(item.path)  # group 0002 only: the header is never needed here
    return (
        meta.get("MediaStorageSOPClassUID") == item.sop_class_uid
        and meta.get("MediaStorageSOPInstanceUID") == item.sop_instance_uid
    )


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


def _park_reactor(assoc: Association, limit: float = 0.5) -> None:
    """Make sure the association's reactor is parked before the next request (pynetdicom 3.0.4).

    send_c_store() clears the reactor checkpoint and trusts ``_is_paused``, which is still
    True from the previous request while the reactor wakes up from that request's release:
    the woken reactor can then take the next C-STORE response ("Received unexpected C-STORE
    service message") and the send waits for the DIMSE timeout. Measured: about 1 in 1,600
    back-to-back sends. Clearing the flag first means only a fresh pause counts.
    """
    assoc._reactor_checkpoint.clear()
    assoc._is_paused = False
    wake_reactor(assoc)
    deadline = time.monotonic() + limit
    while not assoc._is_paused and time.monotonic() < deadline:
        time.sleep(0.0001)
    # Not seen: the reactor paused before our write, or it has stopped; it is parked either
    # way and send_c_store() must not spin on the flag.
    assoc._is_paused = True


def _finish(assoc: Association) -> None:
    """Release an established association; abort if the release is not answered."""
    if assoc.is_established:
        assoc.release()
    if assoc.is_established:
        assoc.abort()


def _uid_name(uid: str) -> str:
    name = UID(uid).name
    return name if name else uid
