"""The association we open to send C-STOREs (and C-ECHOs), without pynetdicom's layers.

pynetdicom's C-STORE SCU costs about as much CPU per instance as our whole receipt (a reactor
thread per association, command sets through pydicom, each fragment copied per layer). This
one is a socket and a few encoders: the dataset is streamed from the stored file straight into
P-DATA PDUs (``sendfile``: from the page cache to the socket), and the response's status is
read back on the same thread. Used by router.dispatch.dicom; Q/R and C-GET stay on pynetdicom.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from router.dicom import pdus
from router.dicom.identity import IMPLEMENTATION_UID, IMPLEMENTATION_VERSION
from router.dicom.limits import BytesSource, FileSource, HeaderError, Source, walk_meta
from router.dicom.tls import describe_failure

MAX_SEND_PDU = 4 * 1024 * 1024  # also when the peer says "unlimited"
_SENDFILE_FROM = 64 * 1024  # smaller fragments: one read and one send cost less
_HEAD = 8192  # holds the file meta of nearly every file: one read finds where the data set starts


class LinkError(Exception):
    """The association could not be opened or was lost; ``kind`` says how."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(detail or kind)
        self.kind = kind  # resolve|connect|tls|rejected|aborted|no-answer|lost|protocol
        self.detail = detail


class Rejected(LinkError):
    """A-ASSOCIATE-RJ: result (1 permanent, 2 transient), source and reason (PS3.8 9.3.4)."""

    def __init__(self, result: int, source: int, reason: int) -> None:
        super().__init__("rejected", f"result {result}, source {source}, reason {reason}")
        self.result, self.source, self.reason = result, source, reason


@dataclass(frozen=True)
class FileDataset:
    """A stored Part 10 file's data set: the bytes after its file meta."""

    path: Path
    offset: int


def dataset_offset(stored: bytes | BinaryIO) -> int | None:
    """Where the data set starts in a Part 10 file (an open file, or its bytes: enough of them
    to hold the file meta); None when the file meta cannot be walked (router.dicom.limits)."""
    if isinstance(stored, bytes):
        return _meta_end(BytesSource(stored))
    head = stored.read(_HEAD)
    offset = _meta_end(BytesSource(head))
    if offset is None and len(head) == _HEAD:  # a longer file meta (a STOW-RS or AI object's)
        offset = _meta_end(FileSource(stored))
    return offset


def _meta_end(source: Source) -> int | None:
    try:
        return walk_meta(source)[0].header_end
    except HeaderError:
        return None


