"""scripts/bench's own machinery: ports outside the ephemeral range, a start retried when its
port was taken, the exit status when a run was skipped, the PostgreSQL databases of
``--backend postgres``. Real sockets, storescp and the test PostgreSQL server, on loopback."""

from __future__ import annotations

import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from bench_lib import cli, measure, pgdb, procs, receivers

from tests.conftest import PG_ADMIN_URL


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port some other program listens on (as when it bound it after our check)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", procs.free_port()))
        sock.listen()
        yield sock.getsockname()[1]


def _exists(name: str) -> bool:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        query = "SELECT 1 FROM pg_database WHERE datname = %s"
        return conn.execute(query, (name,)).fetchone() is not None


def test_ports_are_picked_outside_the_ephemeral_range_and_never_twice() -> None:
    first, last = procs.ephemeral_range()
    ports = [procs.free_port() for _ in range(50)]
    assert all(p >= 10000 and not first <= p <= last for p in ports)
    assert len(set(ports)) == len(ports)


def test_the_ephemeral_range_is_read_from_the_kernel(tmp_path: Path) -> None:
    (tmp_path / "range").write_text("40000\t50000\n")
    assert procs.ephemeral_range(tmp_path / "range") == (40000, 50000)
    candidates = procs.port_candidates((40000, 50000))
    assert 39999 in candidates and 50001 in candidates
    assert not any(40000 <= p <= 50000 for p in candidates)


def test_no_port_is_picked_when_the_ephemeral_range_covers_them_all() -> None:
    with pytest.raises(procs.ChildFailed, match="no free port"):
        procs.free_port((1024, 65535))


def test_a_port_someone_listens_on_is_not_free(taken_port: int) -> None:
    assert not procs.port_is_free(taken_port)


