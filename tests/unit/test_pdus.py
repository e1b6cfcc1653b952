"""Our storage-push PDUs and command sets, checked against pynetdicom's own encoders and
decoders (an independent implementation of PS3.8 and PS3.7)."""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import build_context

from router.dicom import pdus

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"


def _request_bytes(*, role_selection: bool = False, max_pdu: int = 16384) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = pdus.APPLICATION_CONTEXT
    primitive.calling_ae_title = "MODALITY"
    primitive.called_ae_title = "DICOMROUTER"
    contexts = [build_context(CT, [EXPLICIT, IMPLICIT]), build_context(MR, [IMPLICIT])]
    for number, context in enumerate(contexts):
        context.context_id = 2 * number + 1
    primitive.presentation_context_definition_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    primitive.user_information = [length]
    if role_selection:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = CT
        role.scu_role = True
        role.scp_role = True
        primitive.user_information.append(role)
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def test_a_request_encoded_by_pynetdicom_is_parsed() -> None:
    request = pdus.parse_associate_rq(_request_bytes()[6:])
    assert (request.calling_aet, request.called_aet) == ("MODALITY", "DICOMROUTER")
    assert request.application_context == pdus.APPLICATION_CONTEXT
    assert request.contexts == (pdus.ProposedContext(1, CT, (EXPLICIT, IMPLICIT)),
                                pdus.ProposedContext(3, MR, (IMPLICIT,)))
    assert request.max_pdu == 16384
    assert 0x51 in request.user_items and 0x54 not in request.user_items
    assert 0x54 in pdus.parse_associate_rq(_request_bytes(role_selection=True)[6:]).user_items


def test_our_accept_is_decoded_by_pynetdicom() -> None:
    request = pdus.parse_associate_rq(_request_bytes()[6:])
    raw = pdus.encode_associate_ac(
        request, [(1, pdus.ACCEPTED, EXPLICIT), (3, pdus.TRANSFER_SYNTAXES_NOT_SUPPORTED,
                                                 IMPLICIT)],
        1 << 20, "1.2.3.4", "ROUTER_1")
    ac = A_ASSOCIATE_AC()
    ac.decode(raw)
    primitive = ac.to_primitive()
    assert primitive.called_ae_title == "DICOMROUTER"
    assert primitive.calling_ae_title == "MODALITY"
    results = {c.context_id: (c.result, c.transfer_syntax[0])
               for c in primitive.presentation_context_definition_results_list}
    assert results == {1: (0, EXPLICIT), 3: (4, IMPLICIT)}
    assert primitive.maximum_length_received == 1 << 20
    assert primitive.implementation_class_uid == "1.2.3.4"


def test_truncated_or_inconsistent_requests_are_refused() -> None:
    raw = _request_bytes()[6:]
    with pytest.raises(pdus.PduError):
        pdus.parse_associate_rq(raw[:40])
    with pytest.raises(pdus.PduError):
        pdus.parse_associate_rq(raw[:-3])  # the last item claims more bytes than are left


def test_a_store_request_encoded_by_pynetdicom_is_decoded() -> None:
    command = Dataset()
    command.AffectedSOPClassUID = CT
    command.CommandField = 0x0001
    command.MessageID = 7
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = "1.2.3.4.5"
    command.MoveOriginatorApplicationEntityTitle = "PACS"
    command.MoveOriginatorMessageID = 3
    raw = encode(command, True, True)
    assert raw is not None
    decoded = pdus.decode_command(raw)
    assert decoded == pdus.Command(command_field=1, message_id=7, dataset_type=0,
                                   sop_class_uid=CT, sop_instance_uid="1.2.3.4.5",
                                   move_originator_aet="PACS", move_originator_message_id=3)


