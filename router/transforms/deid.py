"""De-identification by the PS3.15 Annex E basic profile, with its options, through dicognito.

dicognito replaces names, IDs, UIDs, addresses and institution, and shifts dates by an offset,
all derived from a seed: with one seed per named project, the same patient gets the same
pseudonym in every study, on every node and after every restart. On top of dicognito this
module removes what the basic profile removes and dicognito keeps (private elements, patient
characteristics, free-text descriptors), honours the options by keeping what they retain, and
records the profile and options in De-identification Method (Code Sequence) (CID 7050).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dicognito
from dicognito.anonymizer import Anonymizer
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

ENGINE = f"dicognito {dicognito.__version__}"
OPTIONS = ("retain_dates", "retain_uids", "retain_device_identity",
           "retain_patient_characteristics", "retain_institution_identity", "clean_descriptors",
           "retain_private")
_DATE_VRS = frozenset({"DA", "DT", "TM"})
# PS3.15 Table E.1-1: what the options retain (and the basic profile otherwise removes).
DEVICE_IDENTITY = frozenset({"StationName", "DeviceSerialNumber", "DeviceUID", "DetectorID",
                             "GantryID", "PlateID", "CassetteID", "GeneratorID",
                             "SourceSerialNumber", "DeviceLabel", "DeviceDescription"})
INSTITUTION_IDENTITY = frozenset({"InstitutionName", "InstitutionAddress",
                                  "InstitutionalDepartmentName", "InstitutionCodeSequence",
                                  "InstitutionalDepartmentTypeCodeSequence"})
PATIENT_CHARACTERISTICS = frozenset({"PatientAge", "PatientSex", "PatientSize",
                                     "PatientWeight", "EthnicGroup", "SmokingStatus",
                                     "PregnancyStatus", "Allergies", "SpecialNeeds",
                                     "PatientSexNeutered", "PatientState", "MedicalAlerts"})
DESCRIPTORS = frozenset({"StudyDescription", "SeriesDescription", "ImageComments",
                         "PatientComments", "AdditionalPatientHistory", "StudyComments",
                         "RequestedProcedureDescription", "PerformedProcedureStepDescription",
                         "ScheduledProcedureStepDescription", "DerivationDescription",
                         "AdmittingDiagnosesDescription", "ProtocolName", "ReasonForStudy",
                         "RequestedContrastAgent", "AcquisitionComments", "VisitComments",
                         "InterpretationText", "TextComments", "FrameComments",
                         "AcquisitionDeviceProcessingDescription", "DischargeDiagnosisDescription",
                         "ContrastBolusAgent", "ReasonForTheRequestedProcedure",
                         "ImagingServiceRequestComments", "RequestedProcedureComments",
                         "ResultsComments", "Impressions", "IdentifyingComments",
                         "ServiceEpisodeDescription", "TopicKeywords", "TopicTitle",
                         "TopicSubject", "CommentsOnThePerformedProcedureStep",
                         "AcquisitionProtocolDescription", "InterpretationDiagnosisDescription",
                         "ModifiedImageDescription"})
# PS3.15 Table E.1-1: removed (X) by the basic profile, retained by no option, and left in place
# by dicognito (tests/unit/test_transforms.py puts each in pydicom's bundled files and looks for
# its value in what would be sent). Text Value (0040,A160) is not here: removing it breaks SR.
REMOVED = frozenset({
    "TextString", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "AdmissionID", "IssuerOfAdmissionID", "ServiceEpisodeID", "IssuerOfServiceEpisodeID",
    "PatientInstitutionResidence", "CurrentPatientLocation", "PersonAddress",
    "PersonTelephoneNumbers", "OrderCallbackPhoneNumber", "OrderEntererLocation",
    "PerformedLocation", "RequestedProcedureLocation", "ScheduledProcedureStepLocation",
    "TopicAuthor", "VerifyingOrganization", "PatientTransportArrangements",
    "DistributionAddress", "DistributionName", "InsurancePlanIdentification",
    "InterpretationIDIssuer", "StudyIDIssuer", "ResultsIDIssuer", "HumanPerformerOrganization",
    "ModifyingDeviceID", "ModifyingDeviceManufacturer",
    "ConfidentialityConstraintOnPatientDataDescription", "PatientBirthTime", "PreMedication",
    "DataSetTrailingPadding", "OriginalAttributesSequence", "ModifiedAttributesSequence",
    "DigitalSignaturesSequence", "MACParametersSequence", "ReferencedDigitalSignatureSequence",
    "ReferencedSOPInstanceMACSequence", "AdmittingDiagnosesCodeSequence",
    "PatientPrimaryLanguageCodeSequence", "PatientPrimaryLanguageModifierCodeSequence",
    "ReferencedPatientAliasSequence", "ParticipantSequence", "CustodialOrganizationSequence",
    "ResultsDistributionListSequence", "IntendedRecipientsOfResultsIdentificationSequence",
    "ActualHumanPerformersSequence", "ScheduledHumanPerformersSequence",
    "AuthorObserverSequence", "InterpretationApproverSequence",
    "PhysiciansOfRecordIdentificationSequence", "PerformingPhysicianIdentificationSequence",
    "PhysiciansReadingStudyIdentificationSequence", "ReferringPhysicianIdentificationSequence",
    "OperatorIdentificationSequence", "ScheduledPerformingPhysicianIdentificationSequence"})
# CID 7050 codes (scheme DCM) for De-identification Method Code Sequence.
_CODES = {"basic": ("113100", "Basic Application Confidentiality Profile"),
          "clean_descriptors": ("113105", "Clean Descriptors Option"),
          "retain_dates_full": ("113106", "Retain Longitudinal Temporal Information Full "
                                "Dates Option"),
          "retain_dates_modified": ("113107", "Retain Longitudinal Temporal Information "
                                    "Modified Dates Option"),
          "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
          "retain_device_identity": ("113109", "Retain Device Identity Option"),
          "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
          "retain_uids": ("113110", "Retain UIDs Option")}


class DeidError(ValueError):
    """The options of a deidentify transform are invalid; ``errors`` maps key -> message."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        self.errors = dict(errors)
        super().__init__("; ".join(f"{k}: {v}" for k, v in self.errors.items()))


