"""One received C-STORE, its dataset spooled, as both listeners (pynetdicom's and
push_scp's) and the C-GET requestor hand it to the receiver."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from router.dicom.spool import SpoolFile
from router.dicom.tuning import received_spool


@dataclass(frozen=True)
class StoreRequest:
    """One C-STORE whose dataset is in the spool, with who sent it to whom."""

    spool: SpoolFile
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    sender_aet: str
    our_aet: str
    sender_ip: str
    move_originator_aet: str = ""
    move_originator_message_id: int | None = None
    # The presentation context's abstract syntax: the receiver compares the dataset's SOP
    # Class UID with it ("" when unknown).
    abstract_syntax: str = ""
    # The subject of the peer's verified TLS client certificate ("" over plain TCP).
    tls_subject: str = ""

    @classmethod
    def from_event(cls, event: Any) -> StoreRequest:
        """From pynetdicom's EVT_C_STORE (also on an association we opened, for C-GET)."""
        request, assoc = event.request, event.assoc
        spool = received_spool(event)  # found by the public event.dataset_path
        if spool is None:
            raise RuntimeError("C-STORE without a spool file; is configure_pynetdicom() applied?")
        # On an association we opened (C-GET) the sender is the peer we called.
        sender, us = (assoc.acceptor, assoc.requestor) if assoc.is_requestor else (
            assoc.requestor, assoc.acceptor)
        return cls(
            spool=spool, sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=str(request.AffectedSOPInstanceUID),
            transfer_syntax_uid=str(event.context.transfer_syntax),
            sender_aet=str(sender.ae_title).strip(), our_aet=str(us.ae_title).strip(),
            sender_ip=str(sender.address),
            move_originator_aet=str(request.MoveOriginatorApplicationEntityTitle or "").strip(),
            move_originator_message_id=request.MoveOriginatorMessageID,
            abstract_syntax=str(event.context.abstract_syntax),
        )
