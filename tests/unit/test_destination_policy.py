"""The destination policy without a router: addresses in every spelling getaddrinfo accepts,
names and their answers (checked at save, checked again at connect), the router's own ports,
the AI allow-list; folders (roots, the router's state, symlinks, at save and before each
write); the settings that drive it; check-config."""

from __future__ import annotations

import socket
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from router.config_check import check_config
from router.dispatch import ssrf
from router.dispatch.ai import AIDestinationConfig
from router.dispatch.base import PermanentDeliveryError
from router.dispatch.dicom import DicomDestinationConfig
from router.dispatch.file import FileAdapter, FileDestinationConfig
from router.dispatch.folders import FolderPolicy
from router.dispatch.policy import DestinationPolicy
from router.dispatch.s3 import S3DestinationConfig
from router.dispatch.ssrf import (
    AddressPolicy,
    AddressRefusedError,
    NameNotResolvedError,
    is_own_address,
    parse_networks,
)
from router.settings import SettingsError, load_settings

STRICT = AddressPolicy()
LOOPBACK = AddressPolicy(allow_loopback=True)

# 169.254.169.254 as typed by someone who knows how resolvers read addresses.
METADATA = ["169.254.169.254", "2852039166", "0xA9FEA9FE", "0251.0376.0251.0376",
            "169.254.43518", "0xa9.0xfe.0xa9.0xfe", "::ffff:169.254.169.254",
            "::ffff:a9fe:a9fe", "::169.254.169.254", "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1",
            "fd00:ec2::254", "fe80::1", "100.100.100.200", "192.0.0.192", "0.0.0.0", "0",
            "224.0.0.1", "255.255.255.255", "::"]
LOOPBACK_SPELLINGS = ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "017700000001",
                      "127.255.255.254", "::1", "::ffff:127.0.0.1", "::ffff:7f00:1",
                      "64:ff9b::7f00:1", "localhost"]
ORDINARY = ["10.0.0.5", "172.16.4.2", "192.168.1.10", "100.64.0.1", "fd12:3456::1",
            "198.51.100.7", "2001:db8::5"]


