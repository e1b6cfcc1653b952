"""Transforms on pydicom's bundled files: the basic profile's removals through dicognito and
its options, consistent pseudonyms, tag morphing in sequences and private blocks, character
set repair on real byte strings, and the validation messages of declarations."""

from __future__ import annotations

import io
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from router.application.admin_state import AdminSnapshot, DestinationState
from router.config_check import check_config
from router.dispatch.transforming import chain_for
from router.domain.rules import VersionedRule, parse_rule
from router.transforms import deid
from router.transforms.chain import TransformFailed, VersionedTransform, apply_chain
from router.transforms.charset import repair_charset
from router.transforms.paths import PathError, parse_path
from router.transforms.spec import TransformError, parse_transform

SEED = "0" * 64


def _file(name: str) -> Dataset:
    return dcmread(get_testdata_file(name, download=False))


def _run(ds: Dataset, *specs: dict[str, Any], calling_aet: str = "CT_1",
         seed: str = SEED) -> Any:
    chain = [VersionedTransform(1, parse_transform(s)) for s in specs]
    return apply_chain(ds, chain, calling_aet=calling_aet, seed_for=lambda project: seed)


def _bytes(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


DEID = {"name": "research", "kind": "deidentify", "project": "trial-7"}


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm",
                                  "JPEG2000.dcm", "SC_rgb.dcm"])