@pytest.mark.parametrize("instance_uid", ["1.2.3.4.5", "1.2.3.4.56"])  # odd and even lengths
def test_our_store_response_is_what_pynetdicom_decodes(instance_uid: str) -> None:
    raw = pdus.encode_response(pdus.C_STORE_RSP, CT, 7, 0xA700, instance_uid)
    command = decode(BytesIO(raw), True, True)
    assert command.CommandField == 0x8001
    assert command.MessageIDBeingRespondedTo == 7
    assert command.Status == 0xA700
    assert command.AffectedSOPInstanceUID == instance_uid
    assert command.CommandDataSetType == pdus.NO_DATASET
    assert command.CommandGroupLength == len(raw) - 12


def test_pdata_is_split_to_the_peers_maximum_and_walked_back() -> None:
    data = bytes(range(256)) * 4
    raw = pdus.encode_pdata(5, False, data, max_pdu=206)  # 200 bytes of data per PDU
    pieces, pos = [], 0
    while pos < len(raw):
        kind, _, length = struct.unpack_from(">BBL", raw, pos)
        assert kind == pdus.P_DATA_TF and length <= 206
        pieces += list(pdus.iter_pdvs(memoryview(raw[pos + 6:pos + 6 + length])))
        pos += 6 + length
    assert [bytes(p[2]) for p in pieces] and b"".join(bytes(p[2]) for p in pieces) == data
    assert [p[1] for p in pieces] == [0] * (len(pieces) - 1) + [2]  # the last one says so
    assert {p[0] for p in pieces} == {5}


def test_a_pdv_longer_than_its_pdu_is_refused() -> None:
    with pytest.raises(pdus.PduError):
        list(pdus.iter_pdvs(memoryview(struct.pack(">LBB", 100, 1, 3) + b"xx")))


# -- the sending side (router/dicom/store_scu.py) --------------------------------------------


def test_our_association_request_is_decoded_by_pynetdicom() -> None:
    raw = pdus.encode_associate_rq("ROUTER", "PACS",
                                   [(CT, EXPLICIT), (CT, IMPLICIT), (MR, IMPLICIT)], 0,
                                   "1.2.3", "ROUTER_1")
    rq = A_ASSOCIATE_RQ()
    rq.decode(raw)
    primitive = rq.to_primitive()
    assert (primitive.calling_ae_title, primitive.called_ae_title) == ("ROUTER", "PACS")
    contexts = [(c.context_id, c.abstract_syntax, c.transfer_syntax)
                for c in primitive.presentation_context_definition_list]
    assert contexts == [(1, CT, [EXPLICIT]), (3, CT, [IMPLICIT]), (5, MR, [IMPLICIT])]
    assert primitive.maximum_length_received == 0


def test_an_accept_encoded_by_pynetdicom_is_parsed() -> None:
    request = pdus.parse_associate_rq(_request_bytes()[6:])
    # pynetdicom's decoder agreed with this encoder above; the parse must give it back.
    raw = pdus.encode_associate_ac(request, [(1, 0, EXPLICIT), (3, 3, IMPLICIT)], 32768,
                                   "1.2.3", "X")
    results, max_pdu = pdus.parse_associate_ac(raw[6:])
    assert results == {1: (0, EXPLICIT), 3: (3, IMPLICIT)} and max_pdu == 32768


@pytest.mark.parametrize("instance_uid", ["1.2.3.4.5", "1.2.3.4.56"])
def test_our_store_request_is_what_pynetdicom_decodes(instance_uid: str) -> None:
    raw = pdus.encode_request(pdus.C_STORE_RQ, CT, 9, True, instance_uid)
    command = decode(BytesIO(raw), True, True)
    assert command.CommandField == 1 and command.MessageID == 9 and command.Priority == 0
    assert command.CommandDataSetType == 0 and command.AffectedSOPClassUID == CT
    assert command.AffectedSOPInstanceUID == instance_uid
    assert command.CommandGroupLength == len(raw) - 12


