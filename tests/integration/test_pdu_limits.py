"""A peer announcing a huge PDU is dropped before anything is allocated for it, and the
listener keeps serving others (pynetdicom alone would try to read the whole PDU)."""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from dataclasses import replace
from pathlib import Path

from tests.conftest import make_settings


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Closed within ``timeout``, after at most an A-ABORT (PS3.8: an invalid PDU is answered
    with A-ABORT, then the connection is closed)."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(64):
            received += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return False
    return received in (b"", b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x02")


def test_oversized_pdu_drops_the_connection_and_the_listener_survives(
    tmp_path: Path, start_router, dcmtk
) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db'}")
    settings = replace(settings, dicom=replace(settings.dicom, max_pdu_size=16384,
                                               max_incoming_pdu=65536))
    router = start_router(settings)

    with socket.create_connection(("127.0.0.1", router.dicom.port), timeout=5) as sock:
        # A-ASSOCIATE-RQ header announcing 1 GiB, then a few bytes of it.
        sock.sendall(struct.pack(">BBL", 0x01, 0x00, 1 << 30) + b"\x00" * 64)
        started = time.monotonic()
        assert _closed_by_peer(sock, timeout=10), "the router kept reading a 1 GiB PDU"
        assert time.monotonic() - started < 10

    echo = subprocess.run(["echoscu", "-aec", "DICOMROUTER", "127.0.0.1",
                           str(router.dicom.port)], capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
