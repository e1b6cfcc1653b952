"""ATNA audit messages reach a syslog receiver started by the test: over TLS (RFC 5425),
through an outage and a receiver that dies in the middle of a batch, with nothing lost and
only the batch in flight sent twice; and over UDP (RFC 5426)."""

from __future__ import annotations

import os
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from pydicom.data import get_testdata_file

from router.application.commands import Actor
from router.application.sessions import AccessRecord
from router.atna.messages import Source, message_for
from router.atna.sender import AtnaSender
from router.settings_audit import AtnaSettings
from tests.atna_receiver import SyslogReceiver
from tests.certs import TestCA
from tests.conftest import make_settings, wait_for

SCHEMA = etree.RelaxNG.from_rnc_string(
    (Path(__file__).parents[2] / "docs" / "schema" / "dicom-audit-message.rnc").read_text()
    .replace("##", "#"))  # as in tests/unit/test_atna_messages.py
HEADER = re.compile(rb"^<85>1 \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"
                    rb" (?:router-a|node-a|node-b) dicom-router \d+ IHE\+RFC-3881 -"
                    rb" \xef\xbb\xbf(<AuditMessage>.*</AuditMessage>)$",
                    re.S)


def bodies(messages: list[bytes]) -> Counter[bytes]:
    out: Counter[bytes] = Counter()
    for message in messages:
        found = HEADER.match(message)
        assert found, f"not an RFC 5424 ATNA message: {message[:120]!r}"
        out[found.group(1)] += 1
    return out


def expected(router: Any) -> Counter[bytes]:
    """The message of every audit row ATNA has an event for, built from the view; each one
    valid against the DICOM audit message schema."""
    sender: AtnaSender = router.atna
    db = router.view_db("audit")
    router.runner.catch_up()
    rows = db.query("SELECT * FROM audit ORDER BY application, position")
    source = Source("DICOMROUTER", "DICOMROUTER", "router-a")
    types = sender._destination_types()
    names = sender._destination_names({r["object_id"] for r in rows
                                       if r["action"].startswith("Delivery.")})
    rows = [{**r, "destination": names[r["object_id"]]} if r["object_id"] in names else r
            for r in rows]
    messages = Counter(x for x in (message_for(r, source, types) for r in rows)
                       if x is not None)
    for xml in messages:
        assert SCHEMA.validate(etree.fromstring(xml)), SCHEMA.error_log
    return messages


def views(router: Any, first: int, count: int) -> None:
    for i in range(first, first + count):
        router.sessions.record(Actor("dr-who", "10.1.2.3"), AccessRecord(
            action="study.view", object_type="study", object_id=f"1.2.3.{i}",
            study_instance_uid=f"1.2.3.{i}", patient_id=f"PAT{i}"))
    router.runner.wake()


