"""The dry run shows what a transform does to a stored header: a character-set repair too
(the header shown "before" must not be decoded before the repair looks at its bytes)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pydicom.data import get_charset_files

from router.application.transform_preview import preview
from router.transforms.chain import VersionedTransform
from router.transforms.spec import parse_transform


class _Jobs:
    def query(self, sql: str, params: Any) -> list[dict[str, Any]]:
        return [{"job_id": "j1", "sha256": "s", "calling_aet": "CT_1", "matched_rules": "",
                 "study_instance_uid": "1.2", "patient_id": "P"}]


def test_the_dry_run_of_a_charset_repair_shows_the_name_decoded_both_ways(
        tmp_path: Path) -> None:
    data = Path(get_charset_files("chrX1.dcm")[0]).read_bytes()
    stored = tmp_path / "stored.dcm"
    stored.write_bytes(data.replace(b"ISO_IR 192", b"ISO_IR 100"))
    blobs = SimpleNamespace(wait_for=lambda sha, timeout: stored)
    fix = VersionedTransform(3, parse_transform({"name": "fix", "kind": "charset"}))
    snapshot = SimpleNamespace(transforms={"fix": fix})
    result = preview(_Jobs(), blobs, snapshot, lambda project: "0" * 64,
                     sop_instance_uid="1.2.3", transform="fix")
    rows = {r["name"]: r for r in result.rows}
    assert rows["SpecificCharacterSet"]["before"] == "ISO_IR 100"
    assert rows["SpecificCharacterSet"]["after"] == "ISO_IR 192"
    assert rows["PatientName"]["change"] == "changed"
    assert rows["PatientName"]["after"] == "Wang^XiaoDong=王^小東"
    assert result.applied[0]["changed"] == "Specific Character Set ISO_IR 100 -> ISO_IR 192"