@dataclass(frozen=True)
class DeidOptions:
    """A project name (it selects the seed) and the profile options.

    ``retain_dates``: "shift" (default; the Modified Dates option: every date of a project moves
    by the same offset, so intervals are kept) or "keep" (the Full Dates option).
    """

    project: str
    retain_dates: str = "shift"
    retain_uids: bool = False
    retain_device_identity: bool = False
    retain_patient_characteristics: bool = False
    retain_institution_identity: bool = False
    clean_descriptors: bool = False
    retain_private: bool = False

    def codes(self) -> list[tuple[str, str]]:
        chosen = ["basic", f"retain_dates_{'full' if self.retain_dates == 'keep' else 'modified'}"]
        # Retaining every private element is not the Retain Safe Private option: no code.
        chosen += [o for o in OPTIONS[1:-1] if getattr(self, o)]
        return [_CODES[key] for key in chosen]


def parse_deid_options(data: Mapping[str, Any]) -> DeidOptions:
    """Options from a ``kind = "deidentify"`` table; :class:`DeidError` naming each bad key."""
    errors: dict[str, str] = {}
    project = data.get("project")
    if not isinstance(project, str) or not project.strip() or len(project) > 64:
        errors["project"] = "required: a project name of 1-64 characters (it selects the seed)"
    dates = data.get("retain_dates", "shift")
    if dates not in ("shift", "keep"):
        errors["retain_dates"] = f"expected 'shift' or 'keep', got {dates!r}"
    for key in OPTIONS[1:]:
        if not isinstance(data.get(key, False), bool):
            errors[key] = f"expected true or false, got {data.get(key)!r}"
    if errors:
        raise DeidError(errors)
    return DeidOptions(project=str(project), retain_dates=str(dates),
                       **{k: bool(data.get(k, False)) for k in OPTIONS[1:]})


