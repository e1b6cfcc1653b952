"""Taking in one received object: parse, stage the blob, dedupe, route, ONE save, commit blob.

This is the only write in the C-STORE path. It answers a DIMSE status; 0x0000 only after the
receipt and the routing decision are durably saved together.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError

from router.application.admin_state import AdminState
from router.application.sqlite_writes import LogNotDurable
from router.application.stores import EventStores
from router.application.unit_plan import plan_units
from router.dicom.header import HeaderError
from router.dicom.header_scan import Readable, ScannedHeader, scan_header
from router.dicom.limits import DatasetLimits
from router.dicom.uids import REPAIRABLE, file_digest, repaired_uid, rewrite_uids, uid_problem
from router.domain.ingest import Instance, Job, ReceiptFailure, instance_id
from router.domain.rules import RoutingDecision, RoutingInput, evaluate
from router.settings import DispatchSettings, IngestSettings
from router.storage.blobs import BlobError, BlobStore

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_DATASET_MISMATCH = 0xA900
STATUS_DUPLICATE_REFUSED = 0xC001
STATUS_COERCED = 0xB000  # warning: stored, with data elements changed (PS3.4 B.2.3)
STORE_DOWN_BACKOFF = 5.0  # seconds  # "changed duplicate" refused by policy


class NotDurableError(OSError):
    """The spooled bytes could not be made durable (fsync failed: disk full, I/O error)."""


@dataclass(frozen=True)
class Arrival:
    """One object spooled to disk, with where it came from."""

    path: Path
    sha256: str
    size: int
    source: str  # "dimse" | "stow" | "retrieve"
    actor: str
    source_ip: str
    calling_aet: str
    called_aet: str
    sop_class_uid: str  # from the command (C-STORE) or the dataset
    sop_instance_uid: str
    transfer_syntax_uid: str
    correlation_id: str = ""
    # The presentation context's abstract syntax ("" where there is none: STOW-RS, AI results).
    abstract_syntax: str = ""
    # The subject of the sender's verified TLS client certificate ("" over plain TCP).
    tls_subject: str = ""
    # Blocks until the object's bytes are on disk (raises OSError if they cannot be).
    wait_durable: Callable[[], None] = lambda: None
    # Reads the spooled file without opening it again (the spool's own descriptor).
    reader: Callable[[], Readable] | None = None
    # Values rules may test besides the header, e.g. an AI processor's result tags
    # (``ai.<destination>.<key>``) for the objects it sent back.
    extra: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Receipt:
    """The answer: a DIMSE status, the job id when saved, a reason when not (no PHI)."""

    status: int
    job_id: str | None = None
    reason: str = ""
    duplicate: bool = False
    # Stored with repaired UIDs ([ingest] invalid_uids = "repair"): a C-STORE is answered
    # STATUS_COERCED, the warning PS3.4 gives for data elements the receiver changed.
    coerced: bool = False

    @property
    def dimse_status(self) -> int:
        return STATUS_COERCED if self.coerced and self.status == STATUS_SUCCESS else self.status


class Receiver:
    """Turns arrivals into Job events; thread-safe (one call per association thread)."""

    def __init__(
        self,
        stores: EventStores,
        blobs: BlobStore,
        admin_state: AdminState,
        ingest: IngestSettings,
        dispatch: DispatchSettings,
        on_saved: Callable[[], None] = lambda: None,
        node: str = "",
    ) -> None:
        self._app = stores.ingest
        self._node = node  # recorded in each receipt
        self._blobs = blobs
        self._admin = admin_state
        self._ingest = ingest
        self._limits = DatasetLimits.of(ingest)
        self._dispatch = dispatch
        self._on_saved = on_saved
        self._store_down_until = 0.0  # after a failed save, refuse at once for a few seconds

    @property
    def limits(self) -> DatasetLimits:
        """What a received dataset may hold (STOW-RS and AI callbacks check it early too)."""
        return self._limits

    def receive(self, arrival: Arrival) -> Receipt:
        correlation_id = arrival.correlation_id or str(uuid.uuid4())
        if arrival.sha256:
            self._blobs.prepare(arrival.sha256)  # its folder is made while we parse
        try:
            admitted = self._admit(arrival, correlation_id)
        except (RecursionError, MemoryError) as exc:
            # The walk bounds what pydicom reads; should anything still give out on this
            # object, it is the object that cannot be understood, not the router that is short
            # of resources (0xA700 would have the sender retry it forever).
            admitted = self._refused(arrival, correlation_id, STATUS_CANNOT_UNDERSTAND,
                                     f"dataset could not be parsed: {type(exc).__name__}")
        if isinstance(admitted, Receipt):
            return admitted
        arrival, header, repaired = admitted
        sop_uid = str(header.index["SOPInstanceUID"])
        if time.monotonic() < self._store_down_until:
            arrival.path.unlink(missing_ok=True)
            return self._refuse(arrival, correlation_id, STATUS_OUT_OF_RESOURCES,
                                "event store unavailable (recent failure)", record=False)
        try:
            staged = self._blobs.stage(arrival.path, arrival.sha256)
        except OSError as exc:
            arrival.path.unlink(missing_ok=True)
            return self._refuse(arrival, correlation_id, STATUS_OUT_OF_RESOURCES,
                                f"blob store: {exc.strerror or type(exc).__name__}")
        try:
            receipt = self._save_with_retry(arrival, header, sop_uid, correlation_id, repaired,
                                            staged)
        except LogNotDurable as exc:
            # Committed but not synced, or (PostgreSQL, connection lost) not known whether it
            # committed: the job may be in the log and be delivered, so keep the object its
            # events would refer to, and do not acknowledge it. A resend is then recorded as
            # a duplicate of this job, or as a new one if it had not committed.
            self._commit_blob(arrival.sha256, staged)
            self._on_saved()
            logger.error("receipt not known to be durable (%s); answered 0xA700", exc)
            self._store_down_until = time.monotonic() + STORE_DOWN_BACKOFF
            return Receipt(STATUS_OUT_OF_RESOURCES, reason="event log not known to be on disk")
        except NotDurableError as exc:
            self._blobs.discard(staged)
            return self._refuse(arrival, correlation_id, STATUS_OUT_OF_RESOURCES,
                                f"could not write the object to disk: {exc}")
        except BlobError as exc:  # a remote store did not take it: not acknowledged
            self._blobs.discard(staged)
            return self._refuse(arrival, correlation_id, STATUS_OUT_OF_RESOURCES, str(exc))
        except Exception as exc:
            self._blobs.discard(staged)
            logger.error("receipt not saved: %s", type(exc).__name__)
            # Recording the failure would wait on the same unavailable store: log it only, and
            # answer the next senders at once for a while instead of making each one wait.
            self._store_down_until = time.monotonic() + STORE_DOWN_BACKOFF
            return self._refuse(arrival, correlation_id, STATUS_OUT_OF_RESOURCES,
                                f"event store unavailable: {type(exc).__name__}", record=False)
        if receipt.status != STATUS_SUCCESS:
            self._blobs.discard(staged)
            return receipt
        self._commit_blob(arrival.sha256, staged)
        self._on_saved()
        return receipt

    def _admit(self, arrival: Arrival,
               corr: str) -> Receipt | tuple[Arrival, ScannedHeader, dict[str, str]]:
        """The checks before anything is kept: the dataset limits, identity, UIDs, command and
        presentation context; the arrival (repaired if so configured), its header and the
        original of each repaired UID, or the refusal."""
        try:
            header = scan_header(arrival.path, arrival.reader() if arrival.reader else None,
                                 self._limits)
        except HeaderError as exc:
            return self._refused(arrival, corr, STATUS_CANNOT_UNDERSTAND, str(exc))
        index = header.index
        if not index.get("SOPInstanceUID") or not index.get("SOPClassUID"):
            # pydicom reads almost any bytes as "a dataset"; one without its identity is not one.
            return self._refused(arrival, corr, STATUS_CANNOT_UNDERSTAND,
                                 "dataset has no SOP Class UID or SOP Instance UID")
        encoding = _identity_encoding(header)
        if encoding is not None:
            return self._refused(arrival, corr, STATUS_CANNOT_UNDERSTAND, encoding)
        invalid = _invalid_uids(arrival, header)
        repairable = self._ingest.invalid_uids == "repair" and all(
            keyword in REPAIRABLE for keyword, _ in invalid)
        if invalid and not repairable:
            keyword, problem = invalid[0]
            return self._refused(arrival, corr, STATUS_CANNOT_UNDERSTAND,
                                 f"{_UID_NAMES[keyword]} {problem} (PS3.5 9.1)")
        if arrival.sop_instance_uid and index["SOPInstanceUID"] != arrival.sop_instance_uid:
            return self._refused(arrival, corr, STATUS_DATASET_MISMATCH,
                                 "SOP Instance UID in the dataset differs from the command")
        if (arrival.abstract_syntax and index["SOPClassUID"] != arrival.abstract_syntax
                and self._ingest.sop_class_mismatch == "refuse"):
            return self._refused(arrival, corr, STATUS_DATASET_MISMATCH,
                                 "SOP Class UID in the dataset differs from the presentation "
                                 "context's abstract syntax")
        if not invalid:
            return arrival, header, {}
        try:
            return self._repair(arrival, header, [keyword for keyword, _ in invalid])
        except OSError as exc:  # the disk: the router's resource
            return self._refused(arrival, corr, STATUS_OUT_OF_RESOURCES,
                                 f"repairing UIDs: {exc.strerror or type(exc).__name__}")
        except Exception as exc:  # pydicom could not write it back: the data's fault
            return self._refused(arrival, corr, STATUS_CANNOT_UNDERSTAND,
                                 f"UIDs could not be repaired: {type(exc).__name__}")

    def _repair(self, arrival: Arrival, header: ScannedHeader,
                keywords: list[str]) -> tuple[Arrival, ScannedHeader, dict[str, str]]:
        """Rewrite the spooled object with its invalid UIDs replaced (router.dicom.uids)."""
        originals = {keyword: _text(header.index[keyword]) for keyword in keywords}
        replacements = {keyword: repaired_uid(header.index[keyword]) for keyword in keywords}
        rewrite_uids(arrival.path, replacements)
        sha256, size = file_digest(arrival.path)
        repaired = replace(
            arrival, sha256=sha256, size=size, reader=None, wait_durable=lambda: None,
            sop_instance_uid=replacements.get("SOPInstanceUID", arrival.sop_instance_uid))
        self._blobs.prepare(sha256)
        return repaired, scan_header(repaired.path, limits=self._limits), originals

    def _refused(self, arrival: Arrival, corr: str, status: int, reason: str) -> Receipt:
        arrival.path.unlink(missing_ok=True)
        return self._refuse(arrival, corr, status, reason)

    def _commit_blob(self, sha256: str, staged: Path | None) -> None:
        try:
            self._blobs.commit(sha256, staged)
        except OSError as exc:
            # The receipt is saved and the bytes are fsynced in the spool: the object is durable
            # and readable there; start-up recovery moves it into place.
            logger.error("blob commit failed after the receipt was saved: %s",
                         exc.strerror or type(exc).__name__)

    def _save_with_retry(
        self, arrival: Arrival, header: ScannedHeader, sop_uid: str, correlation_id: str,
        repaired: dict[str, str], staged: Path | None,
    ) -> Receipt:
        # Most UIDs are new: the first attempt does not read the log for the Instance, it
        # creates it, and the optimistic concurrency check (version 1 exists) says otherwise for
        # a UID seen before, as it does when two associations deliver the same new UID at once.
        # Then the Instance is loaded and the decision made again.
        try:
            return self._save(arrival, header, sop_uid, correlation_id, repaired, staged,
                              assume_new=True)
        except IntegrityError:
            pass
        for _ in range(3):
            try:
                return self._save(arrival, header, sop_uid, correlation_id, repaired, staged)
            except IntegrityError:
                continue
        return self._save(arrival, header, sop_uid, correlation_id, repaired, staged)

    def _save(self, arrival: Arrival, header: ScannedHeader, sop_uid: str, corr: str,
              repaired: dict[str, str], staged: Path | None,
              assume_new: bool = False) -> Receipt:
        ctx = {"actor": arrival.actor, "source_ip": arrival.source_ip, "correlation_id": corr}
        instance = None if assume_new else self._load_instance(sop_uid)
        original = instance.job_with(arrival.sha256) if instance else None
        previous = instance.latest_job_id if instance else None
        if instance and original is None and self._ingest.changed_duplicate_policy == "reject":
            return self._refuse(arrival, corr, STATUS_DUPLICATE_REFUSED,
                                "same SOP Instance UID with different content (policy: reject)")
        job = Job(
            **ctx, source=arrival.source, calling_aet=arrival.calling_aet,
            called_aet=arrival.called_aet,
            sop_class_uid=str(header.index["SOPClassUID"]),
            sop_instance_uid=sop_uid, transfer_syntax_uid=arrival.transfer_syntax_uid,
            sha256=arrival.sha256, size=arrival.size, index=header.index,
            previous_job_id=previous, tls_subject=arrival.tls_subject,
            repaired_uids=repaired or None, node=self._node,
        )
        if original is not None:
            job.ignore_duplicate(**ctx, original_job_id=original)
        elif instance is not None and self._ingest.changed_duplicate_policy == "keep_first":
            job.keep_conflict(**ctx, original_job_id=instance.versions[0]["job_id"])
        else:
            self._route(job, arrival, header, ctx)
        to_save: list[Any] = [job]
        if instance is None:
            to_save.append(Instance(sop_uid, **ctx, job_id=str(job.id), sha256=arrival.sha256))
        elif original is None:
            instance.add_version(**ctx, job_id=str(job.id), sha256=arrival.sha256)
            to_save.append(instance)
        try:
            arrival.wait_durable()  # the bytes are on disk before anything refers to them
        except OSError as exc:
            raise NotDurableError(exc.strerror or type(exc).__name__) from None
        # A remote store takes the object now (raises BlobError if it cannot): durable in the
        # store, then the receipt saved, then acknowledged. Locally a no-op.
        self._blobs.persist(arrival.sha256, staged)
        self._app.save(*to_save)
        return Receipt(STATUS_SUCCESS, str(job.id), duplicate=original is not None,
                       coerced=bool(repaired))

    def _load_instance(self, sop_uid: str) -> Instance | None:
        try:
            instance: Any = self._app.repository.get(instance_id(sop_uid))
        except AggregateNotFoundError:
            return None
        assert isinstance(instance, Instance)
        return instance

    def _route(self, job: Job, arrival: Arrival, header: ScannedHeader,
               ctx: dict[str, str]) -> None:
        snapshot = self._admin.snapshot()
        decision: RoutingDecision = evaluate(snapshot.rules, RoutingInput(
            calling_aet=arrival.calling_aet, called_aet=arrival.called_aet,
            source_ip=arrival.source_ip, dataset=header.dataset, extra=arrival.extra,
        ))
        destinations = list(decision.destinations)
        default_used = False
        if not destinations and self._dispatch.default_destination:
            destinations = [self._dispatch.default_destination]
            default_used = True
        job.route(
            plan_units(snapshot, decision, destinations, header.index) or None,
            **ctx,
            matched_rules=[
                {"rule_id": m.rule_id, "version": m.version, "name": m.name}
                for m in decision.matched
            ],
            destinations=destinations,
            unrouted=not destinations,
            default_destination_used=default_used,
            stopped_by=decision.stopped_by,
        )

    def refuse(self, arrival: Arrival, status: int, reason: str) -> Receipt:
        """Refuse an object that never got as far as :meth:`receive` (say the spool failed)."""
        return self._refuse(arrival, arrival.correlation_id or str(uuid.uuid4()), status, reason)

    def _refuse(self, arrival: Arrival, corr: str, status: int, reason: str,
                record: bool = True) -> Receipt:
        """Record why an object was refused (best effort: the store may be what failed)."""
        if not record:
            logger.warning("refused object from %s: 0x%04X %s", arrival.calling_aet, status,
                           reason)
            return Receipt(status, reason=reason)
        try:
            failure = ReceiptFailure(
                actor=arrival.actor, source_ip=arrival.source_ip, correlation_id=corr,
                source=arrival.source, calling_aet=arrival.calling_aet,
                called_aet=arrival.called_aet, status=status, reason=reason,
                sop_class_uid=arrival.sop_class_uid, sop_instance_uid=arrival.sop_instance_uid,
            )
            self._app.save(failure)
            self._on_saved()
        except Exception as exc:
            logger.error("receipt failure could not be recorded: %s", type(exc).__name__)
        logger.warning("refused object from %s: 0x%04X %s", arrival.calling_aet, status, reason)
        return Receipt(status, reason=reason)


# The UIDs an object is filed, indexed and served under, and how a refusal names them.
_UID_NAMES = {
    "SOPClassUID": "SOP Class UID", "SOPInstanceUID": "SOP Instance UID",
    "StudyInstanceUID": "Study Instance UID", "SeriesInstanceUID": "Series Instance UID",
    "TransferSyntaxUID": "Transfer Syntax UID",
    "MediaStorageSOPClassUID": "file meta SOP Class UID",
    "MediaStorageSOPInstanceUID": "file meta SOP Instance UID",
}
_META_UIDS = ("TransferSyntaxUID", "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID")


_IDENTITY_TAGS = (("SOPClassUID", 0x00080016), ("SOPInstanceUID", 0x00080018),
                  ("StudyInstanceUID", 0x0020000D), ("SeriesInstanceUID", 0x0020000E))


def _identity_encoding(header: ScannedHeader) -> str | None:
    """Why the identity UIDs cannot be found by a peer, or None: written with another VR than
    UI (say UN, which pydicom reads through its dictionary and DCMTK's storescp refuses as a
    dataset without a SOP Class UID, 0xC000)."""
    for keyword, tag in _IDENTITY_TAGS:
        vr = header.identity_vrs.get(tag)
        if vr is not None and vr != "UI":
            return f"{_UID_NAMES[keyword]} is encoded with VR {vr}, not UI"
    return None


def _invalid_uids(arrival: Arrival, header: ScannedHeader) -> list[tuple[str, str]]:
    """(keyword, problem) of each identity UID that is not a PS3.5 9.1 UID; the file meta's
    are those of the command (C-STORE) or of the sender's file (STOW-RS, AI results)."""
    found: list[tuple[str, str]] = []
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = header.index.get(keyword)
        problem = uid_problem(value) if value is not None else None
        if problem is not None:
            found.append((keyword, problem))
    meta = header.dataset.file_meta
    for keyword in _META_UIDS:
        value = _meta_text(meta, keyword)
        if keyword == "MediaStorageSOPInstanceUID" and value == header.index["SOPInstanceUID"]:
            continue  # the same value as the dataset's, already judged (and repaired) there
        problem = uid_problem(value) if value is not None else None
        if problem is not None:
            found.append((keyword, problem))
    if arrival.transfer_syntax_uid and (problem := uid_problem(arrival.transfer_syntax_uid)):
        found.append(("TransferSyntaxUID", problem))
    return found


_META_TAGS = {"TransferSyntaxUID": 0x00020010, "MediaStorageSOPClassUID": 0x00020002,
              "MediaStorageSOPInstanceUID": 0x00020003}


def _meta_text(meta: Any, keyword: str) -> str | None:
    """A file meta UID as text (None when absent). The meta was read raw: its bytes are
    decoded here, not converted by pydicom (which costs about 0.15 ms an element, a tenth of
    a CT slice's whole receipt, three times per object)."""
    raw = meta.get_item(_META_TAGS[keyword]) if _META_TAGS[keyword] in meta else None
    if raw is None:
        return None
    value = raw.value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").rstrip("\0 ")
    if value is None:
        return None
    return str(value).rstrip("\0 ") if isinstance(value, str) else _text(value)


def _text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)
