"""The few DICOM Upper Layer PDUs (PS3.8 section 9.3) and DIMSE command sets (PS3.7 section 9.3)
that a storage push needs, encoded and decoded without pynetdicom's object layers, for both
sides: :mod:`router.dicom.push_scp` serves associations that only store and echo,
:mod:`router.dicom.store_scu` opens them to our destinations. Everything else (query/retrieve,
role or extended negotiation, user identity) stays with pynetdicom, so this module only knows
what those associations use.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"  # the SOP class of C-ECHO

# Presentation context results (PS3.8 table 9-18).
ACCEPTED, ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 0, 3, 4

# DIMSE command fields.
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP, C_CANCEL_RQ = 0x0001, 0x8001, 0x0030, 0x8030, 0x0FFF
NO_DATASET = 0x0101


class PduError(ValueError):
    """A PDU or command set that does not follow PS3.8 / PS3.7 (the association is aborted)."""


@dataclass(frozen=True)
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class AssociateRequest:
    """What an A-ASSOCIATE-RQ asks for; ``user_items`` holds the user information sub-item
    types present (0x51 max length, 0x52 implementation UID, 0x54 role selection...)."""

    called_aet: str
    calling_aet: str
    application_context: str
    contexts: tuple[ProposedContext, ...]
    max_pdu: int  # the requestor's maximum PDU length; 0 = unlimited
    user_items: frozenset[int] = field(default_factory=frozenset)


def _uid(raw: bytes) -> str:
    return raw.decode("ascii", "replace").rstrip("\0 ")


def _ae(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip()


def _items(body: bytes, start: int) -> Iterator[tuple[int, bytes]]:
    """(type, value) of the items from ``start``: type, reserved, 2-byte length, value."""
    pos = start
    while pos < len(body):
        if pos + 4 > len(body):
            raise PduError("item header cut short")
        kind, length = body[pos], struct.unpack_from(">H", body, pos + 2)[0]
        if pos + 4 + length > len(body):
            raise PduError("item longer than its PDU")
        yield kind, body[pos + 4:pos + 4 + length]
        pos += 4 + length


def parse_associate_rq(body: bytes) -> AssociateRequest:
    """An A-ASSOCIATE-RQ's body (after the 6-byte PDU header)."""
    if len(body) < 68:
        raise PduError("A-ASSOCIATE-RQ shorter than its fixed fields")
    called, calling = _ae(body[4:20]), _ae(body[20:36])
    context_name, contexts = "", []
    max_pdu, user_items = 0, set()
    for kind, value in _items(body, 68):
        if kind == 0x10:
            context_name = _uid(value)
        elif kind == 0x20:
            if len(value) < 4:
                raise PduError("presentation context item cut short")
            abstract, syntaxes = "", []
            for sub_kind, sub_value in _items(value, 4):
                if sub_kind == 0x30:
                    abstract = _uid(sub_value)
                elif sub_kind == 0x40:
                    syntaxes.append(_uid(sub_value))
            contexts.append(ProposedContext(value[0], abstract, tuple(syntaxes)))
        elif kind == 0x50:
            for sub_kind, sub_value in _items(value, 0):
                user_items.add(sub_kind)
                if sub_kind == 0x51:
                    if len(sub_value) != 4:
                        raise PduError("maximum length sub-item is not 4 bytes")
                    max_pdu = struct.unpack(">L", sub_value)[0]
    return AssociateRequest(called, calling, context_name, tuple(contexts), max_pdu,
                            frozenset(user_items))


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBL", kind, 0, len(body)) + body


def _ae_field(title: str) -> bytes:
    return title.encode("ascii", "replace")[:16].ljust(16, b" ")


def encode_associate_ac(request: AssociateRequest, results: list[tuple[int, int, str]],
                        max_pdu: int, implementation_uid: str, implementation_version: str,
                        ) -> bytes:
    """An A-ASSOCIATE-AC: ``results`` is (context id, result, transfer syntax) per context."""
    items = [_item(0x10, APPLICATION_CONTEXT.encode())]
    for context_id, result, syntax in results:
        items.append(_item(0x21, struct.pack(">BBBB", context_id, 0, result, 0)
                           + _item(0x40, syntax.encode())))
    user = (_item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, implementation_uid.encode())
            + _item(0x55, implementation_version.encode()))
    items.append(_item(0x50, user))
    # Called and calling AE titles are returned as the requestor sent them (PS3.8 9.3.3).
    fixed = (struct.pack(">HH", 1, 0) + _ae_field(request.called_aet)
             + _ae_field(request.calling_aet) + b"\0" * 32)
    return _pdu(A_ASSOCIATE_AC, fixed + b"".join(items))


