"""Our query/retrieve SCU towards remote nodes: C-ECHO, C-FIND (Study Root, study and series
level), C-MOVE to our own AE title and C-GET with storage sub-operations received in-line.

Failures raise RemoteError with a message fit for users (no identifiers); every association is
released (or aborted) when done, and :meth:`QueryRetrieveScu.abort_all` ends the running ones.
Associations go to an address the address policy checked (router.dispatch.ssrf); a node that
is not reached, refused or not, gets one vague answer (the detail goes to the log).
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from router.application.commands import CommandError
from router.application.remote_nodes import RemoteNodeConfig
from router.dicom.identity import IMPLEMENTATION_UID, IMPLEMENTATION_VERSION
from router.dicom.scp import TRANSFER_SYNTAXES
from router.dicom.tls import TlsClientSettings, TlsConfigError
from router.dicom.tuning import CONNECTION_HANDLERS
from router.dispatch.base import NOT_REACHED
from router.dispatch.dicom import COMMON_SOP_CLASSES
from router.dispatch.ssrf import AddressPolicy, AddressRefusedError
from router.settings import DicomSettings

logger = logging.getLogger(__name__)

# What we ask of remote nodes (Study Root only; the conformance statement lists these).
FIND_MODEL = StudyRootQueryRetrieveInformationModelFind
MOVE_MODEL = StudyRootQueryRetrieveInformationModelMove
GET_MODEL = StudyRootQueryRetrieveInformationModelGet
MAX_FIND_RESULTS = 500
MAX_GET_CONTEXTS = 120
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
PENDING = (0xFF00, 0xFF01)
STUDY_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
              "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription",
              "ModalitiesInStudy", "ReferringPhysicianName", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances")
SERIES_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
               "SeriesDescription", "BodyPartExamined", "SeriesDate",
               "NumberOfSeriesRelatedInstances")


class RemoteError(CommandError):
    """The remote node could not be reached, refused, or answered a failure (no PHI)."""


@dataclass(frozen=True)
class FindRequest:
    """What a user asks a remote node for; empty fields match anything."""

    level: str = "STUDY"  # STUDY | SERIES
    patient_name: str = ""
    patient_id: str = ""
    study_date_from: str = ""  # YYYYMMDD
    study_date_to: str = ""
    modality: str = ""
    accession_number: str = ""
    description: str = ""
    study_instance_uid: str = ""  # required at SERIES level

    def identifier(self) -> Dataset:
        """The C-FIND identifier: these matching keys plus the return keys of the level."""
        if self.level not in ("STUDY", "SERIES"):
            raise CommandError("level must be STUDY or SERIES")
        if self.level == "SERIES" and not UID_PATTERN.match(self.study_instance_uid):
            raise CommandError("a series query needs the study's Study Instance UID")
        ds = Dataset()
        ds.QueryRetrieveLevel = self.level
        for keyword in STUDY_KEYS if self.level == "STUDY" else SERIES_KEYS:
            setattr(ds, keyword, None)
        dates = (self.study_date_from, self.study_date_to)
        study = self.level == "STUDY"
        values = {"PatientName": self.patient_name, "PatientID": self.patient_id,
                  "AccessionNumber": self.accession_number,
                  "StudyInstanceUID": self.study_instance_uid,
                  "StudyDate": "-".join(dates) if any(dates) else "",
                  "ModalitiesInStudy" if study else "Modality": self.modality,
                  "StudyDescription" if study else "SeriesDescription": self.description}
        for keyword, value in values.items():
            if value and keyword in ds:
                setattr(ds, keyword, value)
        if not all(str(v).isascii() for v in values.values()):
            ds.SpecificCharacterSet = "ISO_IR 192"
        return ds


@dataclass(frozen=True)
class FindResult:
    """The matches (keyword -> text), and whether the remote had more than we take."""

    rows: list[dict[str, str]]
    truncated: bool


Progress = Callable[[Dataset], None]


class QueryRetrieveScu:
    """Associations from our AE title to remote nodes; thread-safe (one association each)."""

    def __init__(self, ae_title: str, dicom: DicomSettings, policy: AddressPolicy) -> None:
        self._ae_title = ae_title
        self._dicom = dicom
        self._policy = policy
        self._lock = threading.Lock()
        self._live: set[Association] = set()

    def echo(self, node: RemoteNodeConfig) -> str:
        """C-ECHO; a short success text, or RemoteError saying what failed."""
        started = time.monotonic()
        with self._association(node, [build_context(Verification)]) as assoc:
            status = assoc.send_c_echo()
        code = status.get("Status") if status else None
        if code != 0x0000:
            raise RemoteError(f"C-ECHO to {where(node)} failed: {status_text(code)}")
        return f"C-ECHO ok in {1000 * (time.monotonic() - started):.0f} ms"

    def find(self, node: RemoteNodeConfig, identifier: Dataset,
             limit: int = MAX_FIND_RESULTS) -> FindResult:
        """C-FIND (Study Root); after ``limit`` matches the rest is cancelled (C-CANCEL)."""
        model = FIND_MODEL
        rows: list[dict[str, str]] = []
        truncated = False
        with self._association(node, [build_context(model)]) as assoc:
            for status, found in assoc.send_c_find(identifier, model, msg_id=1):
                code = status.get("Status") if status else None
                if code not in PENDING:
                    if code not in (0x0000, 0xFE00):
                        raise RemoteError(f"C-FIND at {where(node)} failed: {status_text(code)}")
                    break
                if found is not None and not truncated:
                    rows.append(as_text(found))
                if len(rows) >= limit and not truncated:
                    truncated = True
                    assoc.send_c_cancel(1, query_model=model)
        return FindResult(rows, truncated)

    def move(self, node: RemoteNodeConfig, identifier: Dataset, message_id: int,
             progress: Progress) -> int:
        """C-MOVE to our own AE title; the final status (pending ones go to ``progress``)."""
        model = MOVE_MODEL
        with self._association(node, [build_context(model)]) as assoc:
            responses = assoc.send_c_move(identifier, self._ae_title, model, msg_id=message_id)
            return _follow(responses, progress, node)

    def get(self, node: RemoteNodeConfig, identifier: Dataset, message_id: int,
            on_store: Callable[[Any], int], progress: Progress) -> int:
        """C-GET; each C-STORE sub-operation is handed to ``on_store`` (returns its status)."""
        model = GET_MODEL
        classes = self._classes_of(node, str(identifier.get("StudyInstanceUID", "")))
        contexts = [build_context(model),
                    *(build_context(sop, list(TRANSFER_SYNTAXES)) for sop in classes)]
        roles = [build_role(sop, scp_role=True) for sop in classes]
        with self._association(node, contexts, roles, [(evt.EVT_C_STORE, on_store)]) as assoc:
            return _follow(assoc.send_c_get(identifier, model, msg_id=message_id), progress,
                           node)

    def _classes_of(self, node: RemoteNodeConfig, study: str) -> list[str]:
        """SOP classes to accept in a C-GET: the study's (SOPClassesInStudy, when the node
        answers it), then common ones, within the protocol's limit of contexts."""
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = study
        ds.SOPClassesInStudy = None
        found: list[str] = []
        try:
            for row in self.find(node, ds, limit=10).rows:
                found.extend(row.get("SOPClassesInStudy", "").split("\\"))
        except RemoteError:
            pass  # optional key: fall back on the common classes
        wanted = [uid for uid in found if UID_PATTERN.match(uid)]
        return list(dict.fromkeys([*wanted, *COMMON_SOP_CLASSES]))[:MAX_GET_CONTEXTS]

    def event_report(self, node: RemoteNodeConfig, dataset: Dataset, event_type: int,
                     sop_class: str, sop_instance: str) -> None:
        """N-EVENT-REPORT as the SCP of ``sop_class`` (role selection: we propose the SCP
        role, the node must accept it), e.g. a Storage Commitment report."""
        role = build_role(sop_class, scp_role=True)
        with self._association(node, [build_context(sop_class)], roles=[role]) as assoc:
            status, _ = assoc.send_n_event_report(dataset, event_type, sop_class, sop_instance)
        code = status.get("Status") if status else None
        if code != 0x0000:
            raise RemoteError(f"N-EVENT-REPORT to {where(node)} failed: {status_text(code)}")

    def abort_all(self) -> None:
        with self._lock:
            live = list(self._live)
        for assoc in live:
            assoc.abort()

    def _association(self, node: RemoteNodeConfig, contexts: list[Any],
                     roles: list[Any] | None = None,
                     handlers: list[Any] | None = None) -> _Associated:
        ae = AE(ae_title=self._ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_UID  # ours, not pynetdicom's (identity.py)
        ae.implementation_version_name = IMPLEMENTATION_VERSION
        ae.connection_timeout = min(self._dicom.acse_timeout, 15.0)
        ae.acse_timeout = self._dicom.acse_timeout
        ae.dimse_timeout = self._dicom.dimse_timeout
        ae.network_timeout = self._dicom.network_timeout
        ae.maximum_pdu_size = self._dicom.max_pdu_size
        try:
            address = self._policy.addresses(node.host, node.port)[0]
            assoc = ae.associate(address, node.port, contexts=contexts,
                                 ae_title=node.ae_title, ext_neg=roles or None,
                                 evt_handlers=[*CONNECTION_HANDLERS, *(handlers or [])],
                                 tls_args=tls_args(node))
        except TlsConfigError as exc:
            raise RemoteError(f"TLS settings of {where(node)}: {exc}") from None
        except (AddressRefusedError, OSError) as exc:
            raise not_reached(node, str(exc) or type(exc).__name__) from None
        if assoc.is_rejected:
            raise RemoteError(f"{where(node)} rejected the association")
        if not assoc.is_established:
            # Refused connections, silence and other protocols alike (no port scanner).
            raise not_reached(node, "no association (connection refused, closed or silent)")
        return _Associated(assoc, self._live, self._lock)


class _Associated:
    """An established association as a context manager: released (or aborted) at the end."""

    def __init__(self, assoc: Association, live: set[Association], lock: threading.Lock) -> None:
        self._assoc, self._live, self._lock = assoc, live, lock

    def __enter__(self) -> Association:
        with self._lock:
            self._live.add(self._assoc)
        return self._assoc

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._live.discard(self._assoc)
        if self._assoc.is_established:
            self._assoc.release()
        if self._assoc.is_established:
            self._assoc.abort()


def _follow(responses: Iterator[tuple[Dataset, Dataset | None]], progress: Progress,
            node: RemoteNodeConfig) -> int:
    """Follow C-MOVE/C-GET responses: pending ones to ``progress``, the final one's status."""
    for status, _identifier in responses:
        code = status.get("Status") if status else None
        if code is None:
            raise RemoteError(f"{where(node)} ended the association without a final answer")
        progress(status)
        if code not in PENDING:
            return int(code)
    raise RemoteError(f"{where(node)} sent no response")


def tls_args(node: RemoteNodeConfig) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for a node with ``tls`` on (None otherwise)."""
    settings = TlsClientSettings.of(node)
    if settings is None:
        return None
    return settings.context(), settings.server_name or node.host


def values_of(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    return [str(v) for v in value] if isinstance(value, MultiValue | list) else [str(value)]


def as_text(ds: Dataset) -> dict[str, str]:
    """An identifier's values as text (multiple values joined by backslashes)."""
    return {e.keyword: "\\".join(values_of(e.value)) for e in ds if e.keyword and e.VR != "SQ"}


def not_reached(node: RemoteNodeConfig, detail: str) -> RemoteError:
    """The one answer for a node not reached, whatever the reason; the reason is logged."""
    logger.warning("remote node %s (%s) not reached: %s", node.name, where(node), detail)
    return RemoteError(f"{where(node)} {NOT_REACHED}")


def where(node: RemoteNodeConfig) -> str:
    return f"{node.ae_title}@{node.host}:{node.port}"


def status_text(code: int | None) -> str:
    return "no response (aborted or timed out)" if code is None else f"status 0x{code:04X}"