@pytest.fixture
def answers(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Host names the resolver answers with the given addresses."""
    names: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def resolve(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in names:
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6,
                     "", (a, port)) for a in names[host]]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    return names


@pytest.mark.parametrize("host", METADATA)
def test_metadata_link_local_and_this_host_are_refused_in_every_spelling(host: str) -> None:
    for policy in (STRICT, LOOPBACK):
        problem = policy.host_problem(host, 80)
        assert problem is not None and "link-local, cloud-metadata" in problem, host
        with pytest.raises(AddressRefusedError):
            policy.resolve(host, 80)


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_loopback_only_where_an_administrator_allows_it(host: str) -> None:
    problem = STRICT.host_problem(host, 104)
    assert problem is not None and "loopback address" in problem, host
    assert "[security] allow_loopback_destinations = true" in problem
    with pytest.raises(AddressRefusedError):
        STRICT.resolve(host, 104)
    assert LOOPBACK.host_problem(host, 104) is None


@pytest.mark.parametrize("host", ORDINARY)
def test_private_and_ordinary_addresses_are_allowed(host: str) -> None:
    assert STRICT.host_problem(host, 104) is None
    assert STRICT.addresses(host, 104)


def test_messages_name_what_was_typed_and_what_it_is() -> None:
    assert STRICT.host_problem("2852039166", 80) == (
        "169.254.169.254 (2852039166) is a link-local, cloud-metadata, multicast or "
        "'this host' address")
    assert str(STRICT.host_problem("localhost", 104)).startswith(
        "localhost resolves to 127.0.0.1, a loopback address")


def test_a_name_is_refused_if_any_of_its_addresses_is(answers: dict[str, list[str]]) -> None:
    answers["pacs.example.test"] = ["10.0.0.5", "127.0.0.1"]
    assert "pacs.example.test resolves to 127.0.0.1" in str(
        STRICT.host_problem("pacs.example.test", 104))
    with pytest.raises(AddressRefusedError):
        STRICT.addresses("pacs.example.test", 104)


def test_an_unknown_name_is_saved_and_checked_when_connecting() -> None:
    assert STRICT.host_problem("no-such-host.invalid", 104) is None
    with pytest.raises(NameNotResolvedError):
        STRICT.connect("no-such-host.invalid", 104, 2)


def test_the_connection_goes_to_the_address_checked_then(answers: dict[str, list[str]]) -> None:
    """DNS rebinding: the name answered a private address when saved; when connecting it
    answers loopback, where something listens. Refused, and nothing is connected to."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.3)
        port = listener.getsockname()[1]
        answers["pacs.rebinding.test"] = ["10.20.30.40"]
        assert STRICT.host_problem("pacs.rebinding.test", port) is None
        answers["pacs.rebinding.test"] = ["127.0.0.1"]
        with pytest.raises(AddressRefusedError, match=r"127\.0\.0\.1 is a loopback address"):
            STRICT.connect("pacs.rebinding.test", port, 2)
        with pytest.raises(TimeoutError):
            listener.accept()
        with LOOPBACK.connect("pacs.rebinding.test", port, 2) as conn:
            accepted, _ = listener.accept()
            accepted.close()
            assert conn.getpeername()[0] == "127.0.0.1"


def test_this_hosts_own_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_own_address(IPv4Address("127.0.0.1"))
    assert not is_own_address(IPv4Address("192.0.2.1"))  # TEST-NET-1: nobody's
    monkeypatch.setattr(ssrf, "is_own_address", lambda ip: str(ip) == "10.9.8.7")
    ours = AddressPolicy(own_ports=frozenset({11112, 8080}))
    assert "port 11112 is one the router listens on" in str(ours.host_problem("10.9.8.7", 11112))
    assert ours.host_problem("10.9.8.7", 104) is None  # another service of this host
    assert ours.host_problem("10.9.8.8", 11112) is None  # another host
    assert replace(ours, allow_loopback=True).host_problem("10.9.8.7", 11112) is None


def test_own_ports_come_from_the_settings(tmp_path: Path) -> None:
    config = tmp_path / "router.toml"
    config.write_text('[server]\ndicom_port = 11112\nhttp_port = 8080\n'
                      '[security]\nallow_loopback_destinations = true\n')
    policy = AddressPolicy.from_settings(load_settings({}, config, tmp_path / "data"))
    assert policy.own_ports == {11112, 8080} and policy.allow_loopback
    assert not AddressPolicy.from_settings(load_settings({}, None, tmp_path)).allow_loopback


def test_the_ai_allow_list_wins_over_every_refusal() -> None:
    ai = AddressPolicy(allowed=parse_networks(["169.254.10.0/24", "127.0.0.0/8"]))
    assert ai.host_problem("169.254.10.20", 80) is None
    assert ai.host_problem("127.0.0.1", 8000) is None
    assert ai.host_problem("169.254.169.254", 80) is not None


def _policy(tmp_path: Path, *roots: Path) -> DestinationPolicy:
    config = tmp_path / "router.toml"
    listed = ", ".join(f'"{root}"' for root in roots)
    config.write_text(f"[storage]\ndestination_roots = [{listed}]\n")
    return DestinationPolicy.from_settings(load_settings({}, config, tmp_path / "data"))


def test_folders_below_a_root_and_never_in_the_routers_state(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    folders = _policy(tmp_path, archive).folders
    data = tmp_path / "data"
    for allowed in (archive, archive / "site-a", data / "exports", data / "exports" / "x"):
        assert folders.problem(allowed) is None, allowed
    refused = {
        Path("/etc"): "outside the folders",
        Path("/root/.ssh"): "outside the folders",
        tmp_path / "elsewhere": "outside the folders",
        data / "blobs": "inside the router's own data folder",
        data / "db": "inside the router's own data folder",
        data: "holds the router's own data folder",
        data / "exports" / ".." / "blobs": "inside the router's own data folder",
    }
    for folder, reason in refused.items():
        assert reason in str(folders.problem(folder)), folder
    wide = _policy(tmp_path, tmp_path).folders  # a root that holds the data folder
    assert wide.problem(tmp_path / "archive") is None
    assert "holds the router's own data folder" in str(wide.problem(tmp_path))


def test_symlinks_are_followed_before_judging(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    (tmp_path / "data" / "blobs").mkdir(parents=True)
    (archive / "to-etc").symlink_to("/etc")
    (archive / "to-blobs").symlink_to(tmp_path / "data" / "blobs")
    folders = _policy(tmp_path, archive).folders
    assert "outside the folders" in str(folders.problem(archive / "to-etc"))
    assert "inside the router's own data folder" in str(folders.problem(archive / "to-blobs"))


def test_the_sqlite_folder_is_state_wherever_it_is(tmp_path: Path) -> None:
    config = tmp_path / "router.toml"
    config.write_text(f'[server]\ndatabase_url = "sqlite:///{tmp_path}/archive/db"\n'
                      f'[storage]\ndestination_roots = ["{tmp_path}/archive"]\n')
    policy = DestinationPolicy.from_settings(load_settings({}, config, tmp_path / "data"))
    assert "inside the router's own data folder" in str(
        policy.folders.problem(tmp_path / "archive" / "db" / "x"))
    assert policy.folders.problem(tmp_path / "archive" / "images") is None


def test_a_file_destination_checks_the_policy_before_each_write(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    (archive / "site").mkdir(parents=True)
    folders = FolderPolicy(roots=(archive,), state=(tmp_path / "data",))
    adapter = FileAdapter(FileDestinationConfig(name="a", path=str(archive / "site")),
                          policy=folders)
    assert "writable" in adapter.check()
    (archive / "site").rmdir()
    (archive / "site").symlink_to("/etc")  # swapped for a link after it was saved
    with pytest.raises(PermanentDeliveryError, match=r"refusing to write: .* outside"):
        adapter.check()
    # Outside the roots, whether the folder exists or not: the same answer (no oracle).
    for folder in ("/root/.ssh", "/no/such/folder"):
        outside = FileAdapter(FileDestinationConfig(name="b", path=folder), policy=folders)
        with pytest.raises(PermanentDeliveryError) as caught:
            outside.check()
        assert str(caught.value) == (
            f"refusing to write: {folder} is outside the folders file destinations may use "
            f"({archive}); an administrator lists more in [storage] destination_roots")


def test_problems_name_the_field_of_each_kind(tmp_path: Path) -> None:
    policy = _policy(tmp_path, tmp_path / "archive")
    cases = [
        (DicomDestinationConfig(name="d", host="127.0.0.1", port=104, ae_title="A"), "host"),
        (S3DestinationConfig(name="s", bucket="imaging", access_key_id="k",
                             secret_access_key="s", endpoint_url="http://169.254.169.254"),
         "endpoint_url"),
        (AIDestinationConfig(name="a", url="https://0xA9FEA9FE/v1", secret="s" * 20), "url"),
        (FileDestinationConfig(name="f", path="/etc"), "path"),
    ]
    for config, field in cases:
        assert set(policy.problems(config)) == {field}, config
    assert policy.problems(S3DestinationConfig(name="aws", bucket="imaging",
                                               access_key_id="k", secret_access_key="s")) == {}
    assert "allowed_networks" in policy.problems(cases[2][0])["url"]


def test_settings_of_the_policy(tmp_path: Path) -> None:
    def load(text: str) -> Any:
        path = tmp_path / "router.toml"
        path.write_text(text)
        return load_settings({}, path, tmp_path / "data")

    settings = load('[security]\nallow_loopback_destinations = "yes"\n'
                    '[storage]\ndestination_roots = ["/srv/archive", "~/exports"]\n'
                    '[web]\npublic_metrics = true\n')
    assert settings.security.allow_loopback_destinations and settings.web.public_metrics
    assert settings.storage.destination_roots == (Path("/srv/archive"),
                                                  Path("~/exports").expanduser())
    defaults = load("")
    assert not defaults.security.allow_loopback_destinations
    assert not defaults.web.public_metrics and defaults.storage.destination_roots == ()
    for bad in ('[storage]\ndestination_roots = ["relative"]\n',
                '[storage]\ndestination_roots = "/srv"\n',
                '[storage]\ndestination_roots = ["/"]\n',
                '[storage]\ndestination_roots = ["/srv/../etc"]\n',
                '[security]\nallow_loopback_destinations = "maybe"\n'):
        with pytest.raises(SettingsError):
            load(bad)


def test_check_config_lists_refused_destinations_and_remote_nodes(tmp_path: Path) -> None:
    config = tmp_path / "router.toml"
    config.write_text(
        '[[destinations]]\nname = "pacs"\ntype = "dicom"\nhost = "127.0.0.1"\nport = 104\n'
        'ae_title = "PACS"\n'
        '[[destinations]]\nname = "archive"\ntype = "file"\npath = "/etc"\n'
        '[[remote_nodes]]\nname = "meta"\nae_title = "META"\nhost = "169.254.169.254"\n'
        'port = 104\n')
    problems = check_config(config)
    assert len(problems) == 3, problems
    assert "destinations[0]" in problems[0] and "host: 127.0.0.1 is a loopback" in problems[0]
    assert "destinations[1]" in problems[1] and "path: /etc is outside" in problems[1]
    assert "remote_nodes[0]" in problems[2] and "link-local" in problems[2]