def encode_associate_rj(result: int, source: int, reason: int) -> bytes:
    return _pdu(A_ASSOCIATE_RJ, struct.pack(">BBBB", 0, result, source, reason))


def encode_release_rp() -> bytes:
    return _pdu(A_RELEASE_RP, b"\0" * 4)


def encode_abort(source: int = 2, reason: int = 0) -> bytes:
    """A-ABORT; by default from the service provider, reason not specified."""
    return _pdu(A_ABORT, struct.pack(">BBBB", 0, 0, source, reason))


def iter_pdvs(body: memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """(context id, message control header, fragment) of each PDV in a P-DATA-TF body."""
    pos, end = 0, len(body)
    while pos < end:
        if pos + 6 > end:
            raise PduError("PDV header cut short")
        length = struct.unpack_from(">L", body, pos)[0]
        if length < 2 or pos + 4 + length > end:
            raise PduError("PDV length does not fit its PDU")
        yield body[pos + 4], body[pos + 5], body[pos + 6:pos + 4 + length]
        pos += 4 + length


def encode_pdata(context_id: int, command: bool, data: bytes, max_pdu: int) -> bytes:
    """``data`` as P-DATA-TF PDUs of at most ``max_pdu`` bytes (0 = unlimited), one PDV each."""
    room = len(data) if max_pdu == 0 else max(max_pdu - 6, 1)
    pdus = []
    for start in range(0, max(len(data), 1), room):
        fragment = data[start:start + room]
        last = start + room >= len(data)
        header = (1 if command else 0) | (2 if last else 0)
        pdus.append(_pdu(P_DATA_TF, struct.pack(">LBB", len(fragment) + 2, context_id, header)
                         + fragment))
    return b"".join(pdus)


# -- command sets: implicit VR little endian, group 0000 -------------------------------------

_US_TAGS = frozenset((0x0100, 0x0110, 0x0120, 0x0700, 0x0800, 0x0900, 0x1031))
_UI_TAGS = frozenset((0x0002, 0x1000))  # Affected SOP Class / Instance UID


@dataclass(frozen=True)
class Command:
    """The fields of a request command set that a storage push uses."""

    command_field: int
    message_id: int
    dataset_type: int
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    move_originator_aet: str = ""
    move_originator_message_id: int | None = None


def decode_command(raw: bytes) -> Command:
    values: dict[int, int | str] = {}
    pos = 0
    while pos < len(raw):
        if pos + 8 > len(raw):
            raise PduError("command element header cut short")
        group, element, length = struct.unpack_from("<HHL", raw, pos)
        value = raw[pos + 8:pos + 8 + length]
        if group != 0 or len(value) != length:
            raise PduError("command set element outside group 0000 or cut short")
        if element in _US_TAGS:
            if length != 2:
                raise PduError(f"command element (0000,{element:04X}) is not a US")
            values[element] = struct.unpack("<H", value)[0]
        elif element in _UI_TAGS or element == 0x1030:
            values[element] = value.decode("ascii", "replace").strip(" \0")
        pos += 8 + length
    if 0x0100 not in values or 0x0800 not in values:
        raise PduError("command set without Command Field or Command Data Set Type")
    originator_id = values.get(0x1031)
    return Command(
        command_field=int(values[0x0100]), message_id=int(values.get(0x0110, 0)),
        dataset_type=int(values[0x0800]), sop_class_uid=str(values.get(0x0002, "")),
        sop_instance_uid=str(values.get(0x1000, "")),
        move_originator_aet=str(values.get(0x1030, "")),
        move_originator_message_id=int(originator_id) if originator_id is not None else None,
    )


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0, element, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def encode_response(command_field: int, sop_class_uid: str, responding_to: int, status: int,
                    sop_instance_uid: str | None = None) -> bytes:
    """A C-STORE-RSP or C-ECHO-RSP command set, elements in tag order."""
    body = [
        _element(0x0002, _ui(sop_class_uid)),
        _element(0x0100, struct.pack("<H", command_field)),
        _element(0x0120, struct.pack("<H", responding_to)),
        _element(0x0800, struct.pack("<H", NO_DATASET)),
        _element(0x0900, struct.pack("<H", status)),
    ]
    if sop_instance_uid is not None:
        body.append(_element(0x1000, _ui(sop_instance_uid)))
    joined = b"".join(body)
    return _element(0x0000, struct.pack("<L", len(joined))) + joined


# -- the requesting side (router/dicom/store_scu.py) ----------------------------------------


def _rq_contexts(pairs: list[tuple[str, str]]) -> bytes:
    items = []
    for number, (abstract, syntax) in enumerate(pairs):
        body = (struct.pack(">BBBB", 2 * number + 1, 0, 0, 0) + _item(0x30, abstract.encode())
                + _item(0x40, syntax.encode()))
        items.append(_item(0x20, body))
    return b"".join(items)


def encode_associate_rq(calling: str, called: str, pairs: list[tuple[str, str]],
                        max_pdu: int, implementation_uid: str,
                        implementation_version: str) -> bytes:
    """A-ASSOCIATE-RQ proposing one context per (abstract syntax, transfer syntax) pair,
    context IDs 1, 3, 5... in order."""
    user = (_item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, implementation_uid.encode())
            + _item(0x55, implementation_version.encode()))
    body = (struct.pack(">HH", 1, 0) + _ae_field(called) + _ae_field(calling) + b"\0" * 32
            + _item(0x10, APPLICATION_CONTEXT.encode()) + _rq_contexts(pairs)
            + _item(0x50, user))
    return _pdu(A_ASSOCIATE_RQ, body)