def receive_and_deliver(router: Any, tmp_path: Path) -> None:
    """A rule and a folder destination, and a CT image received by storescu and delivered."""
    admin = Actor("admin", "127.0.0.1")
    (tmp_path / "archive").mkdir()
    router.commands.put_destination({"name": "archive", "type": "file",
                                     "path": str(tmp_path / "archive")}, admin)
    router.commands.put_rule({"name": "all", "calling_aet": "*",
                              "destinations": ["archive"]}, admin)
    router.runner.catch_up()
    sent = subprocess.run(["storescu", "-aet", "CT_1", "-aec", "DICOMROUTER", "127.0.0.1",
                           str(router.dicom.port),
                           get_testdata_file("CT_small.dcm", download=False)],
                          env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True,
                          text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr[-2000:]
    jobs = router.view_db("jobs")
    wait_for(lambda: jobs.query("SELECT 1 FROM deliveries WHERE status = 'delivered'"), 60,
             "the delivery to the folder")


def atna_router(start_router: Any, tmp_path: Path, atna: AtnaSettings,
                database_url: str = "") -> Any:
    settings = make_settings(tmp_path, database_url or f"sqlite:///{tmp_path / 'db'}",
                             node_id="router-a", atna=atna)
    return start_router(settings)


def test_tls_outage_loses_nothing_and_resends_at_most_the_batch_in_flight(
        tmp_path: Path, start_router: Any) -> None:
    ca = TestCA(tmp_path / "ca")
    server = ca.issue("repository", "audit-repository", hosts=("127.0.0.1",))
    receiver = SyslogReceiver("tls", server.certificate, server.private_key).start()
    port = receiver.port
    atna = AtnaSettings(host="127.0.0.1", port=port, transport="tls",
                        ca_certificates=ca.bundle, batch_size=5, retry_max=0.5, timeout=5.0)
    router = atna_router(start_router, tmp_path, atna)
    views(router, 0, 12)
    want = expected(router)
    wait_for(lambda: bodies(receiver.received()) == want, 30, "every message of the start")
    assert any(b"Application Start" in body for body in want)
    assert sum(b"110103" in body for body in want) == 12  # Instances Accessed
    first = receiver.received()

    receiver.stop()  # the repository goes away; rows keep coming
    views(router, 100, 15)
    wait_for(lambda: router.health()["atna"]["failures"] >= 2, 30,
             "failed sends during the outage")
    assert router.atna.last_error

    # It comes back, takes part of a batch and dies before acknowledging it.
    crashing = SyslogReceiver("tls", server.certificate, server.private_key, port=port,
                              crash_after=3).start()
    wait_for(lambda: crashing.crashed, 30, "the receiver crashing in a batch")
    crashing.stop()
    in_flight = bodies(crashing.received())
    views(router, 200, 4)

    again = SyslogReceiver("tls", server.certificate, server.private_key, port=port).start()
    try:
        want = expected(router)
        got = lambda: bodies(first) + in_flight + bodies(again.received())  # noqa: E731
        wait_for(lambda: not (want - got()), 60, "every message after the outage")
        received = got()
        twice = received - want
        print(f"\nATNA over TLS: {sum(want.values())} messages expected, "
              f"{sum(received.values())} received, {sum(twice.values())} twice "
              f"(the crashed batch held {sum(in_flight.values())}; batch size 5 per log)")
        assert not (received.keys() - want.keys()), "a message no audit row stands for"
        assert max(received.values()) <= 2
        assert twice <= in_flight, "only messages of the batch in flight came twice"
        assert sum(twice.values()) <= 5 * 4
    finally:
        again.stop()


def test_udp_sends_each_row_once(tmp_path: Path, start_router: Any,
                                 database_url: str) -> None:
    """On SQLite and on PostgreSQL (where the node takes the atna duty, an advisory lock)."""
    receiver = SyslogReceiver("udp").start()
    try:
        atna = AtnaSettings(host="127.0.0.1", port=receiver.port, transport="udp",
                            batch_size=50, retry_max=0.5)
        router = atna_router(start_router, tmp_path, atna, database_url)
        receive_and_deliver(router, tmp_path)
        views(router, 0, 20)
        want = expected(router)
        wait_for(lambda: bodies(receiver.received()) == want, 30, "every message over UDP")
        assert sum(want.values()) >= 20
        events = Counter(re.search(rb'<EventID csd-code="(\d+)"', body).group(1)  # type: ignore[union-attr]
                         for body in want)
        # received (110104 C), begin (110102), exported to the folder (110106), accessed
        # (110103), configuration changes (110113), the start (110100)
        assert {b"110104", b"110102", b"110106", b"110103", b"110113", b"110100"} <= set(events)
        assert router.health()["atna"]["failures"] == 0
        if router.settings.is_postgres:
            assert "atna" in router.duties.held()
        router.stop()  # the stop goes out as the last message
        got = bodies(receiver.received())
        assert got - want and all(b"110121" in body for body in got - want)
        assert max(got.values()) == 1
    finally:
        receiver.stop()


def test_positions_survive_a_restart_and_a_rebuild(tmp_path: Path, start_router: Any,
                                                   monkeypatch: Any) -> None:
    receiver = SyslogReceiver("udp").start()
    try:
        atna = AtnaSettings(host="127.0.0.1", port=receiver.port, transport="udp",
                            retry_max=0.5)
        router = atna_router(start_router, tmp_path, atna)
        views(router, 0, 5)
        wait_for(lambda: bodies(receiver.received()) == expected(router), 30, "the messages")
        router.stop()
        monkeypatch.setenv("DICOM_ROUTER_SECRET_KEY", router.settings.secret_key or "")
        monkeypatch.setenv("DICOM_ROUTER_DATABASE_URL", router.settings.database_url)
        from router.cli import main

        assert main(["--data-dir", str(router.settings.data_dir), "projections", "rebuild",
                     "audit"]) == 0
        router = atna_router(start_router, tmp_path, atna)
        views(router, 50, 3)
        want = expected(router)
        wait_for(lambda: bodies(receiver.received()) == want, 30, "the messages after restart")
        assert max(bodies(receiver.received()).values()) == 1
    finally:
        receiver.stop()


def same_row(messages: Counter[bytes]) -> Counter[bytes]:
    """Messages with the sending node's name blanked: the same row sent by either node."""
    out: Counter[bytes] = Counter()
    for body, n in messages.items():
        out[re.sub(rb'NetworkAccessPointID="(?:router-a|node-a|node-b)"',
                   b'NetworkAccessPointID="node"', body)] += n
    return out


@pytest.mark.postgres
def test_one_node_of_a_cluster_sends_and_another_takes_over(
        pg_url: str, tmp_path: Path, start_router: Any) -> None:
    receiver = SyslogReceiver("udp").start()
    try:
        atna = AtnaSettings(host="127.0.0.1", port=receiver.port, transport="udp",
                            retry_max=0.5)
        nodes = [start_router(make_settings(tmp_path / name, pg_url, node_id=name, atna=atna))
                 for name in ("node-a", "node-b")]
        views(nodes[0], 0, 10)
        views(nodes[1], 100, 10)
        want = same_row(expected(nodes[0]))
        wait_for(lambda: same_row(bodies(receiver.received())) == want, 30,
                 "every message, once")
        holders = [n for n in nodes if "atna" in n.duties.held()]
        assert len(holders) == 1
        holder = holders[0]
        other = nodes[1] if holder is nodes[0] else nodes[0]
        holder.stop()  # its stop goes out; the other node takes the duty within a second
        views(other, 200, 5)
        wait_for(lambda: "atna" in other.duties.held(), 10, "the other node taking the duty")
        audit = other.view_db("audit")
        wait_for(lambda: len(audit.query("SELECT 1 FROM audit WHERE object_id IN"
                                         " ('1.2.3.200', '1.2.3.204')")) == 2, 10,
                 "the other node building the audit view")
        want = same_row(expected(other))
        wait_for(lambda: same_row(bodies(receiver.received())) == want, 30,
                 "the other node sending from where the first stopped")
        assert max(same_row(bodies(receiver.received())).values()) == 1
    finally:
        receiver.stop()
