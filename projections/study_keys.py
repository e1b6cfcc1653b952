"""Which study and which transfer a received instance belongs to, as the views key them.

An instance without a Study Instance UID still belongs somewhere: it gets a study of its own
whose UID is derived (``2.25.<uuid5>``, a valid UID) from its Series Instance UID, or from its
SOP Instance UID when that is missing too. Instances of one series then share one study and
unrelated instances never do (there is no shared "unknown" bucket); the study can be found,
opened and filtered on like any other, and the ``studies`` view marks it ``uid_derived``.

A transfer is what people see on the jobs page: the instances of one study sent by one
calling AE title (a sender's push of a study, with its later additions).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import NAMESPACE_OID, uuid5

DERIVED_STUDY_NAMESPACE = uuid5(NAMESPACE_OID, "dicom-router/derived-study")
TRANSFER_NAMESPACE = uuid5(NAMESPACE_OID, "dicom-router/transfer")


def study_key(index: Mapping[str, Any], sop_instance_uid: str) -> tuple[str, bool]:
    """The study UID to index an instance under, and whether it was derived (absent)."""
    study = index.get("StudyInstanceUID")
    if study:
        return str(study), False
    series = index.get("SeriesInstanceUID")
    seed = f"series/{series}" if series else f"instance/{sop_instance_uid}"
    return f"2.25.{uuid5(DERIVED_STUDY_NAMESPACE, seed).int}", True


def series_key(index: Mapping[str, Any], sop_instance_uid: str) -> str:
    """The series UID to index an instance under (derived like the study's when absent)."""
    series = index.get("SeriesInstanceUID")
    if series:
        return str(series)
    return f"2.25.{uuid5(DERIVED_STUDY_NAMESPACE, f'series-of/{sop_instance_uid}').int}"


def transfer_id(study_instance_uid: str, calling_aet: str) -> str:
    """The id of the transfer of one study by one sender."""
    return str(uuid5(TRANSFER_NAMESPACE, f"{study_instance_uid}/{calling_aet}"))
