"""deploy/docker: no container engine runs here, so the compose file and the Dockerfile are
checked for what can be known without one: the services and their health checks, that the
router's environment, commands and router.toml are settings and commands the router has,
that the proxy trusted by the nodes is nginx's address, and that the Dockerfile installs as
scripts/run does, as a non-root user, with a health check on the readiness route."""

from __future__ import annotations

import ipaddress
import re
import shlex
import subprocess
import tomllib
from typing import Any

import pytest
import yaml

from router.cli import _parser
from router.settings import environment_names, settings_problems
from tests.deploy_files import DEPLOY, read_env_file
from web.health import ROUTES as HEALTH_ROUTES

DOCKER = DEPLOY / "docker"
ROOT = DEPLOY.parent
ROUTERS = ("router-1", "router-2")
ONE_SHOTS = ("migrate", "minio-bucket")
_VARIABLE = re.compile(r"\$\{(\w+)(?::?[-?][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(document, dict)
    return document


def interpolated(value: str) -> str:
    """Compose's ${NAME} / ${NAME:?message} with env.example's values; $$ is a dollar."""
    example = read_env_file(DOCKER / "env.example")
    return _VARIABLE.sub(lambda m: example[m.group(1)], value).replace("$$", "$")


def router_environment(service: dict[str, Any]) -> dict[str, str]:
    return {name: interpolated(str(value)) for name, value in service["environment"].items()}


def test_the_services_and_their_health_checks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "minio", "nginx", *ROUTERS, *ONE_SHOTS}
    assert services["postgres"]["image"].startswith("postgres:16")
    for name, service in services.items():
        if name in ONE_SHOTS:
            assert service.get("restart", "no") == "no", name
            continue
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"][0] == "CMD", name
    for name in ROUTERS:
        test = " ".join(services[name]["healthcheck"]["test"])
        assert "/readyz" in test
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"}
    assert services["nginx"]["depends_on"] == {r: {"condition": "service_healthy"}
                                               for r in ROUTERS}


def test_the_router_image_is_built_from_this_repository(compose: dict[str, Any]) -> None:
    for name in (*ROUTERS, "migrate"):
        build = compose["services"][name]["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == ROOT and (context / build["dockerfile"]).resolve() == (
            DOCKER / "Dockerfile")


def test_the_nodes_environment_names_settings_the_router_has(compose: dict[str, Any]) -> None:
    known = set(environment_names())
    node_ids = set()
    for name in (*ROUTERS, "migrate"):
        environment = router_environment(compose["services"][name])
        if name in ROUTERS:
            node_ids.add(environment.get("DICOM_ROUTER_NODE_ID"))
        unknown = set(environment) - known
        assert not unknown, f"{name}: not settings: {sorted(unknown)}"
        doc = tomllib.loads((DOCKER / "router.toml").read_text())
        settings, problems = settings_problems(doc, environment)
        assert problems == [], problems
        assert settings is not None and settings.is_postgres
        assert settings.web.secure_cookies
        assert settings.storage.backend == "s3"  # one blob store for both nodes
    assert node_ids == {"router-1", "router-2"}  # each node its own, stable id


def test_the_nodes_trust_nginx_and_only_nginx(compose: dict[str, Any]) -> None:
    doc = tomllib.loads((DOCKER / "router.toml").read_text())
    nginx = ipaddress.ip_address(
        compose["services"]["nginx"]["networks"]["backend"]["ipv4_address"])
    [subnet] = compose["networks"]["backend"]["ipam"]["config"]
    assert nginx in ipaddress.ip_network(subnet["subnet"])
    assert [ipaddress.ip_network(n) for n in doc["web"]["trusted_proxies"]] == [
        ipaddress.ip_network(f"{nginx}/32")]
    for name in ROUTERS:
        assert compose["services"][name]["networks"] == ["backend"]
        assert not any(str(p).split(":")[-1] == "8080" for p in
                       compose["services"][name].get("ports", [])), "HTTP bypassing nginx"


@pytest.mark.parametrize(("service", "command"), [
    ("migrate", "migrate"), ("router-1", "serve"), ("router-2", "serve")])
def test_each_node_runs_a_real_subcommand(compose: dict[str, Any], service: str,
                                          command: str) -> None:
    args = _parser().parse_args(compose["services"][service]["command"])
    assert args.command == command
    mounts = compose["services"][service]["volumes"]
    assert f"./router.toml:{args.config}:ro" in mounts
    if command == "serve":  # each node keeps its spool in its own volume at the data folder
        assert any(m.endswith(":/var/lib/dicom-router") for m in mounts)
    # More than [dispatch] shutdown_grace (20 s) between SIGTERM and SIGKILL.
    assert int(compose["services"][service]["stop_grace_period"].removesuffix("s")) > 20


def test_nginx_gets_the_shipped_site_with_the_nodes_as_upstream(
        compose: dict[str, Any]) -> None:
    nginx = compose["services"]["nginx"]
    mount = next(m for m in nginx["volumes"] if m.endswith("dicom-router.conf:ro"))
    source, target, _ = mount.split(":")
    assert (DOCKER / source).resolve() == DEPLOY / "nginx" / "dicom-router.conf"
    # The entrypoint's sed, run on the shipped file: every edit must still find its line.
    [script] = nginx["command"]
    sed = script.split(" > ")[0].replace(target, str(DEPLOY / "nginx" / "dicom-router.conf"))
    site = subprocess.run(["/bin/sh", "-c", sed], capture_output=True, text=True, check=True,
                          timeout=30).stdout
    assert "server router-1:8080; server router-2:8080;" in site
    assert "127.0.0.1:8080" not in site and "listen [::]" not in site
    assert "access_log /dev/stdout dicom_router_nophi;" in site
    assert "access_log /var/log" not in site


def dockerfile_lines() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined."""
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    return [" ".join(line.split()) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_the_dockerfile_installs_as_scripts_run_does() -> None:
    run = (ROOT / "scripts" / "run").read_text()
    installs = [" ".join(shlex.split(line.split(">")[0])) for line in run.splitlines()
                if ".venv/bin/pip install" in line]
    assert len(installs) == 2
    docker = " ".join(dockerfile_lines()).replace(" --no-cache-dir", "")
    for command in installs:
        assert command in docker, command


def test_the_image_runs_as_a_user_and_checks_readiness() -> None:
    lines = dockerfile_lines()
    final = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM "))]
    assert final.startswith("FROM python:3.11-slim")  # constraints.txt is for CPython 3.11
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users == ["dicom-router"]
    [health] = [line for line in lines if line.startswith("HEALTHCHECK ")]
    paths = {route.path for route in HEALTH_ROUTES if route.method == "GET"}
    assert "/readyz" in health and "/readyz" in paths
    assert 'ENTRYPOINT ["dicom-router"]' in lines
    assert "DICOM_ROUTER_DATA_DIR=/var/lib/dicom-router" in " ".join(lines)
    assert "DICOM_ROUTER_DATA_DIR" in environment_names()