@functools.lru_cache(maxsize=64)
def _anonymizer(seed: str, options: DeidOptions) -> Anonymizer:
    """One per seed and options: building one derives its tables from the seed."""
    anonymizer = Anonymizer(seed=seed)
    keep: set[str] = set()
    if options.retain_device_identity:
        keep |= DEVICE_IDENTITY
    if options.retain_institution_identity:
        keep |= INSTITUTION_IDENTITY
    keep_vrs: set[str] = set()
    if options.retain_dates == "keep":
        keep_vrs |= _DATE_VRS
    if options.retain_uids:
        keep_vrs.add("UI")

    def retain(dataset: Dataset, element: DataElement) -> bool:
        return element.keyword in keep or element.VR in keep_vrs

    anonymizer.add_element_handler(retain)  # type: ignore[arg-type]  # a callable is enough
    return anonymizer


@dataclass(frozen=True)
class Identity:
    """The identifying values of one instance before and after, for the re-identification map."""

    patient_id: str
    patient_name: str
    study_uid: str
    pseudo_patient_id: str
    pseudo_patient_name: str
    pseudo_study_uid: str


def deidentify(dataset: Dataset, seed: str, options: DeidOptions) -> Identity:
    """De-identify ``dataset`` in place; returns the identities before and after."""
    before = _identity(dataset)
    originals = [v for v in before if v]
    _strip(dataset, options, originals)
    _anonymizer(seed, options).anonymize(dataset)
    if "SOPInstanceUID" in dataset and "MediaStorageSOPInstanceUID" in dataset.file_meta:
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    _method(dataset, options)
    after = _identity(dataset)
    return Identity(*before, *after)


def _identity(dataset: Dataset) -> tuple[str, str, str]:
    return (str(dataset.get("PatientID", "") or ""), str(dataset.get("PatientName", "") or ""),
            str(dataset.get("StudyInstanceUID", "") or ""))


def _strip(dataset: Dataset, options: DeidOptions, originals: list[str]) -> None:
    """What the basic profile removes and dicognito does not (top level and in sequences)."""
    if not options.retain_private:
        dataset.remove_private_tags()
    for element in list(dataset):
        keyword = element.keyword
        if keyword in REMOVED or (keyword in DEVICE_IDENTITY and keyword != "DeviceUID"
                                  and not options.retain_device_identity):
            del dataset[element.tag]  # DeviceUID: dicognito replaces it like every UID
        elif element.VR == "SQ":
            for item in element.value or ():
                _strip(item, options, originals)
        elif keyword in PATIENT_CHARACTERISTICS and not options.retain_patient_characteristics:
            if keyword == "PatientSex":
                element.value = ""  # Type 2 in most IODs: emptied (Z), not removed
            else:
                del dataset[element.tag]
        elif keyword in DESCRIPTORS:
            if not options.clean_descriptors:
                del dataset[element.tag]
            elif isinstance(element.value, str):
                element.value = _cleaned(element.value, originals)


def _cleaned(text: str, originals: list[str]) -> str:
    """A descriptor with the patient's name parts and IDs taken out (Clean Descriptors)."""
    words = {w for v in originals for w in v.replace("^", " ").split() if len(w) > 2}
    for word in sorted(words, key=len, reverse=True):
        text = text.replace(word, "")
    return " ".join(text.split())


def _method(dataset: Dataset, options: DeidOptions) -> None:
    dataset.PatientIdentityRemoved = dataset.get("PatientIdentityRemoved") or "NO"
    if dataset.get("BurnedInAnnotation", "YES") == "NO":
        dataset.PatientIdentityRemoved = "YES"
    items = []
    for value, meaning in options.codes():
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        items.append(item)
    dataset.DeidentificationMethodCodeSequence = items
    # PS3.15 E.3.6: whether dates were shifted (Modified Dates) or kept (Full Dates).
    dataset.LongitudinalTemporalInformationModified = (
        "UNMODIFIED" if options.retain_dates == "keep" else "MODIFIED")