def test_the_data_set_offset_is_where_pydicom_finishes_the_file_meta() -> None:
    from pydicom.data import get_testdata_file
    from pydicom.filereader import _read_file_meta_info, read_preamble

    from router.dicom.store_scu import dataset_offset

    for name in ("CT_small.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm", "rtplan.dcm"):
        with open(get_testdata_file(name), "rb") as fp:
            head = fp.read(8192)
            fp.seek(0)
            read_preamble(fp, False)
            _read_file_meta_info(fp)
            assert dataset_offset(head) == fp.tell(), name
    assert dataset_offset(b"\0" * 200) is None  # no DICM


def test_the_data_set_offset_of_a_file_meta_longer_than_one_read(tmp_path: Path) -> None:
    """A STOW-RS or AI object may carry 20 KB of Private Information in its file meta: the
    stored file is still sent as it is, from where pydicom finds its data set."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.filereader import _read_file_meta_info, read_preamble

    from router.dicom.store_scu import dataset_offset
    from router.dispatch.dicom import _dataset_offset

    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.file_meta.PrivateInformationCreatorUID = "1.2.3.4"
    ds.file_meta.PrivateInformation = b"\x5a" * 20000
    path = tmp_path / "long-meta.dcm"
    ds.save_as(path, enforce_file_format=True)
    with path.open("rb") as fp:
        read_preamble(fp, False)
        _read_file_meta_info(fp)
        expected = fp.tell()
    assert expected > 20000 and dataset_offset(path.read_bytes()[:8192]) is None
    with path.open("rb") as fp:
        assert dataset_offset(fp) == expected
    assert _dataset_offset(SimpleNamespace(path=path)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("peer_max", [7, 6])
def test_a_peer_with_a_tiny_maximum_pdu_gets_tiny_pdus_or_a_clear_refusal(
    tmp_path: Any, peer_max: int
) -> None:
    """A minimal SCP announcing a 7-byte maximum gets the data set whole, in 1-byte
    fragments, and answers; 6 bytes leave no room for data: refused at once (the fragment
    size once went to 0 there: an endless loop)."""
    import socket
    import threading

    from router.dicom.store_scu import FileDataset, LinkError, StoreLink

    data = bytes(range(40))
    stored = tmp_path / "x.dcm"
    stored.write_bytes(b"\0" * 10 + data)
    server = socket.create_server(("127.0.0.1", 0))
    received = bytearray()

    def read_pdu(conn: socket.socket) -> tuple[int, bytes]:
        kind, _, length = struct.unpack(">BBL", conn.recv(6, socket.MSG_WAITALL))
        return kind, conn.recv(length, socket.MSG_WAITALL) if length else b""

    def scp() -> None:
        conn, _ = server.accept()
        with conn:
            _, body = read_pdu(conn)
            request = pdus.parse_associate_rq(body)
            conn.sendall(pdus.encode_associate_ac(request, [(1, 0, EXPLICIT)], peer_max, "1.2",
                                                  "T"))
            if peer_max < 7:
                return
            while True:
                kind, body = read_pdu(conn)
                assert kind == pdus.P_DATA_TF and len(body) <= 7
                for _, control, fragment in pdus.iter_pdvs(memoryview(body)):
                    if not control & 1:
                        received.extend(fragment)
                        if control & 2:
                            conn.sendall(pdus.encode_pdata(1, True, pdus.encode_response(
                                pdus.C_STORE_RSP, CT, 1, 0, "1.2.3"), 0))
                            return

    thread = threading.Thread(target=scp, daemon=True)
    thread.start()
    if peer_max < 7:
        with pytest.raises(LinkError, match="leaves no room"):
            StoreLink.open("127.0.0.1", server.getsockname()[1], calling="A", called="B",
                           pairs=[(CT, EXPLICIT)], max_pdu=0, timeout=5)
        server.close()
        return
    link = StoreLink.open("127.0.0.1", server.getsockname()[1], calling="A", called="B",
                          pairs=[(CT, EXPLICIT)], max_pdu=0, timeout=5)
    assert link.store(CT, "1.2.3", EXPLICIT, FileDataset(stored, 10), 1) == 0
    link.abort()
    thread.join(5)
    server.close()
    assert bytes(received) == data