class StoreLink:
    """One established association to a C-STORE SCP; one thread uses it at a time."""

    def __init__(self, sock: socket.socket, accepted: dict[tuple[str, str], int],
                 peer_max_pdu: int, timeout: float) -> None:
        self._sock = sock
        self._accepted = accepted
        # The largest P-DATA-TF body we send (the peer's "maximum length received").
        self._max_body = MAX_SEND_PDU if peer_max_pdu == 0 else min(peer_max_pdu, MAX_SEND_PDU)
        self._timeout = timeout
        self.is_established = True
        self._tls = isinstance(sock, ssl.SSLSocket)
        if self._tls:
            # OpenSSL retries a read that the kernel timed out (SO_RCVTIMEO) instead of failing:
            # Python's own timeout then, which raises TimeoutError (an OSError).
            sock.settimeout(timeout)
        else:
            pdus.set_kernel_timeouts(sock, timeout)  # a timed-out call raises an OSError

    @classmethod
    def open(cls, host: str, port: int, *, calling: str, called: str,
             pairs: list[tuple[str, str]], max_pdu: int, timeout: float,
             tls: ssl.SSLContext | None = None, server_name: str = "") -> StoreLink:
        """Connect (over TLS with ``tls``, checking the certificate against ``server_name``,
        else ``host``) and negotiate; LinkError (kind connect, tls, rejected, aborted,
        no-answer)."""
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except socket.gaierror as exc:
            raise LinkError("resolve", type(exc).__name__) from None
        except OSError as exc:
            raise LinkError("connect", type(exc).__name__) from None
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            try:
                sock = tls.wrap_socket(sock, server_hostname=server_name or host)
            except (OSError, ValueError) as exc:  # ssl.SSLError and timeouts are OSErrors
                sock.close()
                raise LinkError("tls", describe_failure(exc)) from None
        try:
            sock.sendall(pdus.encode_associate_rq(calling, called, pairs, max_pdu,
                                                  IMPLEMENTATION_UID,
                                                  IMPLEMENTATION_VERSION))
            kind, body = _read_pdu(sock)
        except (OSError, LinkError) as exc:
            sock.close()
            if isinstance(exc, LinkError) and exc.kind == "protocol":
                raise
            raise LinkError("no-answer") from None
        if kind == pdus.A_ASSOCIATE_RJ and len(body) >= 4:
            sock.close()
            raise Rejected(body[1], body[2], body[3])
        if kind == pdus.A_ABORT:
            sock.close()
            raise LinkError("aborted")
        if kind != pdus.A_ASSOCIATE_AC:
            _abort(sock)
            raise LinkError("protocol", f"PDU type 0x{kind:02X} in answer to A-ASSOCIATE-RQ")
        try:
            results, peer_max = pdus.parse_associate_ac(body)
        except pdus.PduError as exc:
            _abort(sock)
            raise LinkError("protocol", str(exc)) from None
        if 0 < peer_max < 7:  # a PDV header alone takes 6 bytes of a P-DATA-TF
            _abort(sock)
            raise LinkError("protocol", f"maximum PDU length {peer_max} leaves no room for data")
        accepted = {}
        for number, pair in enumerate(pairs):
            result = results.get(2 * number + 1)
            if result is not None and result[0] == pdus.ACCEPTED:
                accepted[(pair[0], result[1] or pair[1])] = 2 * number + 1
        return cls(sock, accepted, peer_max, timeout)

    def accepted_pairs(self) -> frozenset[tuple[str, str]]:
        """(abstract syntax, transfer syntax) of every accepted presentation context."""
        return frozenset(self._accepted)

    def accepted_syntaxes(self, sop_class_uid: str) -> set[str]:
        return {ts for (sop, ts) in self._accepted if sop == sop_class_uid}

    @property
    def socket(self) -> socket.socket:
        return self._sock

    def store(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
              dataset: FileDataset | bytes, message_id: int) -> int:
        """C-STORE one data set; the response's status. LinkError "lost" when the association
        ends or stays silent; OSError when the stored file cannot be read."""
        context_id = self._accepted[(sop_class_uid, transfer_syntax)]
        command = pdus.encode_pdata(context_id, True, pdus.encode_request(
            pdus.C_STORE_RQ, sop_class_uid, message_id, True, sop_instance_uid), self._max_body)
        if isinstance(dataset, bytes):
            self._send(command)
            self._send(pdus.encode_pdata(context_id, False, dataset, self._max_body))
        else:
            with open(dataset.path, "rb") as source:  # unreadable: OSError before any send
                self._send(command)
                try:
                    self._stream(context_id, source, dataset.offset)
                except OSError:
                    self._lost()  # half a data set was sent: the association is unusable
                    raise
        return self._response()

    def echo(self, message_id: int) -> int:
        context_id = next(number for (sop, _), number in self._accepted.items()
                          if sop == pdus.VERIFICATION)
        self._send(pdus.encode_pdata(context_id, True, pdus.encode_request(
            pdus.C_ECHO_RQ, pdus.VERIFICATION, message_id, False), self._max_body))
        return self._response()

    def release(self) -> None:
        """A-RELEASE; aborts if the peer does not answer it."""
        if not self.is_established:
            return
        self.is_established = False
        try:
            self._sock.settimeout(self._timeout)
            self._sock.sendall(struct.pack(">BBL", pdus.A_RELEASE_RQ, 0, 4) + b"\0" * 4)
            kind, _ = _read_pdu(self._sock)
            if kind != pdus.A_RELEASE_RP:
                _abort(self._sock)
        except (OSError, LinkError):
            _abort(self._sock)
        finally:
            self._sock.close()

    def abort(self) -> None:
        if self.is_established:
            self.is_established = False
            _abort(self._sock)
            self._sock.close()

    # -- internals ----------------------------------------------------------------------------

    def _send(self, data: bytes, flags: int = 0) -> None:
        try:
            self._sock.sendall(data, 0 if self._tls else flags)
        except OSError as exc:
            self._lost()
            raise LinkError("lost", type(exc).__name__) from None

    def _stream(self, context_id: int, source: BinaryIO, offset: int) -> None:
        remaining = os.fstat(source.fileno()).st_size - offset
        if remaining <= 0:
            self._send(pdus.encode_pdata(context_id, False, b"", self._max_body))
            return
        position = offset
        while remaining > 0:
            size = min(remaining, self._max_body - 6)  # >= 1: see open()
            remaining -= size
            header = struct.pack(">BBLLBB", pdus.P_DATA_TF, 0, size + 6, size + 2, context_id,
                                 2 if remaining == 0 else 0)
            if size < _SENDFILE_FROM or self._tls:  # TLS encrypts: no sendfile there
                chunk = os.pread(source.fileno(), size, position)
                if len(chunk) != size:
                    raise OSError("stored file shorter than expected")
                self._send(header + chunk)
                position += size
                continue
            self._send(header, socket.MSG_MORE)  # sent with the data that follows
            # Large fragments go from the page cache to the socket: no copy through Python.
            end = position + size
            while position < end:
                try:
                    sent = os.sendfile(self._sock.fileno(), source.fileno(), position,
                                       end - position)
                except OSError as exc:
                    self._lost()
                    raise LinkError("lost", type(exc).__name__) from None
                if sent == 0:
                    raise OSError("stored file shorter than expected")
                position += sent

    def _response(self) -> int:
        command = bytearray()
        try:
            while True:
                kind, body = _read_pdu(self._sock)
                if kind != pdus.P_DATA_TF:
                    raise LinkError("lost", f"PDU type 0x{kind:02X} instead of a response")
                for _, control, fragment in pdus.iter_pdvs(memoryview(body)):
                    if control & 1:
                        command += fragment
                        if control & 2:
                            return pdus.status_of(bytes(command))
        except (OSError, pdus.PduError, LinkError) as exc:
            self._lost()
            if isinstance(exc, LinkError) and exc.kind == "lost":
                raise
            raise LinkError("lost", type(exc).__name__) from None

    def _lost(self) -> None:
        if self.is_established:
            self.is_established = False
            _abort(self._sock)
            self._sock.close()


def _abort(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(pdus.encode_abort(0, 0))  # from the service user


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray(count)
    view, got = memoryview(data), 0
    while got < count:
        n = sock.recv_into(view[got:])
        if not n:
            raise LinkError("lost", "connection closed")
        got += n
    return bytes(data)


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    kind, _, length = struct.unpack(">BBL", _read_exactly(sock, 6))
    if length > 64 * 1024 * 1024:
        raise LinkError("protocol", f"PDU of {length} bytes")
    return kind, _read_exactly(sock, length)
