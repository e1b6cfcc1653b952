"""One description of configuration (issue 17, point 6): the settings, destinations, rules and
remote nodes of a file are validated in one run, every problem with its path; unknown keys are
errors with a did-you-mean; the environment goes through the same models."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config_check import check_config
from router.config_types import config_keys, docs_of
from router.domain.rules import RuleError, RuleSpec, parse_rule, stored_rule
from router.settings import SettingsError, environment_names, load_settings
from web.forms import at_fields

STORAGE_KEYS = ("access_key_id, backend, bucket, cache_size, destination_roots, endpoint_url, "
                "prefix, region, retention_days, secret_access_key")

MISTAKES = """
[server]
http_port = 80800
log_formt = "json"

[dicom]
max_associations = 0
artim_timeout = "soon"
tls_certificate = "/etc/router.pem"

[storage]
retension_days = 3
colour = "blue"
purge = true

[web]
trusted_proxies = ["proxy.local"]

[dispach]
max_age = "1d"

[[destinations]]
name = "pacs"
type = "dicom"
host = "10.0.0.5"
port = 104
ae_title = "A_TITLE_FAR_TOO_LONG"
timout = "30s"

[[rules]]
name = "ct"
priority = "first"
modality = ["CT", "C*"]
destinations = ["pacs", "nowhere"]
match = [{tag = "Modality", op = "eq", value = "CT"}, {tag = "PatientID", op = "like"}]

[[rules]]
name = "mr"
destination = ["pacs"]
quiet_time = "soon"

[[remote_nodes]]
name = "viewer"
ae_title = "VIEWER"
host = "10.0.0.7"
port = "104"
"""


def test_a_file_with_mistakes_in_every_section_lists_them_all_with_paths(tmp_path: Path) -> None:
    config = tmp_path / "router.toml"
    config.write_text(MISTAKES)
    problems = check_config(config)
    expected = [
        "dispach: unknown key (did you mean 'dispatch'?)",
        "server.log_formt: unknown key (did you mean 'log_format'?)",
        "server.http_port: must be between 0 and 65535, got 80800",
        "dicom.max_associations: must be between 1 and 1000, got 0",
        "dicom.artim_timeout: expected a duration such as '30s' or '24h', got 'soon'",
        "storage.retension_days: unknown key (did you mean 'retention_days'?)",
        "storage.colour: unknown key (expected one of " + STORAGE_KEYS + ")",
        "storage.purge: unknown key (expected one of " + STORAGE_KEYS + ")",
        "web.trusted_proxies: 'proxy.local' is not a network",
        "destinations[0].ae_title: must be 1-16 printable ASCII characters, no backslash",
        "destinations[0].timout: unknown key for a dicom destination "
        "(did you mean 'timeout'?)",
        "rules[0].destinations[1]: unknown destination 'nowhere' (rule 'ct')",
        "rules[0].priority: expected an integer, got 'first'",
        "rules[0].modality[1]: 'C*' is not a modality code such as 'CT'",
        "rules[0].match[1].op: unknown operator 'like' (expected one of eq, ne, in, contains, "
        "startswith, regex, exists, lt, gt, le, ge)",
        "rules[1].quiet_time: expected a duration such as '30s' or '24h', got 'soon'",
        "rules[1].destination: unknown key (did you mean 'destinations'?)",
        "rules[1].destinations: at least one destination is required unless stop = true",
        "remote_nodes[0].port: expected a whole number, got '104'",
    ]
    assert sorted(problems) == sorted(expected), "\n".join(problems)


def test_every_mistake_of_one_rule_is_listed_in_one_run(tmp_path: Path) -> None:
    config = tmp_path / "router.toml"
    config.write_text("""
[[destinations]]
name = "pacs"
type = "dicom"
host = "10.0.0.5"
port = 104
ae_title = "PACS"

[[rules]]
name = "r1"
priority = "high"
destinations = ["pacs", "nowhere", "pacs"]
calling_aet = "bad\\\\x"
source_ip = "300.1.1.1"
match = [{tag = "PatientID", op = "eq"}, {tag = "NoSuchTag", op = "eq", value = "x"}, 5]
stop = "yes"
colour = "blue"

