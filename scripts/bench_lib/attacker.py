"""The hostile host of ``scripts/abuse``, run in a process of its own from one loopback
address: it holds up to 1,000 silent sockets, opens and closes connections at a steady rate
(a port scan, a balancer's TCP check) and sends malformed PDUs, some before and some after an
association is accepted. Every loop stops by itself after ``duration`` seconds."""

from __future__ import annotations

import contextlib
import random
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
FIND = "1.2.840.10008.5.1.4.1.2.2.1"
EXPLICIT = "1.2.840.10008.1.2.1"


@dataclass(frozen=True)
class Attack:
    source: str
    port: int
    duration: float
    silent: int = 1000
    scans_per_second: float = 40.0
    malformed: int = 2000


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def associate_rq(abstract: str, called: str = "DICOMROUTER") -> bytes:
    body = (struct.pack(">HH", 1, 0) + called.encode().ljust(16) + b"HOSTILE".ljust(16)
            + b"\0" * 32 + _item(0x10, b"1.2.840.10008.3.1.1.1")
            + _item(0x20, b"\x01\0\0\0" + _item(0x30, abstract.encode())
                    + _item(0x40, EXPLICIT.encode()))
            + _item(0x50, _item(0x51, struct.pack(">L", 16384))))
    return struct.pack(">BBL", 1, 0, len(body)) + body


def _connect(attack: Attack, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", attack.port), timeout=timeout,
                                    source_address=(attack.source, 0))


def _drain(sock: socket.socket, timeout: float = 1.0) -> None:
    sock.settimeout(timeout)
    with contextlib.suppress(OSError):
        while sock.recv(65536):
            pass


def _garbage(kind: int, rng: random.Random) -> list[bytes]:
    """What one malformed exchange sends (each element after reading the answer)."""
    noise = rng.randbytes(rng.randint(8, 200))
    if kind == 0:
        return [noise]  # not DICOM at all
    if kind == 1:
        return [b"\x04\x00" + struct.pack(">L", len(noise)) + noise]  # P-DATA first
    if kind == 2:
        return [b"\x01\x00\xff\xff\xff\xf0" + noise]  # a 4 GiB A-ASSOCIATE-RQ
    if kind == 3:
        return [associate_rq(CT)[:40]]  # cut short, then closed
    if kind == 4:  # a storage association, then garbage inside it
        return [associate_rq(CT), b"\x09\x00" + struct.pack(">L", len(noise)) + noise]
    # a query association (pynetdicom serves those), then a broken P-DATA
    return [associate_rq(FIND), b"\x04\x00\x00\x00\x00\x03\x00\x00\x01"]


def malformed(attack: Attack, stop: threading.Event) -> int:
    rng = random.Random(15)
    interval = attack.duration / max(1, attack.malformed)
    sent = 0
    started = time.monotonic()
    while sent < attack.malformed and not stop.is_set():
        due = started + sent * interval
        if (wait := due - time.monotonic()) > 0:
            time.sleep(wait)
        with contextlib.suppress(OSError), _connect(attack) as sock:
            parts = _garbage(sent % 6, rng)
            for number, part in enumerate(parts):
                sock.sendall(part)
                if number + 1 < len(parts):
                    sock.settimeout(2)
                    sock.recv(65536)  # the A-ASSOCIATE-AC (or a refusal)
            _drain(sock, 0.5)
        sent += 1
    return sent


def scans(attack: Attack, stop: threading.Event) -> int:
    interval = 1.0 / attack.scans_per_second
    done = 0
    deadline = time.monotonic() + attack.duration
    while time.monotonic() < deadline and not stop.is_set():
        with contextlib.suppress(OSError):
            _connect(attack, timeout=1.0).close()
        done += 1
        time.sleep(interval)
    return done


def silent(attack: Attack, stop: threading.Event) -> int:
    """Keep up to ``attack.silent`` connections open, reopening those the router closes
    (at most 200 new ones a second). The most held at once is returned (and the number opened
    in all is left in ``silent.opened``)."""
    held: list[socket.socket] = []
    most = opened = 0
    deadline = time.monotonic() + attack.duration
    while time.monotonic() < deadline and not stop.is_set():
        for _ in range(min(200, attack.silent - len(held))):
            try:
                held.append(_connect(attack, timeout=1.0))
            except OSError:
                break
            opened += 1
        most = max(most, len(held))
        time.sleep(1.0)
        readable, _, _ = select.select(held, [], [], 0) if held else ([], [], [])
        for sock in readable:  # closed by the router (or refused with bytes): reopen later
            held.remove(sock)
            sock.close()
    for sock in held:
        sock.close()
    silent.opened = opened  # type: ignore[attr-defined]
    return most


def run(attack: Attack) -> dict[str, int]:
    """All three at once, for ``attack.duration`` seconds."""
    stop = threading.Event()
    results: dict[str, int] = {}

    def keep(name: str, target: object) -> threading.Thread:
        def body() -> None:
            results[name] = target(attack, stop)  # type: ignore[operator]
        thread = threading.Thread(target=body, daemon=True)
        thread.start()
        return thread

    threads = [keep("malformed_sent", malformed), keep("scans", scans),
               keep("silent_held_max", silent)]
    for thread in threads:
        thread.join(attack.duration + 30)
    stop.set()
    results["silent_opened"] = int(getattr(silent, "opened", 0))
    return results
