"""deploy/systemd: the node and migrate units run commands the CLI has, on the paths the
hardening leaves writable, with the same hardening, and env.example names real settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.cli import _parser
from router.config_check import check_config
from router.settings import environment_names, settings_problems
from tests.deploy_files import DEPLOY, UNITS, exec_start, read_env_file, read_unit

SYSTEMD = DEPLOY / "systemd"
# Options of [Service] that say what the process may do, not what it runs.
HARDENING = {
    "CapabilityBoundingSet": [""], "AmbientCapabilities": [""], "NoNewPrivileges": ["yes"],
    "ProtectSystem": ["strict"], "ProtectHome": ["yes"], "PrivateTmp": ["yes"],
    "PrivateDevices": ["yes"], "RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6"],
    "SystemCallFilter": ["@system-service"], "RestrictSUIDSGID": ["yes"],
}


@pytest.mark.parametrize(("unit", "command"), [
    ("dicom-router.service", "serve"), ("dicom-router-migrate.service", "migrate")])
def test_each_unit_runs_a_real_subcommand_on_the_data_folder(unit: str, command: str) -> None:
    service = read_unit(SYSTEMD / unit)["Service"]
    argv = exec_start(read_unit(SYSTEMD / unit))
    assert Path(argv[0]).name == "dicom-router"
    args = _parser().parse_args(argv[1:])  # exits (SystemExit) on a flag the CLI lacks
    assert args.command == command
    assert args.config == Path("/etc/dicom-router/router.toml")
    # The data folder is the one place ProtectSystem=strict leaves writable.
    assert service["ReadWritePaths"] == [str(args.data_dir)]
    assert service["WorkingDirectory"] == [str(args.data_dir)]
    assert [f"/var/lib/{d}" for d in service["StateDirectory"]] == [str(args.data_dir)]


def test_the_node_requires_migrate_and_starts_after_it() -> None:
    node = read_unit(SYSTEMD / "dicom-router.service")
    migrate = read_unit(SYSTEMD / "dicom-router-migrate.service")
    assert "dicom-router-migrate.service" in node["Unit"]["Requires"][0].split()
    assert "dicom-router-migrate.service" in node["Unit"]["After"][0].split()
    assert migrate["Service"]["Type"] == ["oneshot"]
    assert migrate["Service"]["RemainAfterExit"] == ["yes"]
    assert node["Service"]["KillMode"] == ["mixed"]  # SIGTERM to serve only; it stops receivers
    assert node["Install"]["WantedBy"] == ["multi-user.target"]


def test_both_units_are_hardened_alike() -> None:
    services = [read_unit(SYSTEMD / unit)["Service"] for unit in UNITS]
    for service in services:
        for key, value in HARDENING.items():
            assert service.get(key) == value, key
        assert service["User"] == ["dicom-router"]
        assert service["EnvironmentFile"] == ["/etc/dicom-router/env"]
    node, migrate = services
    shared = {k for k in node if k.startswith(("Protect", "Private", "Restrict", "SystemCall"))
              or k in ("NoNewPrivileges", "CapabilityBoundingSet", "LockPersonality")}
    assert {k: node[k] for k in shared} == {k: migrate.get(k) for k in shared}


def test_env_example_sets_the_database_and_the_key_by_their_real_names() -> None:
    values = read_env_file(SYSTEMD / "env.example")
    assert set(values) == {"DICOM_ROUTER_DATABASE_URL", "DICOM_ROUTER_SECRET_KEY"}
    assert set(values) <= set(environment_names())
    settings, problems = settings_problems({}, values)
    assert problems == [] and settings is not None and settings.is_postgres


def test_the_example_configuration_the_units_read_is_valid() -> None:
    """deploy/README.md installs router.example.toml as /etc/dicom-router/router.toml."""
    assert check_config(DEPLOY / "router.example.toml") == []
