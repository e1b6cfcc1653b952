"""Reading a Storage Commitment N-ACTION: every malformed request is refused with the status
PS3.7 gives it and a reason naming the attribute (never its value)."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from router.application.commitments import (
    INVALID_ARGUMENT,
    MAX_REFERENCES,
    NO_SUCH_ACTION,
    RESOURCE_LIMITATION,
    CommitmentRefused,
    parse_request,
)

# The hostile values below are set on purpose; pydicom warns about each.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")


def info(transaction_uid: str | None = "1.2.3",
         pairs: list[tuple[str, str]] | None = None) -> Dataset:
    ds = Dataset()
    if transaction_uid is not None:
        ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in pairs if pairs is not None else [(CTImageStorage, "1.2.4")]:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def refusal(action_type: int, ds: Dataset | None) -> CommitmentRefused:
    with pytest.raises(CommitmentRefused) as caught:
        parse_request(action_type, ds)
    return caught.value


def test_a_well_formed_request_lists_its_references_in_order() -> None:
    second = generate_uid()
    request = parse_request(1, info("1.2.3", [(CTImageStorage, "1.2.4"),
                                              (CTImageStorage, second)]))
    assert request.transaction_uid == "1.2.3"
    assert request.references == [[CTImageStorage, "1.2.4"], [CTImageStorage, second]]


def test_another_action_type_is_no_such_action() -> None:
    assert refusal(2, info()).status == NO_SUCH_ACTION


@pytest.mark.parametrize(("fields", "named"), [
    (None, "Action Information"),
    ({"transaction_uid": None}, "Transaction UID (0008,1195) is missing"),
    ({"transaction_uid": "1.2.x<script>"}, "Transaction UID (0008,1195) is not digits"),
    ({"pairs": []}, "Referenced SOP Sequence (0008,1199) is missing or empty"),
    ({"pairs": [(CTImageStorage, "1.2.4"), (CTImageStorage, "../../etc/passwd")]},
     "Referenced SOP Instance UID (0008,1155) of item 2"),
    ({"pairs": [("", "1.2.4")]}, "Referenced SOP Class UID (0008,1150) of item 1"),
])
def test_bad_action_information_names_the_attribute(fields: dict[str, Any] | None,
                                                    named: str) -> None:
    refused = refusal(1, None if fields is None else info(**fields))
    assert refused.status == INVALID_ARGUMENT
    assert named in refused.reason
    assert "passwd" not in refused.reason and "script" not in refused.reason


def test_too_many_references_is_a_resource_limitation() -> None:
    pairs = [(CTImageStorage, f"1.2.{n}") for n in range(MAX_REFERENCES + 1)]
    assert refusal(1, info(pairs=pairs)).status == RESOURCE_LIMITATION