def parse_associate_ac(body: bytes) -> tuple[dict[int, tuple[int, str]], int]:
    """(context id -> (result, transfer syntax), the peer's maximum PDU) of an AC's body."""
    if len(body) < 68:
        raise PduError("A-ASSOCIATE-AC shorter than its fixed fields")
    results: dict[int, tuple[int, str]] = {}
    max_pdu = 0
    for kind, value in _items(body, 68):
        if kind == 0x21 and len(value) >= 4:
            syntax = ""
            for sub_kind, sub_value in _items(value, 4):
                if sub_kind == 0x40:
                    syntax = _uid(sub_value)
            results[value[0]] = (value[2], syntax)
        elif kind == 0x50:
            for sub_kind, sub_value in _items(value, 0):
                if sub_kind == 0x51 and len(sub_value) == 4:
                    max_pdu = struct.unpack(">L", sub_value)[0]
    return results, max_pdu


def encode_request(command_field: int, sop_class_uid: str, message_id: int, has_dataset: bool,
                   sop_instance_uid: str | None = None) -> bytes:
    """A C-STORE-RQ (priority medium) or C-ECHO-RQ command set, elements in tag order."""
    element, ui = _element, _ui
    body = [element(0x0002, ui(sop_class_uid)),
            element(0x0100, struct.pack("<H", command_field)),
            element(0x0110, struct.pack("<H", message_id))]
    if command_field == C_STORE_RQ:
        body.append(element(0x0700, struct.pack("<H", 0)))
    body.append(element(0x0800, struct.pack("<H", 0x0000 if has_dataset else NO_DATASET)))
    if sop_instance_uid is not None:
        body.append(element(0x1000, ui(sop_instance_uid)))
    joined = b"".join(body)
    return element(0x0000, struct.pack("<L", len(joined))) + joined


def status_of(raw: bytes) -> int:
    pos = 0
    while pos + 8 <= len(raw):
        group, element, length = struct.unpack_from("<HHL", raw, pos)
        if (group, element) == (0, 0x0900) and length == 2:
            return int(struct.unpack_from("<H", raw, pos + 8)[0])
        pos += 8 + length
    raise PduError("response without a Status")


def set_kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """Make ``sock`` blocking with send and receive timeouts kept by the kernel (a timed-out
    call raises BlockingIOError). Both sides use it: Python's own timeout mode polls before
    every send and read, and socket.sendfile builds a selector for every call."""
    sock.settimeout(None)
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
