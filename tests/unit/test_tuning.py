"""What router.dicom.tuning changes in pynetdicom: the file meta we write, and the DUL wake-up
pair that must not leak descriptors."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.dsutils import create_file_meta
from pynetdicom.sop_class import CTImageStorage, Verification

from router.dicom.identity import IMPLEMENTATION_UID, IMPLEMENTATION_VERSION
from router.dicom.tuning import (
    _file_meta,
    configure_pynetdicom,
    encode_file_meta,
    received_spool,
)
from tests.integration.peers import free_port
from tests.synthetic import make_ct_series

CASES = [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.1"),  # odd, odd, odd
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.44", "1.2.840.10008.1.2"),  # even lengths
    ("1.2.840.10008.5.1.4.1.1.7", str(generate_uid()), "1.2.840.10008.1.2.4.50"),
]


@pytest.mark.parametrize(("sop_class", "sop_instance", "syntax"), CASES)
def test_file_meta_is_byte_for_byte_what_pydicom_writes(
    sop_class: str, sop_instance: str, syntax: str
) -> None:
    expected = io.BytesIO()
    write_file_meta_info(expected, create_file_meta(
        sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax,
        implementation_uid=IMPLEMENTATION_UID, implementation_version=IMPLEMENTATION_VERSION))
    ours = encode_file_meta(_file_meta(
        sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax))
    assert ours == expected.getvalue()


def _association_descriptors(port: int) -> int:
    """This process's descriptors that associations could leave: TCP sockets to or from
    ``port`` and Unix sockets (the reactors' wake-up pairs). Counting every descriptor made
    the test fail when something else in the process (a database pool of an earlier test
    closing or opening a connection) moved the count meanwhile."""
    inodes: set[str] = set()
    with open("/proc/net/unix") as table:
        next(table)
        inodes |= {fields[6] for fields in map(str.split, table) if len(fields) > 6}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as table:
            next(table)
            for fields in map(str.split, table):
                ends = (fields[1], fields[2])
                if any(int(end.rsplit(":", 1)[1], 16) == port for end in ends):
                    inodes.add(fields[9])
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor, too)
        if target.startswith("socket:[") and target[8:-1] in inodes:
            count += 1
    return count


def test_received_files_are_readable_and_associations_leave_no_descriptors(
    tmp_path: Path,
) -> None:
    """Twenty associations through the tuned reactors: every stored file parses with the
    header we wrote; each reactor used a wake-up socket pair and closed it when it ended."""
    configure_pynetdicom(tmp_path / "spool", 64 * 1024 * 1024, idle_delay=0.0005)
    stored: list[tuple[str, str]] = []
    duls: list[Any] = []
    woken: list[bool] = []

    def on_store(event: evt.Event) -> int:
        spool = received_spool(event)
        assert spool is not None
        spool.finish()
        spool.wait_durable()
        spool.close()
        ds = dcmread(spool.path)  # pynetdicom removes the file once the handler returns
        stored.append((ds.file_meta.MediaStorageSOPInstanceUID, ds.SOPInstanceUID))
        duls.append(event.assoc.dul)
        woken.append(event.assoc.dul.to_provider_queue.wake is not None)
        return 0

    scp = AE(ae_title="TUNED")
    scp.add_supported_context(CTImageStorage)
    scp.add_supported_context(Verification)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        files = make_ct_series(tmp_path / "ct", count=2, rows=16, cols=16)
        scu = AE(ae_title="SENDER")
        scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        scu.add_requested_context(Verification)

        def one_association() -> None:
            assoc = scu.associate("127.0.0.1", port, ae_title="TUNED")
            assert assoc.is_established
            for path in files:
                assert assoc.send_c_store(path).Status == 0
            assert assoc.dul.to_provider_queue.wake is not None  # the reactor's wake-up pair
            assoc.release()
            assoc.dul.join(5)
            assert assoc.dul.to_provider_queue.wake is None  # closed as the reactor ended

        one_association()  # warm up: threads and caches that live as long as the process
        before = _association_descriptors(port)
        for _ in range(20):
            one_association()
        # A socket in the middle of closing, at most.
        assert _association_descriptors(port) <= before + 2
    finally:
        server.shutdown()
    assert len(stored) == 42
    assert all(meta_uid == uid for meta_uid, uid in stored)
    assert all(woken)
    for dul in duls:
        dul.join(5)
        assert dul.to_provider_queue.wake is None


def test_what_tuning_replaces_in_pynetdicom_is_the_source_it_was_written_against(
        tmp_path: Path) -> None:
    """router.dicom.tuning keeps a few replacements inside pynetdicom, where no public
    setting does what they do. Each was written against pynetdicom 3.0.4's source: after an
    upgrade this fails until each replacement is checked against the new source (and its
    digest in PATCHED_SOURCES updated, or the replacement dropped)."""
    import pynetdicom
    from pynetdicom import association, dul

    from router.dicom import tuning

    assert pynetdicom.__version__ == tuning.PYNETDICOM_VERSION
    changed = [name for name, digest in tuning.PATCHED_SOURCES.items()
               if tuning.source_digest(name) != digest]
    assert changed == []
    tuning.configure_pynetdicom(tmp_path / "spool", 64 * 1024 * 1024, idle_delay=0.005)
    assert association.Association._run_reactor is tuning._association_reactor
    assert dul.DULServiceProvider.run_reactor is tuning._dul_reactor


def test_no_library_source_is_executed_and_no_private_name_imported() -> None:
    """The front doors (issue 17): no exec of a library's source, no private import from
    pynetdicom or eventsourcing (``_config`` is pynetdicom's documented settings module),
    none of the private attributes we once used."""
    import ast
    import re

    root = Path(__file__).resolve().parents[2]
    used = re.compile(r"\._servers\b|\._dataset_file\b|\._dataset_path\b|"
                      r"\._create_connection\b|\._sqlite_conn\b|\._run_loop_delay\b")
    found: list[str] = []
    for folder in ("router", "projections", "web"):
        for path in sorted((root / folder).rglob("*.py")):
            where = path.relative_to(root)
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                        and node.func.id in ("exec", "eval", "compile"):
                    found.append(f"{where}:{node.lineno}: {node.func.id}()")
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
                        "pynetdicom", "eventsourcing"):
                    module_private = any(part.startswith("_") and part != "_config"
                                         for part in (node.module or "").split("."))
                    names = [a.name for a in node.names
                             if a.name.startswith("_") and a.name != "_config"]
                    if module_private or names:
                        found.append(f"{where}:{node.lineno}: from {node.module} import "
                                     f"{', '.join(a.name for a in node.names)}")
            found += [f"{where}:{number}: {line.strip()}"
                      for number, line in enumerate(path.read_text().splitlines(), 1)
                      if used.search(line)]
    assert found == []


def test_the_reactor_pause_protocol_is_on_pynetdicom_associations() -> None:
    """pause_reactor and resume_reactor (storage commitment's reports on the requester's
    association) drive the reactor through the two attributes pynetdicom's Association makes
    and our reactor copy uses: fail loudly when a pynetdicom release renames them."""
    import threading

    from pynetdicom.association import Association

    from router.dicom.tuning import resume_reactor

    assoc = Association(AE(), "requestor")
    assert isinstance(assoc._reactor_checkpoint, threading.Event)
    assert assoc._is_paused is False
    assoc._reactor_checkpoint.clear()
    resume_reactor(assoc)
    assert assoc._reactor_checkpoint.is_set()
