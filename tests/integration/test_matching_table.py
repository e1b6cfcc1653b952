"""The matching table (tests/matching_cases.py) through both interfaces of one running router:
C-FIND with a pynetdicom SCU (Study Root) and QIDO-RS over HTTP, on SQLite and PostgreSQL.
The instances are stored once per backend with pynetdicom C-STORE; every case only reads.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import psycopg
import pytest
import requests
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from tests.conftest import ADMIN_PASSWORD, PG_ADMIN_URL, _pg_base, make_settings
from tests.matching_cases import CASES, SOP_CLASSES, STUDIES, Case
from tests.web_harness import WebServer, bearer

LEVELS = {"study": ("STUDY", "StudyInstanceUID", "/studies"),
          "series": ("SERIES", "SeriesInstanceUID", "/series"),
          "instance": ("IMAGE", "SOPInstanceUID", "/instances")}
QIDO_TAGS = {"study": "0020000D", "series": "0020000E", "instance": "00080018"}
STATUS_IDENTIFIER_MISMATCH = 0xA900


def datasets() -> tuple[list[Dataset], dict[str, str]]:
    """Every stored instance of the table, and label -> UID (studies, series, instances)."""
    out, uids = [], {}
    for study in STUDIES:
        uids[study.label] = str(generate_uid())
        for series in study.series:
            uids[series.label] = str(generate_uid())
            for n, extra in enumerate(series.instances, start=1):
                label = f"{series.label}{n}"
                uids[label] = str(generate_uid())
                ds = Dataset()
                ds.file_meta = FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
                ds.SpecificCharacterSet = study.charset
                ds.SOPClassUID = SOP_CLASSES[series.modality]
                ds.SOPInstanceUID = uids[label]
                ds.StudyInstanceUID, ds.SeriesInstanceUID = uids[study.label], uids[series.label]
                ds.Modality, ds.SeriesNumber = series.modality, series.number
                for keyword, value in {**study.attrs, **series.attrs, **extra}.items():
                    setattr(ds, keyword, value)
                ds.Rows = ds.Columns = 4
                ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
                ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
                ds.PixelRepresentation = 0
                ds.PixelData = np.arange(16, dtype="<u2").tobytes()
                out.append(ds)
    return out, uids


@dataclass
class Node:
    """The router under test: its DICOM port, its web server and the stored UIDs."""

    port: int
    web: WebServer
    headers: dict[str, str]
    uids: dict[str, str]
    labels: dict[str, str] = field(default_factory=dict)  # UID -> label

    def value(self, text: str) -> str:
        for label, uid in sorted(self.uids.items(), key=lambda kv: -len(kv[0])):
            text = text.replace("{" + label + "}", uid)
        return text

    def c_find(self, case: Case) -> frozenset[str] | int:
        """Labels C-FIND answers, or its failure status."""
        level, unique, _ = LEVELS[case.level]
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.QueryRetrieveLevel = level
        setattr(ds, unique, "")
        for keyword, text in case.keys.items():
            _set_raw(ds, keyword, self.value(text))
        ae = AE(ae_title="TABLE")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="DICOMROUTER")
        assert assoc.is_established
        found: set[str] = set()
        status = 0
        try:
            for reply, identifier in assoc.send_c_find(
                    ds, StudyRootQueryRetrieveInformationModelFind):
                status = int(reply.Status)
                if status in (0xFF00, 0xFF01):
                    found.add(self.labels[str(getattr(identifier, unique))])
        finally:
            assoc.release()
        return frozenset(found) if status == 0 else status

    def qido(self, case: Case) -> frozenset[str] | int:
        """Labels QIDO-RS answers, or its HTTP status."""
        params = {k: self.value(v) for k, v in case.keys.items()}
        r = requests.get(self.web.url + "/dicom-web" + LEVELS[case.level][2], params=params,
                         headers=self.headers, timeout=30)
        if r.status_code != 200:
            return r.status_code
        tag = QIDO_TAGS[case.level]
        return frozenset(self.labels[ds[tag]["Value"][0]] for ds in r.json())


def _set_raw(ds: Dataset, keyword: str, text: str) -> None:
    """The key as an SCU would send its text, even a value its VR does not allow (encoded
    UTF-8, as the identifier's Specific Character Set says)."""
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    raw = text.encode()
    raw += b" " * (len(raw) % 2)
    ds[tag] = RawDataElement(BaseTag(tag), None, len(raw), raw, 0, True, True)


def _store(port: int, items: list[Dataset]) -> None:
    ae = AE(ae_title="TABLE")
    ae.requested_contexts = StoragePresentationContexts[:100]
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMROUTER")
    assert assoc.is_established
    try:
        for ds in items:
            status = assoc.send_c_store(ds)
            assert status and status.Status in (0x0000, 0xB000), status
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def pg_module_url() -> Iterator[str]:
    name = f"router_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{_pg_base()}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module", params=["sqlite",
                                        pytest.param("postgres", marks=pytest.mark.postgres)])
def node(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Node]:
    """One router per backend for the module, loaded with the table's instances once."""
    from router.service import Router

    tmp = tmp_path_factory.mktemp(f"table-{request.param}")
    url = (f"sqlite:///{tmp / 'db'}" if request.param == "sqlite"
           else str(request.getfixturevalue("pg_module_url")))
    settings = make_settings(tmp, url)
    settings = replace(settings, dicom=replace(settings.dicom, open_query_retrieve=True))
    router = Router.build(settings)
    router.start()
    web = WebServer(router)
    try:
        web.start()
        items, uids = datasets()
        _store(router.dicom.port, items)
        router.runner.catch_up()
        node = Node(router.dicom.port, web, bearer(web.url, "admin", ADMIN_PASSWORD), uids,
                    {uid: label for label, uid in uids.items()})
        yield node
    finally:
        web.stop()
        router.stop()


def expected(case: Case) -> frozenset[str] | str:
    return "refused" if case.refused else case.expected


def outcome(found: frozenset[str] | int, refusal: int) -> frozenset[str] | str | int:
    return "refused" if found == refusal else found


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_c_find(node: Node, case: Case) -> None:
    assert outcome(node.c_find(case), STATUS_IDENTIFIER_MISMATCH) == expected(case)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_qido(node: Node, case: Case) -> None:
    assert outcome(node.qido(case), 400) == expected(case)


def test_every_case_asks_something(node: Node) -> None:
    """The table's own sanity: labels exist, and each level has cases."""
    labels = set(node.uids)
    for c in CASES:
        assert c.expected <= labels, c.name
    assert {c.level for c in CASES} == set(LEVELS)