def test_basic_profile_removes_what_it_requires(name: str) -> None:
    original = _file(name)
    ds = _file(name)
    result = _run(ds, DEID)
    # Identifying values replaced (names, IDs), UIDs other than class UIDs replaced.
    assert str(ds.PatientName) != str(original.PatientName)
    assert ds.PatientID != original.PatientID
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert ds[keyword].value != original[keyword].value
    assert ds.SOPClassUID == original.SOPClassUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    # Dates shifted (Modified Dates option by default), not kept.
    if "StudyDate" in original and original.StudyDate:
        assert ds.StudyDate != original.StudyDate
    # Private elements, patient characteristics and descriptors gone.
    assert not [e for e in ds.iterall() if e.tag.is_private]
    for keyword in ("PatientAge", "PatientWeight", "PatientSize", "StudyDescription",
                    "SeriesDescription", "ImageComments"):
        assert keyword not in ds
    assert ds.get("PatientSex", "") == ""
    # The method is declared (CID 7050): the basic profile and modified dates.
    codes = [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113107"]
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"  # PS3.15 E.3.6
    # The original name and ID are nowhere in the bytes that would leave.
    sent = _bytes(ds)
    family = str(original.PatientName).split("^")[0].encode()
    assert family not in sent and original.PatientID.encode() not in sent
    project, identity = result.identities[0]
    assert project == "trial-7" and identity.patient_id == original.PatientID
    assert identity.pseudo_patient_id == ds.PatientID
    assert result.applied[0]["engine"] == deid.ENGINE


# PS3.15 Table E.1-1: attributes the basic profile removes (X) or replaces, whatever dicognito
# does with them; the Retain Device Identity / Patient Characteristics / Clean Descriptors
# options (off here) would keep some.
_E11 = (
    "MedicalAlerts ReferringPhysicianAddress ReferringPhysicianTelephoneNumbers AdmissionID "
    "ServiceEpisodeID DeviceSerialNumber TextString CurrentPatientLocation "
    "PatientInstitutionResidence PersonAddress PersonTelephoneNumbers OrderCallbackPhoneNumber "
    "OrderEntererLocation PerformedLocation RequestedProcedureLocation RequestingService "
    "ResultsComments ImagingServiceRequestComments RequestedProcedureComments Impressions "
    "IdentifyingComments ServiceEpisodeDescription TopicKeywords TopicTitle TopicSubject "
    "TopicAuthor VerifyingOrganization ScheduledProcedureStepLocation PreMedication "
    "PatientTransportArrangements DistributionName DistributionAddress "
    "InsurancePlanIdentification IssuerOfAdmissionID IssuerOfServiceEpisodeID "
    "InterpretationIDIssuer StudyIDIssuer ResultsIDIssuer HumanPerformerOrganization "
    "ModifyingDeviceID ModifyingDeviceManufacturer CommentsOnThePerformedProcedureStep "
    "DetectorID GantryID PlateID CassetteID GeneratorID DeviceLabel SourceSerialNumber "
    "DeviceDescription AcquisitionProtocolDescription StationName "
    "ConfidentialityConstraintOnPatientDataDescription InterpretationDiagnosisDescription "
    "ModifiedImageDescription PatientBirthTime OtherPatientIDs OtherPatientNames "
    "PatientBirthName PatientMotherBirthName MilitaryRank BranchOfService PatientAddress "
    "PatientTelephoneNumbers MedicalRecordLocator Occupation PatientReligiousPreference "
    "CountryOfResidence RegionOfResidence InstitutionAddress InstitutionName "
    "InstitutionalDepartmentName ReferringPhysicianName PerformingPhysicianName OperatorsName "
    "PhysiciansOfRecord NameOfPhysiciansReadingStudy RequestingPhysician ResponsiblePerson "
    "ResponsibleOrganization ConsultingPhysicianName AccessionNumber StudyID "
    "RequestedProcedureID PerformedProcedureStepID ScheduledProcedureStepID "
    "PatientComments AdditionalPatientHistory ProtocolName DataSetTrailingPadding")
E11_REMOVED = _E11.split()


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm"])
def test_no_value_the_basic_profile_removes_is_in_what_is_sent(name: str) -> None:
    """Each attribute of E11_REMOVED gets a unique value, at the top level and inside a
    sequence item; none of those values may be in the bytes that would leave."""
    ds = _file(name)
    markers: list[bytes] = []
    item = Dataset()
    for i, keyword in enumerate(E11_REMOVED):
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        vr = dictionary_VR(tag)
        for target, suffix in ((ds, "T"), (item, "S")):
            if vr == "TM":
                value: Any = f"01{i % 60:02d}0{'7' if suffix == 'T' else '8'}"
            elif vr == "OB":
                value = b"QZPAD" + suffix.encode()
            else:
                value = f"QZ{i:03d}{suffix}"
            target.add_new(tag, vr, value)
            markers.append(value if isinstance(value, bytes) else value.encode())
    ds.ReferencedStudySequence = Sequence([item])
    _run(ds, DEID)
    sent = _bytes(ds)
    leaked = [E11_REMOVED[i // 2] for i, m in enumerate(markers) if m in sent]
    assert leaked == []


def test_same_patient_same_pseudonym_across_studies_and_restarts_not_projects() -> None:
    first, second = _file("CT_small.dcm"), _file("CT_small.dcm")
    second.StudyInstanceUID = "1.2.3.4.5"  # another study of the same patient
    _run(first, DEID)
    deid._anonymizer.cache_clear()  # as after a restart: rebuilt from the seed
    _run(second, DEID)
    assert first.PatientID == second.PatientID and first.PatientName == second.PatientName
    assert first.StudyInstanceUID != second.StudyInstanceUID
    other = _file("CT_small.dcm")
    _run(other, DEID, seed="1" * 64)  # another project: another seed
    assert other.PatientID != first.PatientID


def test_options_retain_what_they_name() -> None:
    original = _file("CT_small.dcm")
    ds = _file("CT_small.dcm")
    _run(ds, {**DEID, "retain_dates": "keep", "retain_uids": True,
              "retain_device_identity": True, "retain_patient_characteristics": True,
              "retain_institution_identity": True, "clean_descriptors": True,
              "retain_private": True})
    assert ds.StudyDate == original.StudyDate and ds.ContentTime == original.ContentTime
    assert ds.StudyInstanceUID == original.StudyInstanceUID
    assert ds.SOPInstanceUID == original.SOPInstanceUID
    assert ds.StationName == original.StationName
    assert ds.InstitutionName == original.InstitutionName
    assert ds.PatientAge == original.PatientAge and ds.PatientSex == original.PatientSex
    assert ds.StudyDescription == original.StudyDescription  # nothing identifying in it
    assert [e for e in ds if e.tag.is_private]
    assert ds.PatientID != original.PatientID  # the basic profile still applies
    codes = {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113106", "113110", "113109", "113108", "113112", "113105"}
    assert ds.LongitudinalTemporalInformationModified == "UNMODIFIED"


def test_clean_descriptors_takes_the_patients_name_out_of_free_text() -> None:
    ds = _file("CT_small.dcm")
    ds.StudyDescription = "CHEST CompressedSamples follow-up"
    _run(ds, {**DEID, "clean_descriptors": True})
    assert ds.StudyDescription == "CHEST follow-up"


# -- morph -----------------------------------------------------------------------------------


def test_morph_replaces_a_wrong_patient_id_prefix_only_when_the_issuer_matches() -> None:
    fix = {"name": "fix-pid", "kind": "morph", "ops": [
        {"op": "replace", "tag": "PatientID", "pattern": "^1CT", "with": "SITEA-",
         "when": [{"tag": "InstitutionName", "equals": "JFK IMAGING CENTER"}]}]}
    ds = _file("CT_small.dcm")
    _run(ds, fix)
    assert ds.PatientID == "SITEA-1"
    other = _file("CT_small.dcm")
    other.InstitutionName = "ELSEWHERE"
    _run(other, fix)
    assert other.PatientID == "1CT1"


def test_morph_sets_institution_for_one_calling_ae_only() -> None:
    spec = {"name": "inst", "kind": "morph", "ops": [
        {"op": "set", "tag": "InstitutionName", "value": "North Clinic",
         "when": [{"calling_aet": "CT_NORTH*"}]}]}
    ds = _file("CT_small.dcm")
    result = _run(ds, spec, calling_aet="CT_NORTH_2")
    assert ds.InstitutionName == "North Clinic"
    assert result.applied[0]["changed"] == "1 element(s) changed"
    ds = _file("CT_small.dcm")
    _run(ds, spec, calling_aet="MR_SOUTH")
    assert ds.InstitutionName == "JFK IMAGING CENTER"


def test_the_two_everyday_examples_of_docs_transforms_md_do_what_it_says() -> None:
    """The TOML of docs/transforms.md's examples, as written there."""
    text = (Path(__file__).parents[2] / "docs" / "transforms.md").read_text()
    block = text.split("Two everyday examples:", 1)[1].split("```toml", 1)[1].split("```")[0]
    declared = {t["name"]: t for t in tomllib.loads(block)["transforms"]}
    fix, north = declared["fix-patient-id"], declared["north-institution"]
    ds = _file("CT_small.dcm")
    ds.PatientID, ds.IssuerOfPatientID = "OLD-123", "SITE-A"
    _run(ds, fix)
    assert ds.PatientID == "SITEA-123"
    ds.PatientID, ds.IssuerOfPatientID = "OLD-123", "SITE-B"
    _run(ds, fix)
    assert ds.PatientID == "OLD-123"
    _run(ds, north, calling_aet="CT_NORTH_2")
    assert ds.InstitutionName == "North Clinic"
    other = _file("CT_small.dcm")
    _run(other, north, calling_aet="CT_SOUTH")
    assert other.InstitutionName == "JFK IMAGING CENTER"


def test_morph_reaches_into_sequences_by_keyword_and_by_tag() -> None:
    ds = _file("rtplan.dcm")
    _run(ds, {"name": "beams", "kind": "morph", "ops": [
        {"op": "set", "tag": "BeamSequence[*].BeamName", "value": "RENAMED"},
        {"op": "set", "tag": "(300A,00B0)[0].(300A,0111)[*].(300A,011E)", "value": "90"},
        {"op": "delete", "tag": "FractionGroupSequence[*].FractionGroupNumber"},
    ]})
    assert {beam.BeamName for beam in ds.BeamSequence} == {"RENAMED"}
    assert ds.BeamSequence[0].ControlPointSequence[0].GantryAngle == 90
    assert "FractionGroupNumber" not in ds.FractionGroupSequence[0]
    # A sequence path builds the items' elements, written and read back.
    back = dcmread(io.BytesIO(_bytes(ds)))
    assert back.BeamSequence[0].BeamName == "RENAMED"


def test_morph_requested_procedure_inside_request_attributes() -> None:
    ds = _file("CT_small.dcm")
    item = Dataset()
    item.RequestedProcedureDescription = "CT HEAD wrong"
    ds.RequestAttributesSequence = Sequence([item, Dataset()])
    _run(ds, {"name": "rp", "kind": "morph", "ops": [
        {"op": "replace", "tag": "RequestAttributesSequence[*].RequestedProcedureDescription",
         "pattern": " wrong$", "with": ""},
        {"op": "copy", "from": "RequestAttributesSequence[0].RequestedProcedureDescription",
         "tag": "StudyDescription"}]})
    assert ds.RequestAttributesSequence[0].RequestedProcedureDescription == "CT HEAD"
    assert "RequestedProcedureDescription" not in ds.RequestAttributesSequence[1]
    assert ds.StudyDescription == "CT HEAD"


def test_morph_private_elements_by_creator() -> None:
    ds = _file("CT_small.dcm")
    _run(ds, {"name": "priv", "kind": "morph", "ops": [
        {"op": "replace", "tag": '(0009,"GEMS_IDEN_01",04)', "pattern": "HiSpeed",
         "with": "LowSpeed"},
        {"op": "delete", "tag": '(0019,"GEMS_ACQU_01",02)'},
        {"op": "set", "tag": '(0011,"ROUTER 1",10)', "value": "routed", "vr": "LO"},
        {"op": "delete", "tag": '(0021,"NOT HERE",10)'},  # absent creator: nothing happens
    ]})
    assert ds[0x00091004].value == "LowSpeed CT/i"
    assert 0x00191002 not in ds
    block = ds.private_block(0x0011, "ROUTER 1")
    assert ds[block.get_tag(0x10)].value == "routed"
    back = dcmread(io.BytesIO(_bytes(ds)))
    assert back[back.private_block(0x0011, "ROUTER 1").get_tag(0x10)].value == "routed"


def test_morph_writes_numbers_into_binary_number_elements() -> None:
    """Set, copy and replace on US/FL/... elements give numbers, so the copy can be written."""
    ds = _file("CT_small.dcm")
    _run(ds, {"name": "numbers", "kind": "morph", "ops": [
        {"op": "set", "tag": "Rows", "value": "128"},
        {"op": "set", "tag": "(0019,\"ACME\",10)", "vr": "FL", "value": "1.5\\2.5"},
        {"op": "copy", "tag": "Columns", "from": "Rows"},
        {"op": "replace", "tag": "BitsStored", "pattern": "^16$", "with": "12"},
        {"op": "set", "tag": "SeriesNumber", "value": ""},
        {"op": "set", "tag": "PixelPaddingValue", "value": ""}]})
    back = dcmread(io.BytesIO(_bytes(ds)))
    assert (back.Rows, back.Columns) == (128, 128)
    assert back.BitsStored == 12
    assert back.SeriesNumber is None and back.PixelPaddingValue is None  # emptied
    private = back.private_block(0x0019, "ACME")[0x10]
    assert private.VR == "FL" and list(private.value) == [1.5, 2.5]


def test_morph_sets_a_private_element_read_as_un() -> None:
    """An implicit VR file's unknown private element is UN (bytes): set re-makes it."""
    ds = _file("rtplan.dcm")  # implicit VR little endian
    ds.private_block(0x0029, "NOBODY KNOWS", create=True).add_new(0x10, "LO", "OLD")
    ds = dcmread(io.BytesIO(_bytes(ds)))
    assert ds.private_block(0x0029, "NOBODY KNOWS")[0x10].VR == "UN"
    _run(ds, {"name": "p", "kind": "morph", "ops": [
        {"op": "set", "tag": '(0029,"NOBODY KNOWS",10)', "vr": "LO", "value": "NEW"}]})
    back = dcmread(io.BytesIO(_bytes(ds)))
    assert back.private_block(0x0029, "NOBODY KNOWS")[0x10].value in (b"NEW ", "NEW")


def test_a_failing_operation_names_the_transform_and_the_operation() -> None:
    ds = _file("CT_small.dcm")
    with pytest.raises(TransformFailed) as caught:
        _run(ds, {"name": "bad-ref", "kind": "morph", "ops": [
            {"op": "replace", "tag": "PatientID", "pattern": "CT", "with": r"\9"}]})
    assert str(caught.value) == ("transform 'bad-ref' (morph) failed on this instance at "
                                 "ops[0] (replace PatientID): error")
    assert "1CT1" not in str(caught.value)


# -- charset ---------------------------------------------------------------------------------


def _charset_file(name: str, declared: bytes | None = None, as_: bytes = b"") -> Dataset:
    """A charset test file, its declaration swapped in the raw bytes (same length)."""
    data = Path(get_charset_files(name)[0]).read_bytes()
    if declared is not None:
        assert data.count(declared) == 1
        data = data.replace(declared, as_)
    return dcmread(io.BytesIO(data))


def test_utf8_bytes_declared_latin1_are_redeclared_utf8() -> None:
    ds = _charset_file("chrX1.dcm", b"ISO_IR 192", b"ISO_IR 100")
    raw = bytes(ds.get_item("PatientName").value)
    assert repair_charset(ds) == "Specific Character Set ISO_IR 100 -> ISO_IR 192"
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    back = dcmread(io.BytesIO(_bytes(ds)))
    assert bytes(back.get_item("PatientName").value) == raw  # the bytes are kept
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert str(back.PatientName) == "Wang^XiaoDong=王^小東"
    assert str(ds.PatientName) == "Wang^XiaoDong=王^小東"


def test_charset_repair_runs_before_what_reads_the_text_whatever_its_place_in_the_chain(
        ) -> None:
    """A rule's morph, then a destination's charset repair: the repair still sees the bytes
    as received (a transform that read a name first would have decoded it wrongly)."""
    ds = _charset_file("chrX1.dcm", b"ISO_IR 192", b"ISO_IR 100")
    result = _run(ds, {"name": "tag-it", "kind": "morph", "ops": [
        {"op": "replace", "tag": "PatientName", "pattern": "^Wang", "with": "WANG"}]},
        {"name": "fix-charset", "kind": "charset"})
    back = dcmread(io.BytesIO(_bytes(ds)))
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert str(back.PatientName) == "WANG^XiaoDong=王^小東"
    # Recorded in the order they ran.
    assert [a["name"] for a in result.applied] == ["fix-charset", "tag-it"]


def test_latin1_bytes_declared_utf8_are_redeclared_latin1() -> None:
    ds = _charset_file("chrFren.dcm", b"ISO_IR 100", b"ISO_IR 192")
    assert repair_charset(ds) == "Specific Character Set ISO_IR 192 -> ISO_IR 100"
    assert str(ds.PatientName) == "Buc^Jérôme"


def test_latin1_bytes_declared_ascii_are_redeclared_latin1() -> None:
    ds = _charset_file("chrFren.dcm", b"ISO_IR 100", b"ISO_IR 6  ")
    assert repair_charset(ds) == "Specific Character Set ISO_IR 6 -> ISO_IR 100"
    assert str(dcmread(io.BytesIO(_bytes(ds))).PatientName) == "Buc^Jérôme"


@pytest.mark.parametrize("name", ["chrX1.dcm", "chrFren.dcm", "chrGerm.dcm", "chrJapMulti.dcm",
                                  "chrRuss.dcm"])
def test_correct_declarations_and_code_extensions_are_left_alone(name: str) -> None:
    ds = _charset_file(name)
    before = ds.get("SpecificCharacterSet")
    assert repair_charset(ds) == ""
    assert ds.get("SpecificCharacterSet") == before


def test_ascii_only_text_needs_no_repair() -> None:
    ds = _file("CT_small.dcm")  # declared ISO_IR 100, all ASCII
    assert repair_charset(ds) == ""


# -- declarations ----------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "errors"), [
    ({"name": "x", "kind": "sharpen"}, {"kind": "unknown kind 'sharpen'; one of deidentify, "
                                                "morph, charset"}),
    ({"name": "bad name!", "kind": "charset"},
     {"name": "required: 1-64 characters of A-Z a-z 0-9 _ . -"}),
    ({"name": "d", "kind": "deidentify"},
     {"project": "required: a project name of 1-64 characters (it selects the seed)"}),
    ({"name": "d", "kind": "deidentify", "project": "p", "retain_dates": "yes",
      "retain_uids": "no"},
     {"retain_dates": "expected 'shift' or 'keep', got 'yes'",
      "retain_uids": "expected true or false, got 'no'"}),
    ({"name": "c", "kind": "charset", "ops": []},
     {"ops": "unknown key for a charset transform (expected name, kind, description)"}),
    ({"name": "m", "kind": "morph"}, {"ops": "required: a non-empty list of operations (each "
                                             "a table with op and tag)"}),
    ({"name": "m", "kind": "morph", "ops": [{"op": "rename", "tag": "PatientID"}]},
     {"ops[0].op": "expected one of set, copy, delete, replace, got 'rename'"}),
    ({"name": "m", "kind": "morph", "ops": [{"op": "set", "tag": "PatientNme", "value": "x"}]},
     {"ops[0].tag": "'PatientNme': 'PatientNme' is not a DICOM keyword"}),
    ({"name": "m", "kind": "morph", "ops": [{"op": "replace", "tag": "PatientID",
                                            "pattern": "(", "with": ""}]},
     {"ops[0].pattern": "not a valid regular expression: missing ), unterminated subpattern "
                        "at position 0"}),
    ({"name": "m", "kind": "morph", "ops": [{"op": "set", "tag": '(0011,"ME",10)',
                                            "value": "x"}]},
     {"ops[0].vr": "required: '(0011,\"ME\",10)' is not in the DICOM dictionary"}),
    ({"name": "m", "kind": "morph", "ops": [{"op": "delete", "tag": "PatientID",
                                            "when": [{"tag": "Modality"}]}]},
     {"ops[0].when[0].tag": "a condition needs exactly one of equals, matches, exists"}),

    ({"name": "m", "kind": "morph", "ops": [{"op": "set", "tag": "Rows", "value": "big"}]},
     {"ops[0].value": "expected a number for 'Rows' (VR US; several separated by \\), got "
                      "'big'"}),
    ({"name": "m", "kind": "morph", "ops": [{"op": "set", "tag": "SeriesNumber",
                                            "value": "two"}]},
     {"ops[0].value": "expected a number for 'SeriesNumber' (VR IS; several separated by \\), "
                      "got 'two'"}),
    ({"name": "m", "kind": "morph", "ops": [{"op": "set", "tag": "ReferencedImageSequence",
                                            "value": "x"}]},
     {"ops[0].tag": "'ReferencedImageSequence' is a SQ element: set and copy write text or "
                    "numbers only"}),
])
def test_declarations_fail_with_the_field_and_the_reason(data: dict[str, Any],
                                                         errors: dict[str, str]) -> None:
    with pytest.raises(TransformError) as caught:
        parse_transform(data)
    assert caught.value.errors == errors


@pytest.mark.parametrize(("text", "message"), [
    ("BeamSequence.BeamName", "a step inside a sequence needs [*] or [n]"),
    ("BeamSequence[*]", "the last step names an element, not sequence items"),
    ('(0010,"X",10)', "group 0010 is not private"),
    ("(0010,00", "cannot read a tag at character 1"),
])
def test_bad_paths_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(PathError, match=message.replace("[", r"\[").replace("*", r"\*")):
        parse_path(text)


def test_check_config_reports_transforms_and_unknown_names(tmp_path: Path) -> None:
    config = tmp_path / "router.toml"
    config.write_text('''
[[transforms]]
name = "deid"
kind = "deidentify"
project = "trial"

[[transforms]]
name = "broken"
kind = "morph"
ops = [{ op = "set", tag = "NoSuchKeyword", value = "x" }]

[[destinations]]
name = "archive"
type = "dicom"
host = "10.0.0.5"
port = 104
ae_title = "PACS"
transforms = ["deid", "missing"]

[[rules]]
name = "all"
destinations = ["archive"]
transforms = ["deid", "gone"]
''')
    assert check_config(config) == [
        "transforms[1].ops[0].tag: 'NoSuchKeyword': 'NoSuchKeyword' is not a DICOM keyword",
        "destinations[0].transforms[1]: unknown transform 'missing'",
        "rules[0].transforms[1]: unknown transform 'gone'",
    ]


def test_a_deliverys_chain_is_its_rules_transforms_then_the_destinations() -> None:
    transforms = {n: VersionedTransform(1, parse_transform({"name": n, "kind": "charset"}))
                  for n in ("a", "b", "c", "d")}
    rules = tuple(VersionedRule(rule_id=f"id-{n}", version=1, spec=parse_rule(spec))
                  for n, spec in (
                      ("r1", {"name": "r1", "destinations": ["pacs"], "transforms": ["b", "a"]}),
                      ("r2", {"name": "r2", "destinations": ["other"], "transforms": ["d"]}),
                      ("r3", {"name": "r3", "destinations": ["pacs"], "transforms": ["a"]})))
    destinations = {"pacs": DestinationState("pacs", "x", 1, {"transforms": ["c", "b"]},
                                             False, False)}
    snapshot = AdminSnapshot(1, rules, destinations, transforms=transforms)
    matched = json.dumps([{"rule_id": f"id-{n}", "version": 1, "name": n}
                          for n in ("r1", "r2", "r3")])
    chain, missing = chain_for(snapshot, "pacs", matched)
    assert [t.name for t in chain] == ["b", "a", "c"] and missing == []
    chain, _ = chain_for(snapshot, "pacs", json.dumps([{"rule_id": "id-r3"}]))
    assert [t.name for t in chain] == ["a", "c", "b"]
    chain, missing = chain_for(snapshot, "pacs", "")  # unrouted or before transforms
    assert [t.name for t in chain] == ["c", "b"]
    gone = AdminSnapshot(1, rules, destinations, transforms={"a": transforms["a"]})
    assert chain_for(gone, "pacs", matched)[1] == ["b", "c"]


def test_charset_repair_reaches_text_inside_sequence_items_and_keeps_the_bytes() -> None:
    """UTF-8 names declared Latin-1, at the top level and inside a sequence item (read by the
    repair's own scan before it re-declares): both read back as UTF-8 and are written with the
    bytes they came with."""
    name = "Müller^Jürgen"
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = name
    item = Dataset()
    item.PatientName = name
    ds.OtherPatientIDsSequence = Sequence([item])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue().replace(b"ISO_IR 192", b"ISO_IR 100")
    read = dcmread(io.BytesIO(data))
    assert repair_charset(read) == "Specific Character Set ISO_IR 100 -> ISO_IR 192"
    assert read.PatientName == name
    assert read.OtherPatientIDsSequence[0].PatientName == name
    written = dcmread(io.BytesIO(_bytes(read)))
    assert written.SpecificCharacterSet == "ISO_IR 192"
    assert written.OtherPatientIDsSequence[0].PatientName == name
    assert name.encode() in _bytes(read)
