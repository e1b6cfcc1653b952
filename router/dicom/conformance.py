"""The generated tables of the DICOM Conformance Statement (docs/conformance-statement.md):
SOP classes, roles and transfer syntaxes, read from the lists the code itself uses (the AE the
DICOM port serves with, the Q/R SCU's models, the storage SCU's fallbacks, the identity).

Each table sits between ``<!-- generated: NAME -->`` and ``<!-- end generated: NAME -->`` in
the document; :func:`rewrite` replaces what is between them. ``scripts/conformance-tables``
runs it; a test fails when the document and the code disagree.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path

from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    Verification,
)

from router.dicom import commitment_scp, qr_scu
from router.dicom.identity import IMPLEMENTATION_UID, IMPLEMENTATION_VERSION
from router.dicom.qr_scp import FIND_MODELS, GET_MODELS, MOVE_MODELS, QueryRetrieveSCP
from router.dicom.scp import TRANSFER_SYNTAXES, add_storage_contexts
from router.dispatch.dicom import FALLBACK_SYNTAXES
from router.settings import DicomSettings

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "conformance-statement.md"
_BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)"
                    r"(<!-- end generated: (?P=name) -->)", re.S)


def accepted_contexts() -> list[PresentationContext]:
    """Every presentation context the DICOM port accepts, as the server builds its AE."""
    ae = AE()
    add_storage_contexts(ae)
    QueryRetrieveSCP.add_contexts(ae)
    commitment_scp.CommitmentService.add_contexts(ae)
    return list(ae.supported_contexts)


def _name(uid: str) -> str:
    return UID(uid).name or uid


def _syntaxes(uids: Iterable[str]) -> str:
    return "<br>".join(f"{_name(ts)} `{ts}`" for ts in uids)


def _table(header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _storage_classes() -> list[str]:
    service = {Verification, StorageCommitmentPushModel, *FIND_MODELS, *MOVE_MODELS,
               *GET_MODELS}
    return [str(cx.abstract_syntax) for cx in accepted_contexts()
            if cx.abstract_syntax not in service]


def identity_table() -> str:
    defaults = DicomSettings()
    return _table(("item", "value"), [
        ("Implementation Class UID", f"`{IMPLEMENTATION_UID}`"),
        ("Implementation Version Name", f"`{IMPLEMENTATION_VERSION}`"),
        ("Maximum PDU length received (default, `dicom.max_pdu_size`)",
         f"{defaults.max_pdu_size} bytes"),
        ("Maximum associations at once (default, `dicom.max_associations`)",
         str(defaults.max_associations)),
    ])


def scp_services_table() -> str:
    """The SCP's non-storage SOP classes with their transfer syntaxes."""
    services = {Verification: "Verification", StorageCommitmentPushModel:
                "Storage Commitment Push Model", **{m: "Query/Retrieve C-FIND" for m in
                                                   FIND_MODELS},
                **{m: "Query/Retrieve C-MOVE" for m in MOVE_MODELS},
                **{m: "Query/Retrieve C-GET" for m in GET_MODELS}}
    rows = [(services[str(cx.abstract_syntax)], _name(str(cx.abstract_syntax)),
             f"`{cx.abstract_syntax}`", "SCP", _syntaxes(cx.transfer_syntax))
            for cx in accepted_contexts() if str(cx.abstract_syntax) in services]
    return _table(("service", "SOP class", "UID", "role", "transfer syntaxes"), rows)


def storage_classes_table() -> str:
    rows = [(_name(uid), f"`{uid}`", "SCP, SCU") for uid in _storage_classes()]
    return (f"{len(rows)} storage SOP classes.\n\n"
            + _table(("SOP class", "UID", "roles"), rows))


def storage_syntaxes_table() -> str:
    rows = [(_name(ts), f"`{ts}`") for ts in TRANSFER_SYNTAXES]
    return _table(("transfer syntax", "UID"), rows)


def scu_services_table() -> str:
    """What the router asks of other nodes: storage to destinations, Q/R to remote nodes,
    the commitment report."""
    rows = [
        ("Storage (destinations, C-MOVE/C-GET sub-operations)", "every storage SOP class above",
         "", "SCU", "the object's stored syntax, and " + _syntaxes(FALLBACK_SYNTAXES)),
        ("Verification", _name(Verification), f"`{Verification}`", "SCU",
         _syntaxes(qr_scu.build_context(Verification).transfer_syntax)),
    ]
    for label, model in (("Query/Retrieve C-FIND", qr_scu.FIND_MODEL),
                         ("Query/Retrieve C-MOVE", qr_scu.MOVE_MODEL),
                         ("Query/Retrieve C-GET", qr_scu.GET_MODEL)):
        rows.append((label, _name(model), f"`{model}`", "SCU",
                     _syntaxes(qr_scu.build_context(model).transfer_syntax)))
    rows.append(("Storage Commitment report (N-EVENT-REPORT, new association)",
                 _name(StorageCommitmentPushModel), f"`{StorageCommitmentPushModel}`",
                 "SCP (proposed by role selection)",
                 _syntaxes(qr_scu.build_context(StorageCommitmentPushModel).transfer_syntax)))
    return _table(("service", "SOP class", "UID", "role", "transfer syntaxes proposed"), rows)


TABLES: dict[str, Callable[[], str]] = {
    "identity": identity_table,
    "scp-services": scp_services_table,
    "storage-sop-classes": storage_classes_table,
    "storage-transfer-syntaxes": storage_syntaxes_table,
    "scu-services": scu_services_table,
}


def rewrite(text: str) -> str:
    """``text`` with every generated table replaced by what the code says now.

    Raises ValueError naming a table the document lacks or does not know."""
    found = {m.group("name") for m in _BLOCK.finditer(text)}
    missing, unknown = set(TABLES) - found, found - set(TABLES)
    if missing or unknown:
        raise ValueError(f"generated tables missing: {sorted(missing)}, unknown: "
                         f"{sorted(unknown)}")
    return _BLOCK.sub(lambda m: m.group(1) + TABLES[m.group("name")]()
                      + m.group(4), text)


def main(argv: list[str]) -> int:
    """Rewrite the document (exit 0), or with ``--check`` say whether it is current (exit 1
    when it is not)."""
    text = DOCUMENT.read_text(encoding="utf-8")
    try:
        current = rewrite(text)
    except ValueError as exc:
        print(f"{DOCUMENT}: {exc}")
        return 2
    if "--check" in argv:
        if current != text:
            print(f"{DOCUMENT} is out of date: run scripts/conformance-tables")
            return 1
        return 0
    if current != text:
        DOCUMENT.write_text(current, encoding="utf-8")
        print(f"{DOCUMENT}: tables rewritten")
    return 0
