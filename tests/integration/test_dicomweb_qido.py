"""QIDO-RS against the running router: studies sent with DCMTK storescu (two of pydicom's files
and synthetic studies with chosen names, dates, times and hostile text), searched with
dicomweb-client and raw requests at every level, with every filter form, includefield, paging,
errors, the reverse-proxy prefix and the access log. The same searches run on PostgreSQL.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.uid import CTImageStorage

from projections.runner import drop_view, ensure_schema, process_batch
from projections.studies import StudiesView
from router.application.commands import Actor
from tests.conftest import ADMIN_PASSWORD, make_settings
from tests.integration.test_pipeline import storescu
from tests.synthetic import make_ct_series, make_small_instances
from tests.web_harness import WebServer, bearer
from web.routes import TABLE_KEY

pytestmark = pytest.mark.dcmtk
MEDIA = "application/dicom+json"
HOSTILE_DESCRIPTION = "<script>alert(1)</script>"
HOSTILE_SERIES = "../../etc/passwd"
STUDY_KEYS = ("00080020", "00080030", "00080050", "00080056", "00080061", "00081190",
              "00100010", "00100020", "00100030", "00100040", "0020000D", "00200010",
              "00201206", "00201208")
SERIES_KEYS = ("00080060", "0008103E", "00081190", "0020000E", "00200011", "00201209",
               "00080056")
INSTANCE_KEYS = ("00080016", "00080018", "00080056", "00081190", "00200013", "00280010",
                 "00280011", "00280100")


def restyle(paths: list[Path], per_file: dict[str, Any] | None = None, **attrs: Any) -> None:
    """Set attributes on files written by tests/synthetic.py (``per_file`` values are lists,
    one per file)."""
    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        for keyword, value in {**attrs, **{k: v[i] for k, v in (per_file or {}).items()}
                               }.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)


@dataclass
class Data:
    files: list[Path]
    studies: dict[str, str] = field(default_factory=dict)  # label -> Study Instance UID
    series: dict[str, str] = field(default_factory=dict)
    instances: dict[str, list[str]] = field(default_factory=dict)


def make_data(folder: Path) -> Data:
    """Three synthetic studies (A: CT + MR series, B and C: MR) and CT_small, MR_small."""
    a_ct = make_ct_series(folder / "a_ct", count=3, rows=16, cols=16, patient_id="QIDO-A")
    study_a = str(pydicom.dcmread(a_ct[0]).StudyInstanceUID)
    a_mr = make_small_instances(folder / "a_mr", count=2, rows=8, cols=8, study_uid=study_a,
                                patient_id="QIDO-A")
    common_a = {"PatientName": "Doe^Jane", "StudyDate": "20240115", "StudyTime": "093000",
                "AccessionNumber": "ACC_1%", "StudyDescription": HOSTILE_DESCRIPTION,
                "TimezoneOffsetFromUTC": "+0100"}
    restyle(a_ct, SeriesDescription=HOSTILE_SERIES, **common_a,
            per_file={"AcquisitionDateTime": ["20240115093000", "20240115093100.5",
                                              "20240115093200+0100"]})
    restyle(a_mr, SeriesNumber=2, PerformedProcedureStepStartDate="20240115",
            PerformedProcedureStepStartTime="0945", **common_a)
    b = make_small_instances(folder / "b", count=2, rows=8, cols=8, patient_id="QIDO-B")
    restyle(b, PatientName="DOE^JOHN", StudyDate="20240120", StudyTime="1530",
            AccessionNumber="ACC11")
    c = make_small_instances(folder / "c", count=1, rows=8, cols=8, patient_id="QIDO-C")
    restyle(c, PatientName="Smith^Ann", StudyDate="20231231", StudyTime="23",
            AccessionNumber="C1", ReferringPhysicianName="who^ever")
    pyfiles = [Path(get_testdata_file(n, download=False)) for n in ("CT_small.dcm",
                                                                     "MR_small.dcm")]
    data = Data([*a_ct, *a_mr, *b, *c, *pyfiles])
    for label, paths in (("A_CT", a_ct), ("A_MR", a_mr), ("B", b), ("C", c),
                         ("CT_small", pyfiles[:1]), ("MR_small", pyfiles[1:])):
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        data.studies[label.removesuffix("_CT").removesuffix("_MR")] = str(
            headers[0].StudyInstanceUID)
        data.series[label] = str(headers[0].SeriesInstanceUID)
        data.instances[label] = [str(h.SOPInstanceUID) for h in headers]
    return data


@dataclass
class Qido:
    server: WebServer
    headers: dict[str, str]
    data: Data

    @property
    def client(self) -> DICOMwebClient:
        return DICOMwebClient(url=self.server.url + "/dicom-web", headers=self.headers)

    def get(self, path: str, params: Any = None, **kwargs: Any) -> requests.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return requests.get(self.server.url + "/dicom-web" + path, params=params,
                            headers=headers, timeout=30, **kwargs)

    def found(self, path: str, params: Any = None) -> set[str]:
        """Labels of the studies / series / instances a search returns."""
        r = self.get(path, params)
        assert r.status_code == 200, r.text
        if "instances" in path:
            tag = "00080018"
            labels = {uid: f"{label}#{i}" for label, uids in self.data.instances.items()
                      for i, uid in enumerate(uids)}
        elif path.endswith("series"):
            tag, labels = "0020000E", {uid: k for k, uid in self.data.series.items()}
        else:
            tag, labels = "0020000D", {uid: k for k, uid in self.data.studies.items()}
        uids = [ds[tag]["Value"][0] for ds in r.json()]
        assert len(uids) == len(set(uids)) and set(uids) <= set(labels), uids
        return {labels[uid] for uid in uids}


def start(tmp: Path, database_url: str) -> tuple[Any, WebServer]:
    from router.service import Router

    router = Router.build(make_settings(tmp, database_url))
    router.start()
    server = WebServer(router)
    server.start()
    return router, server


@contextmanager
def loaded(tmp: Path, database_url: str) -> Iterator[Qido]:
    router, server = start(tmp, database_url)
    try:
        data = make_data(tmp / "files")
        storescu(router.dicom.port, data.files)
        router.runner.catch_up()
        yield Qido(server, bearer(server.url, "admin", ADMIN_PASSWORD), data)
    finally:
        server.stop()
        router.stop()


@pytest.fixture(scope="module")
def qido(tmp_path_factory: pytest.TempPathFactory, dcmtk: None) -> Iterator[Qido]:
    """One router for the module (SQLite), loaded once: the searches only read."""
    tmp = tmp_path_factory.mktemp("qido")
    with loaded(tmp, f"sqlite:///{tmp / 'db'}") as q:
        yield q


def check_matching(q: Qido) -> None:
    """Every filter form at every level (run on both backends)."""
    s = q.data.studies
    # Person names: case-insensitive, exact or with wildcards; keyword or tag.
    assert q.found("/studies", {"PatientName": "doe*"}) == {"A", "B"}
    assert q.found("/studies", {"PatientName": "DOE^JANE"}) == {"A"}
    assert q.found("/studies", {"PatientName": "d?e^j*"}) == {"A", "B"}
    assert q.found("/studies", {"00100010": "*ann"}) == {"C"}
    assert q.found("/studies", {"ReferringPhysicianName": "WHO^EVER"}) == {"C"}
    # Other text is case-sensitive; _ and % are literal characters, * and ? wildcards.
    assert q.found("/studies", {"PatientID": "QIDO-A"}) == {"A"}
    assert q.found("/studies", {"PatientID": "qido-a"}) == set()
    assert q.found("/studies", {"AccessionNumber": "ACC_1%"}) == {"A"}
    assert q.found("/studies", {"AccessionNumber": "ACC_1*"}) == {"A"}
    assert q.found("/studies", {"AccessionNumber": "ACC1?"}) == {"B"}
    assert q.found("/studies", {"PatientID": "QIDO-*", "AccessionNumber": "*"}) == {
        "A", "B", "C"}
    # Dates, times, date-times: single values and ranges (open on either side).
    assert q.found("/studies", {"StudyDate": "20240115"}) == {"A"}
    assert q.found("/studies", {"StudyDate": "20240101-20240131"}) == {"A", "B"}
    assert q.found("/studies", {"00080020": "20240116-"}) == {"B"}
    assert q.found("/studies", {"StudyDate": "-20231231"}) == {"C", "CT_small", "MR_small"}
    assert q.found("/studies", {"StudyTime": "0930-1000", "PatientID": "QIDO*"}) == {"A"}
    assert q.found("/studies", {"StudyTime": "15", "PatientID": "QIDO*"}) == {"B"}
    assert q.found("/studies", {"StudyTime": "2300-2359"}) == {"C"}
    # UID lists, comma or backslash; modalities of any series of the study.
    assert q.found("/studies", {"StudyInstanceUID": f"{s['A']},{s['B']}"}) == {"A", "B"}
    assert q.found("/studies", {"0020000D": f"{s['C']}\\{s['B']}"}) == {"B", "C"}
    assert q.found("/studies", {"ModalitiesInStudy": "CT"}) == {"A", "CT_small"}
    assert q.found("/studies", {"ModalitiesInStudy": "CT\\MR", "PatientID": "QIDO*"}) == {
        "A", "B", "C"}
    # Series: of a study or of any study (matching study attributes too).
    assert q.found(f"/studies/{s['A']}/series") == {"A_CT", "A_MR"}
    assert q.found(f"/studies/{s['A']}/series", {"Modality": "MR"}) == {"A_MR"}
    assert q.found(f"/studies/{s['A']}/series", {"SeriesNumber": "2"}) == {"A_MR"}
    assert q.found("/series", {"PatientID": "QIDO-A", "Modality": "CT,MR"}) == {"A_CT", "A_MR"}
    assert q.found("/series", {"PerformedProcedureStepStartDate": "20240101-"}) == {"A_MR"}
    assert q.found("/series", {"SeriesDescription": "*passwd"}) == {"A_CT"}
    # Instances: of a series, of a study, of any study.
    a_ct = f"/studies/{s['A']}/series/{q.data.series['A_CT']}/instances"
    assert q.found(a_ct) == {"A_CT#0", "A_CT#1", "A_CT#2"}
    assert q.found(a_ct, {"InstanceNumber": "2"}) == {"A_CT#1"}
    assert q.found(f"/studies/{s['A']}/instances", {"Modality": "MR"}) == {"A_MR#0", "A_MR#1"}
    assert q.found("/instances", {"SOPClassUID": CTImageStorage, "PatientName": "doe*"}) == {
        "A_CT#0", "A_CT#1", "A_CT#2"}
    assert q.found("/instances", {"AcquisitionDateTime": "20240115093030-20240115093130"}
                   ) == {"A_CT#1"}
    assert q.found("/instances", {"0008002A": "2024"}) == {"A_CT#0", "A_CT#1", "A_CT#2"}
    sop = q.data.instances["B"][1]
    assert q.found("/instances", {"SOPInstanceUID": sop}) == {"B#1"}


def test_every_level_with_every_filter_form(qido: Qido) -> None:
    check_matching(qido)


def all_elements(datasets: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for ds in datasets:
        assert list(ds) == sorted(ds) and all(re.fullmatch(r"[0-9A-F]{8}", t) for t in ds)
        yield from ds.items()


def test_required_return_attributes_each_with_a_value(qido: Qido) -> None:
    r = qido.get("/studies", {"PatientID": "QIDO-A"})
    assert r.status_code == 200 and r.headers["Content-Type"] == MEDIA
    (study,) = r.json()
    assert set(STUDY_KEYS) <= set(study)
    for _, element in all_elements(r.json()):
        assert element["Value"] and None not in element["Value"]
    assert study["00080061"]["Value"] == ["CT", "MR"]
    assert study["00201206"]["Value"] == [2] and study["00201208"]["Value"] == [5]
    assert study["00080056"]["Value"] == ["ONLINE"]
    assert study["00100010"]["Value"] == [{"Alphabetic": "Doe^Jane"}]
    assert study["00080201"]["Value"] == ["+0100"]
    assert study["00081030"]["Value"] == [HOSTILE_DESCRIPTION]  # data, JSON-escaped by rule
    uid = qido.data.studies["A"]
    assert study["00081190"]["Value"] == [f"/dicom-web/studies/{uid}"]

    series = qido.get(f"/studies/{uid}/series").json()
    assert all(set(SERIES_KEYS) <= set(ds) for ds in series)
    assert all("00100010" not in ds for ds in series)  # the study is fixed by the URL
    mr = next(ds for ds in series if ds["00080060"]["Value"] == ["MR"])
    assert mr["00400244"]["Value"] == ["20240115"] and mr["00201209"]["Value"] == [2]
    assert mr["00081190"]["Value"][0].endswith(f"/series/{qido.data.series['A_MR']}")
    across = qido.get("/series", {"PatientID": "QIDO-A"}).json()
    assert all({"00100010", "00201208", "0020000D"} <= set(ds) for ds in across)

    instances = qido.get("/instances", {"PatientID": "QIDO-A", "Modality": "CT"}).json()
    assert len(instances) == 3 and all(set(INSTANCE_KEYS) <= set(ds) for ds in instances)
    assert {ds["00280010"]["Value"][0] for ds in instances} == {16}
    for _, element in all_elements(series + across + instances):
        assert element["Value"] and None not in element["Value"]


def test_dicomweb_client_searches_each_level(qido: Qido) -> None:
    client, s = qido.client, qido.data.studies
    studies = client.search_for_studies(search_filters={"PatientName": "doe*"},
                                        fields=["StudyDescription"])
    assert {ds["0020000D"]["Value"][0] for ds in studies} == {s["A"], s["B"]}
    everything = client.search_for_studies(get_remaining=True, limit=2)
    assert len(everything) == len(s)
    series = client.search_for_series(s["A"], search_filters={"Modality": "CT"})
    assert [ds["0020000E"]["Value"][0] for ds in series] == [qido.data.series["A_CT"]]
    instances = client.search_for_instances(s["A"], qido.data.series["A_MR"])
    assert len(instances) == 2
    anywhere = client.search_for_instances(search_filters={"PatientID": "QIDO-C"})
    assert [ds["00080018"]["Value"][0] for ds in anywhere] == qido.data.instances["C"]


def test_includefield_repeated_comma_separated_and_all(qido: Qido) -> None:
    params = [("PatientID", "QIDO-A"), ("includefield", "00100021,SeriesDescription"),
              ("includefield", "StudyDescription")]
    (ds,) = qido.get("/studies", params).json()
    assert "00081030" in ds
    r = qido.get("/studies", {"PatientID": "QIDO-A", "includefield": "all"})
    assert "00100030" in r.json()[0] and "Warning" not in r.headers
    r = qido.get("/studies", {"PatientID": "QIDO-A", "includefield": "Modality,PatientAge"})
    assert r.status_code == 200
    assert "Modality, PatientAge" in r.headers["Warning"] and r.headers["Warning"][:4] == "299 "
    r = qido.get("/studies/" + qido.data.studies["A"] + "/series",
                 {"includefield": "PatientName,00080021"})
    assert all("00100010" in ds and "00080021" in ds for ds in r.json())
    r = qido.get("/studies", {"includefield": "NoSuchAttribute"})
    assert r.status_code == 400 and "NoSuchAttribute" in r.json()["error"]["message"]


def test_limit_offset_and_the_warning_when_results_are_cut(qido: Qido) -> None:
    total = len(qido.data.studies)
    r = qido.get("/studies", {"limit": 2})
    assert len(r.json()) == 2 and "additional results" in r.headers["Warning"]
    seen = []
    for offset in range(0, total, 2):
        page = qido.get("/studies", {"limit": 2, "offset": offset})
        seen += [ds["0020000D"]["Value"][0] for ds in page.json()]
    assert sorted(seen) == sorted(qido.data.studies.values())
    last = qido.get("/studies", {"limit": 2, "offset": total - 2})
    assert "Warning" not in last.headers
    assert qido.get("/studies", {"offset": total}).json() == []
    r = qido.get("/studies", {"limit": 5000})
    assert r.status_code == 200 and "maximum of 1000" in r.headers["Warning"]


@pytest.mark.parametrize(("path", "params", "message"), [
    ("/studies", {"NoSuchKey": "1"}, "unknown query parameter"),
    ("/studies", {"PatientAge": "054Y"}, "not supported as a matching key"),
    ("/studies", {"StudyDate": "2024-01-15"}, "StudyDate"),
    ("/studies", {"StudyDate": "20240115-2024"}, "date range"),
    ("/studies", {"StudyTime": "9am"}, "StudyTime"),
    ("/studies", {"StudyInstanceUID": "1.2.*"}, "wildcards are not allowed"),
    ("/studies", {"StudyInstanceUID": "1.2,,1.3"}, "list"),
    ("/studies", {"NumberOfStudyRelatedInstances": "5"}, "return key"),
    ("/series", {"SeriesNumber": "two"}, "whole number"),
    ("/studies", {"Modality": "CT"}, "cannot be matched in a study search"),
    ("/instances", {"NumberOfFrames": "1-2"}, "whole number"),
    ("/studies", {"limit": "0"}, "limit"),
    ("/studies", {"offset": "-1"}, "offset"),
    ("/studies", {"fuzzymatching": "maybe"}, "fuzzymatching"),
    ("/studies", [("PatientID", "A"), ("PatientID", "B")], "more than once"),
])
def test_bad_query_parameters_are_400_with_a_clear_message(qido: Qido, path: str, params: Any,
                                                           message: str) -> None:
    r = qido.get(path, params)
    assert r.status_code == 400 and message in r.json()["error"]["message"]


def test_unknown_study_or_series_is_404_and_access_needs_the_permission(qido: Qido) -> None:
    s = qido.data.studies
    assert qido.get("/studies/1.2.3.4/series").status_code == 404
    r = qido.get(f"/studies/{s['A']}/series/1.2.3.4/instances")
    assert r.status_code == 404 and "series" in r.json()["error"]["message"]
    assert qido.get("/studies/1.2.3.4/instances").status_code == 404
    assert qido.get("/studies/" + "9" * 65 + "/series").status_code == 400
    anonymous = requests.get(qido.server.url + "/dicom-web/studies", timeout=30)
    assert anonymous.status_code == 401 and "Bearer" in anonymous.headers["WWW-Authenticate"]
    assert qido.get("/studies", headers=user(qido, "qido-rad", "radiologist")).status_code == 200
    assert qido.get("/instances", headers=user(qido, "qido-aud", "auditor")).status_code == 403


OURS = ("web.dicomweb.qido", "web.dicomweb.wado", "web.dicomweb.wado_pixels",
        "web.dicomweb.wado_uri")


def user(q: Qido, name: str, role: str) -> dict[str, str]:
    if q.server.router.users.get(name) is None:
        q.server.router.users.add(name, role, "a long enough password", Actor("admin"))
    return bearer(q.server.url, name, "a long enough password")


def test_every_read_route_needs_a_session_and_studies_read(qido: Qido) -> None:
    routes = [r for r in qido.server.app[TABLE_KEY] if r.handler.__module__ in OURS]
    assert len(routes) == 21 and {r.method for r in routes} == {"GET"}
    auditor = user(qido, "qido-aud", "auditor")
    for route in routes:
        assert route.permission == "studies.read"
        filled = re.sub(r"\{[^}]+\}", lambda m: "7FE00010" if "path" in m[0] else "1",
                        route.path)
        url = qido.server.url + filled
        assert requests.get(url, timeout=30).status_code == 401, route.path
        assert requests.get(url, headers=auditor, timeout=30).status_code == 403, route.path


def test_retrieve_urls_follow_the_reverse_proxy_prefix(qido: Qido) -> None:
    uid = qido.data.studies["B"]
    r = qido.get("/studies", {"StudyInstanceUID": uid},
                 headers={"X-Forwarded-Prefix": "/site-a/router/"})
    assert r.json()[0]["00081190"]["Value"] == [f"/site-a/router/dicom-web/studies/{uid}"]
    for hostile in ("https://evil.example", "/a/../b", '/x"y', "/<b>"):
        r = qido.get("/studies", {"StudyInstanceUID": uid},
                     headers={"X-Forwarded-Prefix": hostile})
        assert r.json()[0]["00081190"]["Value"] == [f"/dicom-web/studies/{uid}"]


def accesses(router: Any, action: str) -> list[Any]:
    store = router.stores.access
    events = [store.mapper.to_domain_event(n)
              for n in store.recorder.select_notifications(0, 100000)
              if n.topic.endswith("Access.Recorded")]
    return [e for e in events if e.action == action]


def test_each_search_is_one_access_record_without_phi(qido: Qido) -> None:
    router, s = qido.server.router, qido.data.studies
    before = len(accesses(router, "dicomweb.search"))
    qido.get("/studies", {"PatientName": "doe*", "PatientID": "QIDO-A"})
    qido.get(f"/studies/{s['B']}/series")
    qido.get("/studies/1.2.3.4/series")
    qido.get("/studies", {"StudyDate": "bad"})
    records = accesses(router, "dicomweb.search")[before:]
    assert len(records) == 4
    by_name, scoped, missing, bad = records
    assert by_name.patient_id == "QIDO-A" and by_name.outcome == "success"
    assert "PatientName" in by_name.detail and "doe" not in by_name.detail.lower()
    assert "returned 1" in by_name.detail and by_name.actor == "admin"
    assert scoped.study_instance_uid == s["B"] and scoped.patient_id == "QIDO-B"
    assert scoped.object_type == "series"
    assert missing.outcome == "not_found" and bad.outcome == "failure"


def test_the_studies_view_rebuilds_identically_also_from_an_older_schema(qido: Qido) -> None:
    router = qido.server.router
    db = router.view_db("studies")
    keys = {"studies": "study_instance_uid", "series": "series_instance_uid",
            "instances": "sop_instance_uid"}

    def snapshot() -> dict[str, list[dict[str, Any]]]:
        return {t: db.query(f"SELECT * FROM {t} ORDER BY {key}") for t, key in keys.items()}

    def replay() -> None:
        view = StudiesView()
        ensure_schema(view, db)
        while process_batch(view, db, router.stores.all()):
            pass

    before = snapshot()
    drop_view(StudiesView(), db)
    replay()
    assert snapshot() == before
    with db.transaction() as cur:  # what an earlier release created
        cur.execute("ALTER TABLE instances DROP COLUMN available")
    replay()
    assert snapshot() == before


@pytest.mark.postgres
def test_searches_on_postgresql(tmp_path: Path, pg_url: str, dcmtk: None) -> None:
    with loaded(tmp_path, pg_url) as q:
        check_matching(q)
        r = q.get("/studies", {"limit": 1})
        assert r.headers["Content-Type"] == MEDIA and "additional" in r.headers["Warning"]