@pytest.mark.dcmtk
def test_a_start_whose_port_was_taken_is_retried_with_other_ports(
    tmp_path: Path, taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = iter([taken_port])
    monkeypatch.setattr(receivers, "free_port", lambda: next(ports, None) or procs.free_port())
    scp = receivers.StoreScp()
    try:
        measure.start(scp, tmp_path / "run")
        assert scp.port != taken_port
        assert procs.dicom_echo(scp.port, scp.ae_title)
    finally:
        scp.stop()
    assert (tmp_path / "run" / "attempt-2" / "received").is_dir()


@pytest.mark.dcmtk
def test_a_start_whose_port_is_always_taken_gives_up_after_three_attempts(
    tmp_path: Path, taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    handed: list[int] = []
    monkeypatch.setattr(receivers, "free_port", lambda: handed.append(taken_port) or taken_port)
    with pytest.raises(procs.ChildFailed, match="taken at each of 3 starts"):
        measure.start(receivers.StoreScp(), tmp_path / "run")
    assert len(handed) == 3


def test_a_start_that_fails_otherwise_is_not_retried(tmp_path: Path) -> None:
    class Broken(receivers.Receiver):
        starts = 0

        def start(self, workdir: Path) -> None:
            self.starts += 1
            raise procs.ChildFailed("broken exited (1) before C-ECHO\nImportError: x")

    broken = Broken()
    with pytest.raises(procs.ChildFailed, match="before C-ECHO"):
        measure.start(broken, tmp_path / "run")
    assert broken.starts == 1


def test_the_bench_exits_1_naming_a_receiver_it_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(procs, "install_signal_handlers", lambda: None)  # pytest's, kept
    argv = ["--quick", "--only", "router", "--workloads", "small", "--cache-dir",
            str(tmp_path), "--router-command", str(tmp_path / "no-such-router")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(r"INCOMPLETE: .*1 skipped: router small from then on: .*not found", err)


def test_an_outcome_names_failed_and_skipped_runs() -> None:
    failed = measure.Run("orthanc", "ct1", 2, 500, 1, 1.0, ok=False, notes=["holds 499 of 500"])
    good = measure.Run("router", "ct1", 1, 500, 1, 1.0)
    skip = measure.Skipped("router-pg", "ct4", 3, "port taken\nlog tail")
    assert measure.outcome([good], []) is None
    line = measure.outcome([good, failed], [skip])
    assert line == ("INCOMPLETE: 1 run(s) failed: orthanc ct1 #2 (holds 499 of 500) | "
                    "1 skipped: router-pg ct4 #3: port taken")


def test_database_names_are_unique_valid_identifiers_within_63_bytes() -> None:
    name = pgdb.database_name("ct4-Router-PG-2")
    assert re.fullmatch(r"dicom_bench_ct4_router_pg_2_[0-9a-f]{8}", name)
    assert name != pgdb.database_name("ct4-Router-PG-2")
    long = pgdb.database_name("x" * 200)
    assert len(long) == 63 and re.fullmatch(r"dicom_bench_x+_[0-9a-f]{8}", long)


def test_a_database_url_keeps_the_admin_urls_server_and_options() -> None:
    url = pgdb.database_url("postgresql://pg@db.local:6543/postgres?sslmode=require", "b_1")
    assert url == "postgresql://pg@db.local:6543/b_1?sslmode=require"


@pytest.mark.postgres
def test_a_run_database_is_created_and_dropped_even_with_sessions_open() -> None:
    name, url = pgdb.create(PG_ADMIN_URL, "ct1-router-pg-1")
    try:
        assert _exists(name) and name in pgdb.live()
        with psycopg.connect(url) as session:  # a router killed mid-run leaves sessions
            session.execute("CREATE TABLE t (x int)")
            session.commit()
            pgdb.drop(name)
        assert not _exists(name) and name not in pgdb.live()
    finally:
        assert pgdb.drop_all() == []
    assert not _exists(name)


@pytest.mark.postgres
@pytest.mark.dcmtk
def test_a_router_that_fails_to_start_leaves_no_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    created: list[str] = []
    create = pgdb.create

    def recording(admin: str, label: str) -> tuple[str, str]:
        name, url = create(admin, label)
        created.append(name)
        return name, url

    monkeypatch.setattr(pgdb, "create", recording)
    router = receivers.Router(Path("/bin/false"), name="router-pg", postgres=PG_ADMIN_URL)
    with pytest.raises(procs.ChildFailed, match="exited"):
        measure.start(router, tmp_path / "small-router-pg-1")
    assert router.database is None and len(created) == 1
    assert created[0].startswith("dicom_bench_small_router_pg_1_")
    assert not _exists(created[0]) and created[0] not in pgdb.live()


def test_node_counts_imply_postgresql_and_s3_for_the_whole_run() -> None:
    args = cli.parse_args(["--nodes", "1,2,3", "--only", "router"])
    assert (args.nodes, args.backend, args.blob_store) == ([1, 2, 3], "postgres", "s3")
    assert list(cli._receivers(args)) == ["router-pg-s3x1", "router-pg-s3x2", "router-pg-s3x3"]
    one = cli.parse_args(["--nodes", "1", "--blob-store", "s3", "--backend", "postgres"])
    assert list(cli._receivers(one))[-1] == "router-pg-s3x1"
    default = cli.parse_args(["--only", "orthanc,router"])
    assert list(cli._receivers(default)) == ["orthanc", "router"]
    for wrong in (["--nodes", "2", "--backend", "sqlite"], ["--nodes", "2", "--blob-store",
                                                              "local"], ["--nodes", "0"]):
        with pytest.raises(SystemExit):
            cli.parse_args(wrong)


@pytest.mark.postgres
@pytest.mark.dcmtk
def test_two_nodes_share_one_database_and_one_s3_store_and_split_the_associations(
    tmp_path: Path,
) -> None:
    """The bench's own --nodes 2 receiver, started for real: each node gets one of the two
    associations, every instance reaches the sink, and nothing is left running or stored."""
    from bench_lib import cluster, workloads

    from tests.synthetic import make_ct_series

    command = Path(sys.executable).with_name("dicom-router")
    if not cluster.moto_tool().exists():
        pytest.skip("moto[server] is not installed")
    files = make_ct_series(tmp_path / "ct", 6, rows=64, cols=64)
    nodes = cluster.Nodes(command, "router-pg-s3x2", PG_ADMIN_URL, 2)
    try:
        measure.start(nodes, tmp_path / "small-router-pg-s3x2-1")
        assert len(set(nodes.ports)) == 2 and len(nodes.pids) == 2
        database, moto = nodes.database, nodes.moto
        assert database is not None and moto is not None and moto.child is not None
        children = [*nodes.children, moto.child, nodes.sink.child]
        before = nodes.side_cpu()
        assert set(before) == {"postgres", "moto"}
        sent = workloads.send(files, nodes.ports, nodes.ae_title, 2, tmp_path / "send")
        assert not sent.failures
        assert measure._wait_delivered(nodes, len(files), sent) is not None
        by_node = cluster.wait_for_jobs(nodes, len(files))
        assert by_node == {"node-1": 3, "node-2": 3}
        logs = [(tmp_path / "send" / f"storescu-{n}.log").exists() for n in (0, 1)]
        assert logs == [True, True]
    finally:
        nodes.stop()
    assert not _exists(database) and database not in pgdb.live()
    assert all(c is not None and not c.alive() for c in children)
