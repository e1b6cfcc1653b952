"""[atna] and [audit]: what check-config and the start refuse, defaults, the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config_check import check_config
from router.settings import SettingsError, load_settings
from router.settings_audit import SIX_YEARS_DAYS


def problems_of(tmp_path: Path, text: str) -> list[str]:
    config = tmp_path / "router.toml"
    config.write_text(text)
    return check_config(config)


def test_atna_is_off_and_audit_kept_six_years_by_default(tmp_path: Path) -> None:
    settings = load_settings({}, data_dir=tmp_path)
    assert not settings.atna.enabled
    assert settings.atna.port == 6514 and settings.atna.transport == "tls"
    assert settings.audit.retention_days == SIX_YEARS_DAYS == 6 * 365 + 2
    assert settings.storage.retention_days == 0  # image retention is another setting


def test_a_tls_repository_needs_a_ca_bundle(tmp_path: Path) -> None:
    assert problems_of(tmp_path, '[atna]\nhost = "audit.example"\n') == [
        'atna.ca_certificates: required by transport = "tls" (the CA bundle the audit '
        "repository's certificate must chain to)"]


@pytest.mark.parametrize(("lines", "problem"), [
    ('transport = "tcp"', "atna.transport: must be 'tls' or 'udp', got 'tcp'"),
    ("port = 0", "atna.port: must be between 1 and 65535, got 0"),
    ('app_name = "dicom router"', "atna.app_name: must be 1-48 printable ASCII"),
    ('certificate = "/x.pem"', "atna.private_key: certificate and private_key go together"),
    ('audit_source_id = "\u00e9"', "atna.audit_source_id: must be 1-64 printable ASCII"),
    ("hots = 1", "atna.hots: unknown key"),
])
def test_bad_atna_keys_are_named(tmp_path: Path, lines: str, problem: str) -> None:
    problems = problems_of(tmp_path, f'[atna]\ntransport = "udp"\n{lines}\n'
                           if "transport" not in lines else f"[atna]\n{lines}\n")
    assert any(p.startswith(problem) for p in problems), problems


def test_the_environment_sets_atna(tmp_path: Path) -> None:
    settings = load_settings({"DICOM_ROUTER_ATNA_HOST": "10.0.0.9",
                              "DICOM_ROUTER_ATNA_TRANSPORT": "udp",
                              "DICOM_ROUTER_ATNA_PORT": "514"}, data_dir=tmp_path)
    assert (settings.atna.host, settings.atna.transport, settings.atna.port) == (
        "10.0.0.9", "udp", 514)
    assert settings.atna.enabled


def test_audit_retention_under_six_years_needs_the_override(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "[audit]\nretention_days = 365\n") == [
        f"audit.retention_days: must be at least {SIX_YEARS_DAYS} days (6 years, HIPAA) or "
        "0 (forever); set allow_short_retention = true to keep it shorter"]
    assert problems_of(tmp_path, "[audit]\nretention_days = 365\n"
                       "allow_short_retention = true\n") == []
    assert problems_of(tmp_path, "[audit]\nretention_days = 0\n") == []
    with pytest.raises(SettingsError, match=r"audit\.retention_days"):
        load_settings({"DICOM_ROUTER_AUDIT_RETENTION_DAYS": "30"}, data_dir=tmp_path)


def test_a_missing_ca_file_stops_the_start_naming_it(tmp_path: Path) -> None:
    from router.service import Router

    settings = load_settings({"DICOM_ROUTER_ATNA_HOST": "127.0.0.1",
                              "DICOM_ROUTER_ATNA_CA_CERTIFICATES": str(tmp_path / "nope.pem"),
                              "DICOM_ROUTER_SECRET_KEY": "0" * 64}, data_dir=tmp_path)
    with pytest.raises(SettingsError, match=r"atna: .*nope\.pem: no such file"):
        Router.build(settings)