[[rules]]
priority = 3
""")
    problems = check_config(config)
    # In the fields' order, the unknown keys last (one format with the other sections).
    assert problems == [
        "rules[0].destinations[1]: unknown destination 'nowhere' (rule 'r1')",
        "rules[0].priority: expected an integer, got 'high'",
        "rules[0].calling_aet[0]: 'bad\\\\x' is not a valid AE title pattern",
        "rules[0].source_ip[0]: '300.1.1.1' is not an IP address or CIDR network",
        "rules[0].match[0].value: required for op 'eq'",
        "rules[0].match[1].tag: unknown tag 'NoSuchTag' (expected a DICOM keyword such as "
        "'Modality', '(gggg,eeee)' or 'ai.<destination>.<key>')",
        "rules[0].match[2]: expected a table with tag, op and value, got 5",
        "rules[0].destinations[2]: empty or duplicate destination 'pacs'",
        "rules[0].stop: expected true or false, got 'yes'",
        "rules[0].colour: unknown key (expected one of amendments, called_aet, calling_aet, "
        "description, destinations, enabled, expected_count, granularity, match, modality, "
        "name, priority, quiet_time, sop_class, source_ip, stop, transforms)",
        "rules[1].name: required",
        "rules[1].destinations: at least one destination is required unless stop = true",
    ], "\n".join(problems)


def test_cross_field_problems_name_the_field(tmp_path: Path) -> None:
    config = tmp_path / "router.toml"
    config.write_text('[dicom]\ntls_certificate = "/etc/router.pem"\nplain_listener = false\n'
                      'commitment_destination = "vault"\n'
                      '[dispatch]\ndefault_destination = "nowhere"\n'
                      '[[rules]]\nname = "all"\ndestinations = ["nowhere"]\n')
    assert check_config(config) == [
        "dicom.tls_port: required by tls_certificate",
        "dicom.plain_listener: false needs a TLS listener (tls_port)",
        "rules[0].destinations[0]: unknown destination 'nowhere' (rule 'all')",
        "dispatch.default_destination: 'nowhere' is not a declared destination",
        "dicom.commitment_destination: 'vault' is not a declared destination",
    ]


def test_duplicates_name_both_places(tmp_path: Path) -> None:
    config = tmp_path / "router.toml"
    node = 'ae_title = "PACS"\nhost = "10.0.0.5"\nport = 104\n'
    config.write_text('[[destinations]]\nname = "a"\ntype = "file"\npath = "/srv/a"\n'
                      '[[destinations]]\nname = "a"\ntype = "file"\npath = "/srv/b"\n'
                      f'[[remote_nodes]]\nname = "x"\n{node}[[remote_nodes]]\nname = "y"\n{node}')
    problems = check_config(config)
    assert "destinations[1].name: destination 'a' is declared more than once " \
           "(also destinations[0].name)" in problems
    assert "remote_nodes[1].ae_title: AE title 'PACS' is used by more than one remote node " \
           "(also remote_nodes[0].ae_title)" in problems


def test_the_environment_goes_through_the_same_models(tmp_path: Path) -> None:
    settings = load_settings({"DICOM_ROUTER_DICOM_MAX_ASSOCIATIONS": "7",
                              "DICOM_ROUTER_WEB_PUBLIC_METRICS": "true",
                              "DICOM_ROUTER_DISPATCH_RETRY_EVERY": "5m",
                              "DICOM_ROUTER_RECEIVER_PROCESSES": "0",
                              "DICOM_ROUTER_DICOM_PORT": "11113",
                              "DICOM_ROUTER_LOG_LEVEL": "debug",
                              "DICOM_ROUTER_SECRET_KEY": ""})  # empty: unset
    assert settings.dicom.max_associations == 7 and settings.web.public_metrics
    assert settings.dispatch.retry_every_after == 300.0 and settings.dicom.processes == 0
    assert settings.dicom_port == 11113 and settings.log_level == "DEBUG"
    assert settings.secret_key is None

    with pytest.raises(SettingsError) as caught:
        load_settings({"DICOM_ROUTER_DICOM_MAX_ASSOCIATIONS": "many",
                       "DICOM_ROUTER_INGEST_INVALID_UIDS": "fix",
                       "DICOM_ROUTER_HTTP_PROT": "8081",
                       "PATH": "/usr/bin"})
    assert caught.value.problems == [
        "DICOM_ROUTER_HTTP_PROT: unknown setting (did you mean DICOM_ROUTER_HTTP_PORT?)",
        "dicom.max_associations (DICOM_ROUTER_DICOM_MAX_ASSOCIATIONS): expected a whole "
        "number, got 'many'",
        "ingest.invalid_uids (DICOM_ROUTER_INGEST_INVALID_UIDS): must be 'refuse' or "
        "'repair', got 'fix'",
    ]
    assert str(caught.value).startswith("3 problems:\n  DICOM_ROUTER_HTTP_PROT")


def test_the_environment_wins_over_the_file_and_lists_only_scalars(tmp_path: Path) -> None:
    config = tmp_path / "router.toml"
    config.write_text("[dicom]\nmax_associations = 3\ntls_port = 2762\n")
    with pytest.raises(SettingsError) as caught:
        load_settings({"DICOM_ROUTER_DICOM_MAX_ASSOCIATIONS": "9"}, config)
    assert caught.value.problems == [
        "dicom.tls_certificate: required by tls_port (a PEM file)",
        "dicom.tls_private_key: required by tls_port (a PEM file)"]
    config.write_text("[dicom]\nmax_associations = 3\n")
    assert load_settings({"DICOM_ROUTER_DICOM_MAX_ASSOCIATIONS": "9"},
                         config).dicom.max_associations == 9
    names = environment_names()
    assert names["DICOM_ROUTER_DICOM_TLS_PORT"] == ("dicom", "tls_port")
    assert names["DICOM_ROUTER_DICOM_PORT"] == ("server", "dicom_port")
    assert "DICOM_ROUTER_WEB_TRUSTED_PROXIES" not in names  # lists: in the file


def test_a_rule_is_described_once_and_its_compiled_parts_are_not_keys() -> None:
    spec = parse_rule({"name": "r", "destinations": "pacs", "calling_aet": "CT_*",
                       "quiet_time": "2m", "match": [{"tag": "Modality", "op": "exists"}]})
    # As stored and followed by every process: the same rule, built without pydantic.
    assert stored_rule(spec.to_dict()) == spec and spec.quiet_time == 120.0
    with pytest.raises(RuleError) as caught:
        parse_rule({"name": "r", "destinations": ["pacs"], "_calling": "x"})
    assert caught.value.errors == {"_calling": "unknown key (did you mean 'calling_aet'?)"}
    assert "_calling" not in config_keys(RuleSpec)
    assert docs_of(RuleSpec)["priority"] == "lower runs first"


def test_problems_are_mapped_to_the_form_fields_they_belong_to() -> None:
    assert at_fields({"calling_aet[1]": "bad", "match[0].tag": "unknown", "port": "too big",
                      "calling_aet[3]": "worse", "": "whole"}) == {
        "calling_aet": "item 2: bad; item 4: worse", "match": "item 1: tag: unknown",
        "port": "too big", "form": "whole"}


def test_destination_names_and_types_and_every_problem_of_a_condition_in_one_run(
        tmp_path: Path) -> None:
    config = tmp_path / "router.toml"
    config.write_text("""
