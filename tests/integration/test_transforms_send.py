"""Transforms at send time, end to end: storescu sends CT_small.dcm; a rule's morph and a
destination's de-identification reach a DCMTK storescp (the received file is read back), a
destination without transforms gets the stored bytes, a failing transform dead-letters its
delivery with a clear error, and the stored blob stays as received. Runs on SQLite and
PostgreSQL.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file

from router.domain.delivery import delivery_id
from tests.conftest import make_settings, wait_for
from tests.integration.peers import StoreScp
from tests.integration.test_pipeline import storescu

pytestmark = pytest.mark.dcmtk

CONFIG = """
[[transforms]]
name = "fix-pid"
kind = "morph"

[[transforms.ops]]
op = "replace"
tag = "PatientID"
pattern = "^1CT"
with = "SITEA-"
when = [{{ calling_aet = "CT_*" }}]

[[transforms.ops]]
op = "set"
tag = "InstitutionName"
value = "North Clinic"
when = [{{ calling_aet = "MR_*" }}]

[[transforms]]
name = "deid"
kind = "deidentify"
project = "trial-7"

[[transforms]]
name = "bad-ref"
kind = "morph"
ops = [{{ op = "replace", tag = "PatientID", pattern = "SITEA", with = '\\9' }}]

[[destinations]]
name = "research"
type = "dicom"
host = "127.0.0.1"
port = {port}
ae_title = "STORESCP"
transforms = ["deid"]

[[destinations]]
name = "archive"
type = "file"
path = "{archive}"

[[destinations]]
name = "broken"
type = "file"
path = "{broken}"
transforms = ["bad-ref"]

[[rules]]
name = "everything"
destinations = ["research", "archive", "broken"]
transforms = ["fix-pid"]
"""


def _events(router: Any, job_id: str, destination: str) -> list[Any]:
    return list(router.stores.delivery.events.get(delivery_id(job_id, destination)))


def test_rule_and_destination_transforms_reach_storescp_and_the_blob_stays(
        tmp_path: Path, database_url: str, start_router: Any) -> None:
    source = Path(get_testdata_file("CT_small.dcm", download=False))
    original = pydicom.dcmread(source)
    with StoreScp(tmp_path / "scp") as scp:
        for folder in ("archive", "broken"):
            (tmp_path / folder).mkdir()
        config = tmp_path / "router.toml"
        config.write_text(CONFIG.format(port=scp.port, archive=tmp_path / "archive",
                                        broken=tmp_path / "broken"))
        router = start_router(make_settings(tmp_path, database_url, config))
        storescu(router.dicom.port, [source])
        db = router.view_db("jobs")
        rows = wait_for(lambda: (r := db.query(
            "SELECT destination, status, last_error, job_id FROM deliveries"
            " WHERE status IN ('delivered', 'dead')")) and len(r) == 3 and r,
            60, "three deliveries settled")
        by_name = {r["destination"]: r for r in rows}
        received = list(scp.folder.iterdir())

    # The research copy: the rule's morph ran first (1CT1 -> SITEA-1), then de-identification.
    assert by_name["research"]["status"] == "delivered"
    assert len(received) == 1
    sent = pydicom.dcmread(received[0])
    assert sent.PatientID not in (original.PatientID, "SITEA-1")
    assert str(sent.PatientName) != str(original.PatientName)
    assert sent.StudyInstanceUID != original.StudyInstanceUID
    assert sent.SOPInstanceUID != original.SOPInstanceUID
    assert not [e for e in sent if e.tag.is_private]
    assert sent.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert b"CompressedSamples" not in received[0].read_bytes()
    assert sent.PixelData == original.PixelData

    job_id = by_name["research"]["job_id"]
    succeeded = _events(router, job_id, "research")[-1]
    assert type(succeeded).__name__ == "Succeeded"
    assert [(t["name"], t["kind"], t["version"]) for t in succeeded.transforms] == [
        ("fix-pid", "morph", 1), ("deid", "deidentify", 1)]
    assert succeeded.transforms[1]["engine"].startswith("dicognito ")

    # The re-identification map knows the pseudonym (after the morph: what would have left).
    assert router.reidentification is not None
    found = router.reidentification.lookup("trial-7", "patient", sent.PatientID)
    assert found["patient_id"] == "SITEA-1"
    assert found["study_instance_uid"] == original.StudyInstanceUID
    by_study = router.reidentification.lookup("trial-7", "study", sent.StudyInstanceUID)
    assert by_study["pseudo_patient_id"] == sent.PatientID

    # The archive has no transforms of its own but the rule's morph applies to it.
    archived = list((tmp_path / "archive").rglob("*.dcm"))
    assert len(archived) == 1 and pydicom.dcmread(archived[0]).PatientID == "SITEA-1"

    # The failing transform: dead-lettered, named, nothing written, no PHI in the reason.
    broken = by_name["broken"]
    assert broken["status"] == "dead"
    assert broken["last_error"] == ("transform 'bad-ref' (morph) failed on this instance at "
                                    "ops[0] (replace PatientID): error")
    dead = _events(router, job_id, "broken")[-1]
    assert type(dead).__name__ == "DeadLettered" and dead.permanent
    assert [t["name"] for t in dead.transforms] == ["fix-pid", "bad-ref"]
    assert not list((tmp_path / "broken").rglob("*.dcm"))

    # The stored object is untouched, and no scratch copy is left behind.
    sha = db.query("SELECT sha256 FROM jobs WHERE job_id = ?", (job_id,))[0]["sha256"]
    blob = router.blobs.wait_for(sha, timeout=1.0)
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == sha
    assert not list((router.settings.data_dir / "transform-scratch").iterdir())


def test_a_destination_without_transforms_gets_the_stored_bytes(
        tmp_path: Path, start_router: Any) -> None:
    (tmp_path / "archive").mkdir()
    config = tmp_path / "router.toml"
    config.write_text(f"""
[[destinations]]
name = "archive"
type = "file"
path = "{tmp_path / 'archive'}"
template = "{{SOPInstanceUID}}.dcm"

[[rules]]
name = "all"
destinations = ["archive"]
""")
    router = start_router(make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}", config))
    source = Path(get_testdata_file("MR_small.dcm", download=False))
    storescu(router.dicom.port, [source])
    db = router.view_db("jobs")
    wait_for(lambda: db.query("SELECT 1 FROM deliveries WHERE status = 'delivered'"), 60,
             "the delivery")
    row = db.query("SELECT job_id, sha256 FROM jobs")[0]
    archived = next((tmp_path / "archive").glob("*.dcm"))
    assert hashlib.sha256(archived.read_bytes()).hexdigest() == row["sha256"]
    succeeded = _events(router, row["job_id"], "archive")[-1]
    assert succeeded.transforms == []
