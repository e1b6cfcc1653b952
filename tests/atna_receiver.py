"""A small syslog receiver for the ATNA tests: RFC 5425 (TLS, octet counting) or RFC 5426
(UDP), on 127.0.0.1, keeping every message it got. ``crash_after`` makes a TLS receiver die
abruptly (connection reset, nothing acknowledged) once it holds that many messages."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
from pathlib import Path


class SyslogReceiver:
    def __init__(self, transport: str, certificate: Path | None = None,
                 private_key: Path | None = None, port: int = 0,
                 crash_after: int | None = None) -> None:
        self.transport = transport
        self.port = port
        self.crash_after = crash_after
        self.messages: list[bytes] = []
        self.crashed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._open: list[socket.socket] = []
        self._context: ssl.SSLContext | None = None
        if transport == "tls":
            assert certificate is not None and private_key is not None
            self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._context.load_cert_chain(str(certificate), str(private_key))
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> SyslogReceiver:
        kind = socket.SOCK_DGRAM if self.transport == "udp" else socket.SOCK_STREAM
        sock = socket.socket(socket.AF_INET, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        if kind == socket.SOCK_STREAM:
            sock.listen(16)
        sock.settimeout(0.2)
        self._sock = sock
        self._stop.clear()
        target = self._udp if self.transport == "udp" else self._accept
        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for sock in [*self._open, self._sock]:
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self._open.clear()

    def received(self) -> list[bytes]:
        with self._lock:
            return list(self.messages)

    def _udp(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append(data)

    def _accept(self) -> None:
        assert self._sock is not None and self._context is not None
        while not self._stop.is_set():
            try:
                raw, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            raw.settimeout(5)
            self._open.append(raw)
            try:
                tls = self._context.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError):
                continue
            self._open.append(tls)
            self._read(tls)

    def _read(self, tls: ssl.SSLSocket) -> None:
        buffer = b""
        while not self._stop.is_set():
            try:
                chunk = tls.recv(65536)
            except (OSError, ssl.SSLError):
                return
            if not chunk:  # the sender's close_notify: acknowledge by closing in turn
                with contextlib.suppress(OSError, ssl.SSLError):
                    tls.unwrap().close()
                return
            buffer += chunk
            while b" " in buffer[:12]:
                length, rest = buffer.split(b" ", 1)
                if len(rest) < int(length):
                    break
                with self._lock:
                    self.messages.append(rest[:int(length)])
                    count = len(self.messages)
                buffer = rest[int(length):]
                if self.crash_after is not None and count >= self.crash_after:
                    self._crash(tls)
                    return

    def _crash(self, tls: ssl.SSLSocket) -> None:
        """Die as a killed process would with data unread: a reset, no acknowledgement."""
        self.crashed = True
        self._stop.set()
        with contextlib.suppress(OSError):
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            tls.close()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