[[destinations]]
name = "pacs"
type = "dicom"
host = "10.0.0.5"
port = 104
ae_title = "PACS"

[[destinations]]
name = "cloud archive"
type = "fiel"
path = "/srv/archive"

[[destinations]]
name = "my pacs"
type = "dicom"
host = "10.0.0.6"
port = 0
ae_title = "PACS2"

[[rules]]
name = "ct"
destinations = ["pacs"]

[[rules]]
name = "mr"
destinations = ["pacs"]
match = [{tag = "Modalty", op = "equals", value = "MR"},
         {tag = "Rows", op = "gt", value = "many", case_sensitive = false}]
""")
    assert check_config(config) == [
        "destinations[1].name: invalid: use 1-64 characters of A-Z a-z 0-9 _ . - (no spaces)",
        "destinations[1].type: unknown type 'fiel'; did you mean 'file'?",
        "destinations[2].name: invalid: use 1-64 characters of A-Z a-z 0-9 _ . - (no spaces)",
        "destinations[2].port: must be between 1 and 65535, got 0",
        "rules[1].match[0].tag: unknown tag 'Modalty' (expected a DICOM keyword such as "
        "'Modality', '(gggg,eeee)' or 'ai.<destination>.<key>')",
        "rules[1].match[0].op: unknown operator 'equals' (expected one of eq, ne, in, "
        "contains, startswith, regex, exists, lt, gt, le, ge)",
        "rules[1].match[1].value: 'many' is not a number (Rows is US)",
        "rules[1].match[1].case_sensitive: does not apply to 'gt'",
    ]
