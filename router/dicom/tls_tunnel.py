"""Carrying one TLS association's plaintext between the peer and a receiver.

The front door terminates TLS (the handshake never runs on a receiver's thread, and a receiver
process cannot take over a TLS session); the receiver reads and writes a local stream socket as
if it were the peer's. Pumped by the front door's selector loop without blocking: each
direction holds at most one chunk, so a slow side slows the other instead of filling memory.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import ssl
from collections.abc import Callable

CHUNK = 256 * 1024


class Tunnel:
    """TLS socket <-> local socket, until either side closes."""

    def __init__(self, tls: ssl.SSLSocket, local: socket.socket, first: bytes,
                 selector: selectors.BaseSelector,
                 on_closed: Callable[[Tunnel], None]) -> None:
        self._tls = tls
        self._local = local
        self._selector = selector
        self._on_closed = on_closed
        self._to_local = bytearray(first)  # decrypted, not yet written to the receiver
        self._to_peer = bytearray()  # from the receiver, not yet encrypted and sent
        self._peer_done = self._local_done = self._closed = False
        self._tls_wants_write = False  # a TLS read needs to write first (a key update)
        self._interest: dict[int, int] = {}
        tls.setblocking(False)
        local.setblocking(False)
        self._update()
        self._pump()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in (self._tls, self._local):
            if sock.fileno() in self._interest:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(sock)
            with contextlib.suppress(OSError):
                sock.close()
        self._interest.clear()
        self._on_closed(self)

    def _on_event(self, _mask: int) -> None:
        self._tls_wants_write = False
        self._pump()

    def _pump(self) -> None:
        try:
            while not self._closed and self._step():
                pass
        except (OSError, ssl.SSLError):
            self.close()
            return
        if self._closed:
            return
        if (self._peer_done and not self._to_local) or (self._local_done and not self._to_peer):
            self.close()
            return
        self._update()

    def _step(self) -> bool:
        """Move what can be moved without waiting; whether anything moved."""
        moved = False
        if self._to_local:
            try:
                sent = self._local.send(self._to_local)
            except (BlockingIOError, InterruptedError):
                sent = 0
            del self._to_local[:sent]
            moved |= sent > 0
        if not self._to_local and not self._peer_done:
            try:
                chunk = self._tls.recv(CHUNK)
                if chunk:
                    self._to_local += chunk
                else:
                    self._peer_done = True
                moved = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLWantWriteError:
                self._tls_wants_write = True
        if self._to_peer:
            try:
                # The same bytes are offered again after a "want" (OpenSSL requires it).
                sent = self._tls.send(self._to_peer[:CHUNK])
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                sent = 0
            del self._to_peer[:sent]
            moved |= sent > 0
        if not self._to_peer and not self._local_done:
            try:
                chunk = self._local.recv(CHUNK)
                if chunk:
                    self._to_peer += chunk
                else:
                    self._local_done = True
                moved = True
            except (BlockingIOError, InterruptedError):
                pass
        return moved

    def _update(self) -> None:
        """Watch each side for what it can do next."""
        wanted = {
            self._tls: ((selectors.EVENT_READ if not self._to_local and not self._peer_done
                         else 0)
                        | (selectors.EVENT_WRITE if self._to_peer or self._tls_wants_write
                           else 0)),
            self._local: ((selectors.EVENT_READ if not self._to_peer and not self._local_done
                           else 0) | (selectors.EVENT_WRITE if self._to_local else 0)),
        }
        for sock, events in wanted.items():
            fd = sock.fileno()
            current = self._interest.get(fd, 0)
            if events == current:
                continue
            if not events:
                self._selector.unregister(sock)
                del self._interest[fd]
            elif current:
                self._selector.modify(sock, events, self._on_event)
            else:
                self._selector.register(sock, events, self._on_event)
            if events:
                self._interest[fd] = events
