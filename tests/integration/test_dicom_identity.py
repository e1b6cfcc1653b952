"""Our DICOM upper layer names itself, not pynetdicom: the Implementation Class UID and
Version Name in our A-ASSOCIATE-AC (storage pushes and pynetdicom-served query associations),
in our A-ASSOCIATE-RQ to destinations, and in the file meta of the files we store."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind

from router.dicom.identity import IMPLEMENTATION_UID, IMPLEMENTATION_VERSION
from tests.conftest import wait_for
from tests.integration.peers import StoreScp
from tests.integration.test_faults import dicom_destination, router_settings
from tests.synthetic import make_ct_series


def _accepted_by(port: int, context: str) -> tuple[str, str]:
    ae = AE(ae_title="IDCHECK")
    ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMROUTER")
    assert assoc.is_established
    try:
        return (str(assoc.acceptor.implementation_class_uid),
                str(assoc.acceptor.implementation_version_name))
    finally:
        assoc.release()


def test_our_associations_and_files_carry_our_implementation_names(
        tmp_path: Path, start_router: Any) -> None:
    assert len(IMPLEMENTATION_VERSION) <= 16 and len(IMPLEMENTATION_UID) <= 64
    with StoreScp(tmp_path / "sink", "SINK", ("-d",)) as sink:
        settings = router_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}",
                                   [dicom_destination("sink", sink.port, ae_title="SINK")])
        router = start_router(settings)
        port = router.dicom.port
        # A storage push (our push_scp) and a query association (pynetdicom's, our names).
        assert _accepted_by(port, CTImageStorage) == (IMPLEMENTATION_UID, IMPLEMENTATION_VERSION)
        assert _accepted_by(port, StudyRootQueryRetrieveInformationModelFind) == (
            IMPLEMENTATION_UID, IMPLEMENTATION_VERSION)
        files = make_ct_series(tmp_path / "ct", count=1, rows=16, cols=16)
        sent = subprocess.run(["storescu", "-aec", "DICOMROUTER", "127.0.0.1", str(port),
                               str(files[0])], capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        wait_for(sink.received, 30, "the delivery")
        # Our SCU's A-ASSOCIATE-RQ, as DCMTK's storescp logged it (debug).
        assert IMPLEMENTATION_UID in sink.log()
        assert IMPLEMENTATION_VERSION in sink.log()
        # The stored file (written by our receiver): its file meta names us.
        stored = next(p for p in router.blobs.blob_dir.rglob("*") if p.is_file())
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.ImplementationClassUID == IMPLEMENTATION_UID
        assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION
