"""Acknowledged means deliverable (issue 15): every object the router answers 0x0000 arrives
byte-identical at a folder and at a DCMTK storescp; every object it refuses has a recorded
reason and no delivery; none is answered 0xA7xx, which would have its sender retry forever.

The corpus: pydicom's and pydicom-data's files as they are, then a fixed, derandomized set of
hostile mutations of a few of them made with hypothesis (nesting depth, element lengths, VRs,
character sets, truncation, element counts, value sizes, UIDs, SOP classes). One router and one
storescp serve the whole module; storescp runs bit preserving (``+B``: its files hold the
dataset bytes as received), so datasets are compared from the end of each file's meta on.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.sop_class import _STORAGE_CLASSES  # type: ignore[attr-defined]

from router.dicom.scp import TRANSFER_SYNTAXES
from router.dicom.store_scu import dataset_offset
from router.service import Router
from tests.conftest import make_settings
from tests.hostile import CT_IMAGE, element, nested
from tests.integration.peers import StoreScp
from tests.unit.test_header_scan import FILES

pytestmark = [pytest.mark.dcmtk, pytest.mark.usefixtures("dcmtk")]

ROUTER_AET = "DICOMROUTER"
MAX_ELEMENTS = 20_000  # lowered, so that a mutation can pass it cheaply
MAX_VALUE = 1 << 20
EXAMPLES = 150
STORAGE = frozenset(str(uid) for uid in _STORAGE_CLASSES.values())
SYNTAXES = frozenset(str(uid) for uid in TRANSFER_SYNTAXES)
# The mutations start from these: explicit and implicit VR little endian, big endian, nested
# sequences, encapsulated pixel data, an SR, a waveform.
SEEDS = ("CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "rtplan.dcm",
         "JPEG2000.dcm", "test-SR.dcm", "waveform_ecg.dcm")
OTHER_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture: a context for another class


@dataclass
class Sent:
    path: Path
    sop_instance_uid: str
    status: int
    dataset_sha256: str


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory, dcmtk: None) -> Iterator[dict[str, Any]]:
    """One router (folder and storescp destinations) and its storescp, for the module."""
    base = tmp_path_factory.mktemp("deliverable")
    with StoreScp(base / "scp", extra_args=("+B", "+xa", "+uf")) as scp:
        folder = base / "archive"
        folder.mkdir()
        settings = make_settings(base, f"sqlite:///{base / 'db'}", destinations=(
            {"name": "pacs", "type": "dicom", "host": "127.0.0.1", "port": scp.port,
             "ae_title": "STORESCP", "concurrency": 1},  # storescp serves one at a time
            {"name": "archive", "type": "file", "path": str(folder),
             # Unique per object: versions of one SOP Instance UID would share a path.
             "template": "{SOPInstanceUID}/{SeriesInstanceUID}-{StudyInstanceUID}.dcm"},
        ), rules=({"name": "everything", "destinations": ["pacs", "archive"]},))
        settings = replace(settings, ingest=replace(
            settings.ingest, max_elements=MAX_ELEMENTS, max_value_length=MAX_VALUE))
        router = Router.build(settings)
        router.start()
        try:
            yield {"router": router, "scp": scp, "folder": folder, "base": base}
        finally:
            router.stop()


# ------------------------------------------------------------------------- sending, checking


def dataset_part(path: Path) -> bytes:
    """The bytes after the file meta."""
    data = path.read_bytes()
    offset = dataset_offset(data[:1 << 16])
    if offset is None:
        with path.open("rb") as fp:
            pydicom.filereader.read_preamble(fp, False)
            pydicom.filereader._read_file_meta_info(fp)
            offset = fp.tell()
    return data[offset:]


def context_of(path: Path) -> tuple[str, str] | None:
    """The file meta's (SOP class, transfer syntax), if the router takes that context."""
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        pair = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        uid = str(meta.MediaStorageSOPInstanceUID)
    except Exception:
        return None
    return pair if pair[0] in STORAGE and pair[1] in SYNTAXES and uid else None


class Sender:
    """One association per batch of contexts; C-STORE of a Part 10 file's dataset as is."""

    def __init__(self, port: int) -> None:
        self.port = port

    def send(self, paths: list[Path]) -> list[Sent]:
        sent: list[Sent] = []
        by_context: dict[tuple[str, str], list[Path]] = {}
        for path in paths:
            context = context_of(path)
            if context is not None:
                by_context.setdefault(context, []).append(path)
        contexts = sorted(by_context)
        for start in range(0, len(contexts), 100):  # at most 128 contexts per association
            batch = contexts[start:start + 100]
            ae = AE(ae_title="HOSTILE")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
            for context in batch:
                ae.add_requested_context(*context)
            assoc = ae.associate("127.0.0.1", self.port, ae_title=ROUTER_AET)
            assert assoc.is_established
            try:
                for context in batch:
                    for path in by_context[context]:
                        one = self._one(assoc, path)
                        if one is not None:
                            sent.append(one)
            finally:
                if assoc.is_established:
                    assoc.release()
        return sent

    def _one(self, assoc: Any, path: Path) -> Sent | None:
        """The C-STORE's outcome; None when pynetdicom will not send the file at all."""
        uid = str(pydicom.filereader.read_file_meta_info(path).MediaStorageSOPInstanceUID)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                rsp = assoc.send_c_store(path)
            except (AttributeError, ValueError, UnboundLocalError):
                return None  # pynetdicom's own checks, or a context the peer did not accept
        status = int(rsp.Status) if "Status" in rsp else -1
        digest = hashlib.sha256(dataset_part(path)).hexdigest()
        return Sent(path, uid, status, digest)


def check(router: Router, scp: StoreScp, folder: Path, sent: list[Sent]) -> None:
    """Acknowledged: delivered to both, byte-identical. Refused: a reason, no job."""
    assert sent
    statuses = {s.status for s in sent}
    assert not [s for s in statuses if 0xA700 <= s <= 0xA7FF or s == -1], sorted(statuses)
    acknowledged = [s for s in sent if s.status == 0]
    db = router.view_db("jobs")
    uids = sorted({s.sop_instance_uid for s in acknowledged})
    deadline = time.monotonic() + 120
    while True:
        router.runner.catch_up()
        rows = db.query(
            "SELECT d.status, d.last_error, j.sop_instance_uid FROM deliveries d"
            " JOIN jobs j USING (job_id) WHERE j.sop_instance_uid IN (SELECT value FROM"
            " json_each(?))", (_json(uids),))
        dead = [r for r in rows if r["status"] == "dead"]
        assert not dead, dead[:5]
        done = [r for r in rows if r["status"] == "delivered"]
        if len(done) >= 2 * len(uids) and len(rows) == len(done):
            break
        assert time.monotonic() < deadline, f"{len(done)} of {2 * len(uids)} delivered"
        time.sleep(0.25)
    # storescp keeps every version (+uf); the folder path is per SOP Instance UID, so a later
    # version of a UID replaces the earlier one there (delivered in the order received).
    latest = {s.sop_instance_uid: s.dataset_sha256 for s in acknowledged}
    for where, wanted in ((folder, set(latest.values())),
                          (scp.folder, {s.dataset_sha256 for s in acknowledged})):
        found = {hashlib.sha256(dataset_part(p)).hexdigest()
                 for p in where.rglob("*") if p.is_file()}
        missing = wanted - found
        assert not missing, (where.name, [s.path.name for s in acknowledged
                                          if s.dataset_sha256 in missing][:5])
    for refused in (s for s in sent if s.status != 0):
        reasons = db.query("SELECT reason FROM receipt_failures WHERE sop_instance_uid = ?",
                           (refused.sop_instance_uid,))
        assert reasons and all(r["reason"] for r in reasons), refused.path.name
        if refused.sop_instance_uid not in latest:  # else a version of it was stored
            jobs = db.query("SELECT count(*) AS n FROM jobs WHERE sop_instance_uid = ?",
                            (refused.sop_instance_uid,))
            assert jobs[0]["n"] == 0, refused.path.name


def _json(values: list[str]) -> str:
    import json

    return json.dumps(values)


# ------------------------------------------------------------------------- bundled files


def bundled() -> list[Path]:
    """pydicom's and pydicom-data's files the router takes a context for (several share a SOP
    Instance UID with other content: they become versions)."""
    return [path for path in FILES if context_of(path) is not None]


def test_bundled_files_acknowledged_are_delivered_byte_identical(peers: dict[str, Any]) -> None:
    files = bundled()
    assert len(files) > 100
    sent = Sender(peers["router"].dicom.port).send(files)
    acknowledged = sum(1 for s in sent if s.status == 0)
    assert acknowledged > 100, [(s.path.name, hex(s.status)) for s in sent if s.status][:20]
    check(peers["router"], peers["scp"], peers["folder"], sent)


# ------------------------------------------------------------------------- hostile mutations


_counter = itertools.count(1)


def _new_uid() -> str:
    return f"2.25.{0xDEADBEEF << 64 | next(_counter) << 16 | int(time.time()) & 0xFFFF}"


class Mutable:
    """A seed file as bytes, its meta rewritten for a new SOP Instance UID, mutated in place."""

    def __init__(self, seed: Path, sop_class: str | None = None) -> None:
        meta = pydicom.filereader.read_file_meta_info(seed)
        self.syntax = UID(str(meta.TransferSyntaxUID))
        self.little = self.syntax != "1.2.840.10008.1.2.2"
        self.implicit = self.syntax == "1.2.840.10008.1.2"
        self.uid = _new_uid()
        data = seed.read_bytes()
        body = data[dataset_offset(data[:1 << 16]) or 0:]
        self.meta = meta
        self.meta.MediaStorageSOPInstanceUID = UID(self.uid)
        if sop_class:  # another class than the dataset's
            other = sop_class if sop_class != meta.MediaStorageSOPClassUID else CT_IMAGE
            self.meta.MediaStorageSOPClassUID = UID(other)
        self.body = bytearray(body)
        self.set_value(0x00080018, "UI", self.uid.encode())

    def encoded(self) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_file_meta_info(fp, self.meta, enforce_standard=True)
        return b"\0" * 128 + b"DICM" + fp.getvalue() + bytes(self.body)

    def _entries(self) -> list[tuple[int, int, int, int]]:
        """(tag, header start, value start, value end) of the top-level elements before the
        pixel data, walked here without the meta (explicit or implicit as the syntax says)."""
        entries = []
        pos, order = 0, "<" if self.little else ">"
        while pos + 8 <= len(self.body):
            group, elem = struct.unpack_from(order + "HH", self.body, pos)
            tag = group << 16 | elem
            if tag >= 0x7FE00008:
                break
            vr = bytes(self.body[pos + 4:pos + 6])
            if self.implicit:
                length, start = struct.unpack_from(order + "L", self.body, pos + 4)[0], pos + 8
            elif vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL"):
                length, start = struct.unpack_from(order + "L", self.body, pos + 8)[0], pos + 12
            else:
                length, start = struct.unpack_from(order + "H", self.body, pos + 6)[0], pos + 8
            if length == 0xFFFFFFFF:
                break  # an undefined-length sequence: mutations stay before it
            entries.append((tag, pos, start, start + length))
            pos = start + length
        return entries

    def set_value(self, tag: int, vr: str, value: bytes) -> None:
        """Replace (or insert, in tag order) a short-VR top-level element's value."""
        if len(value) % 2:
            value += b"\0" if vr == "UI" else b" "
        order = "<" if self.little else ">"
        head = struct.pack(order + "HH", tag >> 16, tag & 0xFFFF)
        head += (struct.pack(order + "L", len(value)) if self.implicit
                 else vr.encode() + struct.pack(order + "H", len(value)))
        entries = self._entries()
        for number, pos, _start, end in entries:
            if number == tag:
                self.body[pos:end] = head + value
                return
            if number > tag:
                self.body[pos:pos] = head + value
                return
        at = entries[-1][3] if entries else 0
        self.body[at:at] = head + value

    def insert_raw(self, tag: int, raw: bytes) -> None:
        """Insert encoded element bytes before the first top-level element after ``tag``."""
        entries = self._entries()
        at = next((pos for number, pos, _, _ in entries if number > tag),
                  entries[-1][3] if entries else 0)
        self.body[at:at] = raw


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, Mutable]:
    seed = Path(get_testdata_file(draw(st.sampled_from(SEEDS))))
    kind = draw(st.sampled_from([
        "nesting", "length", "vr", "charset", "truncate", "count", "value", "uid", "class",
        "none"]))
    target = Mutable(seed, OTHER_CLASS if kind == "class" else None)
    entries = target._entries()
    if kind == "nesting":
        depth = draw(st.one_of(st.integers(1, 70), st.sampled_from([200, 450, 600])))
        defined, vr = draw(st.booleans()), draw(st.sampled_from(["SQ", "UN"]))
        if target.little and not target.implicit:
            target.insert_raw(0x0040A730, nested(depth, defined, vr=vr))
        elif target.implicit:
            target.insert_raw(0x0040A730, nested(depth, defined, implicit=True))
    elif kind == "length" and entries:
        _, pos, start, end = draw(st.sampled_from(entries))
        size = start - pos
        new = draw(st.sampled_from([0, 1, end - start + 1, end - start + 2, 0xFFFF,
                                    0xFFFFFFFF, 0x7FFFFFFF]))
        order = "<" if target.little else ">"
        if size == 12:
            target.body[pos + 8:pos + 12] = struct.pack(order + "L", new)
        elif target.implicit:
            target.body[pos + 4:pos + 8] = struct.pack(order + "L", new)
        else:
            target.body[pos + 6:pos + 8] = struct.pack(order + "H", new & 0xFFFF)
    elif kind == "vr" and entries and not target.implicit:
        _, pos, _, _ = draw(st.sampled_from(entries))
        target.body[pos + 4:pos + 6] = draw(st.sampled_from(
            [b"SQ", b"UN", b"OB", b"XX", b"\0\0", b"ZZ", b"US", b"UT"]))
    elif kind == "charset":
        charset = draw(st.sampled_from([b"ISO_IR 192", b"ISO 2022 IR 87", b"GB18030", b"BOGUS",
                                        b"\\\\\\", b"ISO 2022 IR 100\\ISO 2022 IR 13"]))
        name = draw(st.binary(min_size=1, max_size=64))
        target.set_value(0x00080005, "CS", charset)
        target.set_value(0x00100010, "PN", name.replace(b"\\", b"^"))
    elif kind == "truncate":
        target.body = target.body[:draw(st.integers(0, max(len(target.body) - 1, 0)))]
    elif kind == "count":
        count = draw(st.sampled_from([MAX_ELEMENTS // 2, MAX_ELEMENTS + 1]))
        target.insert_raw(0x00090000, _private_elements(count, target))
    elif kind == "value":
        size = draw(st.sampled_from([MAX_VALUE - 2, MAX_VALUE + 2]))
        target.insert_raw(0x00091000, _private_ob(size, target))
    elif kind == "uid":
        keyword = draw(st.sampled_from([0x0020000D, 0x0020000E]))
        value = draw(st.sampled_from([b"../x", b"/etc", b"1..2", b"1.2." + b"3" * 70,
                                      b"1.02.3", b"1.2.3"]))
        target.set_value(keyword, "UI", value)
    return kind, target


def _private_elements(count: int, target: Mutable) -> bytes:
    order = "<" if target.little else ">"
    creator = element((0x0009, 0x0010), "LO", b"HOSTILE ", implicit=target.implicit)
    one = struct.pack(order + "HH", 0x0009, 0x1000)
    one += struct.pack(order + "L", 2) if target.implicit else b"LO" + struct.pack(order + "H", 2)
    return creator + (one + b"AB") * count  # one tag again and again: pydicom keeps the last


def _private_ob(size: int, target: Mutable) -> bytes:
    order = "<" if target.little else ">"
    creator = element((0x0009, 0x0010), "LO", b"HOSTILE ", implicit=target.implicit)
    head = struct.pack(order + "HH", 0x0009, 0x1001)
    head += (struct.pack(order + "L", size) if target.implicit
             else b"OB\0\0" + struct.pack(order + "L", size))
    return creator + head + b"\x5a" * size


def test_hostile_mutations_acknowledged_are_delivered_byte_identical(
        peers: dict[str, Any]) -> None:
    corpus = peers["base"] / "hostile"
    corpus.mkdir()
    written: list[Path] = []
    kinds: dict[str, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutations())
    def make(case: tuple[str, Mutable]) -> None:
        kind, target = case
        kinds[kind] = kinds.get(kind, 0) + 1
        path = corpus / f"{len(written):04d}-{kind}.dcm"
        path.write_bytes(target.encoded())
        written.append(path)

    make()
    sent = Sender(peers["router"].dicom.port).send(written)
    assert len(sent) == len(written)
    by_kind: dict[str, set[int]] = {}
    for s in sent:
        by_kind.setdefault(s.path.name.split("-", 1)[1][:-4], set()).add(s.status)
    # Each kind of mutation was tried, and both answers occur where they should.
    assert {"nesting", "truncate", "count", "value", "uid", "class"} <= set(kinds), kinds
    assert 0xC000 in by_kind["nesting"] and 0 in by_kind["none"], by_kind
    assert by_kind["class"] == {0xA900}, by_kind
    check(peers["router"], peers["scp"], peers["folder"], sent)
