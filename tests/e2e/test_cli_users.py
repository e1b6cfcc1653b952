"""``dicom-router user add|passwd|list`` as a real process (password on stdin or typed at a
terminal), then logging in with that account through the web application."""

from __future__ import annotations

import getpass
import os
import pty
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.conftest import make_settings
from tests.e2e.conftest import ROUTER_BIN, SECRET_KEY
from tests.web_harness import Browser


def cli(tmp_path: Path, database_url: str, *args: str, stdin: str = ""
        ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DICOM_ROUTER_DATABASE_URL": database_url,
           "DICOM_ROUTER_SECRET_KEY": SECRET_KEY}
    return subprocess.run([str(ROUTER_BIN), "--data-dir", str(tmp_path / "data"), *args],
                          input=stdin, env=env, capture_output=True, text=True, timeout=60)


def test_user_add_and_passwd_from_stdin_then_log_in_through_the_web(
    tmp_path: Path, database_url: str, web_router: Any,
) -> None:
    added = cli(tmp_path, database_url, "user", "add", "alice", "--role", "admin",
                stdin="alice's first password\n")
    assert added.returncode == 0, added.stderr
    assert "created user 'alice' with role admin" in added.stdout
    assert cli(tmp_path, database_url, "user", "add", "rob", "--role", "radiologist",
               stdin="rob's long password\n").returncode == 0
    changed = cli(tmp_path, database_url, "user", "passwd", "alice",
                  stdin="alice's second password\n")
    assert changed.returncode == 0, changed.stderr
    listing = cli(tmp_path, database_url, "user", "list")
    lines = listing.stdout.splitlines()
    assert listing.returncode == 0 and len(lines) == 2
    assert lines[0].split()[:3] == ["alice", "admin", "enabled"]
    assert lines[1].split()[:3] == ["rob", "radiologist", "enabled"]

    server = web_router(make_settings(tmp_path, database_url))
    assert Browser(server.url).login("alice", "alice's first password").status_code == 401
    browser = Browser(server.url)
    assert browser.login("alice", "alice's second password").status_code == 200
    assert browser.get(browser.url("/users")).status_code == 200  # she is an admin
    assert server.router.users.get("admin") is None  # users existed: no first admin made
    rob = Browser(server.url)
    assert rob.login("rob", "rob's long password").status_code == 200
    assert rob.get(rob.url("/users")).status_code == 403
    actors = {server.router.stores.admin.mapper.to_domain_event(n).actor
              for n in server.router.stores.admin.recorder.select_notifications(0, 100)}
    assert actors == {f"cli:{getpass.getuser()}"}


def test_user_commands_refuse_bad_input_with_exit_code_2(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'db'}"
    assert cli(tmp_path, database_url, "user", "add", "alice", "--role", "admin",
               stdin="alice's first password\n").returncode == 0
    refused = [
        ("at least 12", ("add", "carl", "--role", "auditor"), "short\n"),
        ("72 bytes", ("add", "carl", "--role", "auditor"), "é" * 40 + "\n"),
        ("already exists", ("add", "alice", "--role", "auditor"), "whatever password\n"),
        ("user name", ("add", "bad/name", "--role", "auditor"), "whatever password\n"),
        ("does not exist", ("passwd", "nobody"), "whatever password\n"),
        ("no password given", ("passwd", "alice"), ""),
        ("invalid choice", ("add", "dan", "--role", "root"), ""),
    ]
    for message, args, stdin in refused:
        result = cli(tmp_path, database_url, "user", *args, stdin=stdin)
        assert result.returncode == 2 and message in result.stderr, (message, result.stderr)
    listing = cli(tmp_path, database_url, "user", "list").stdout
    assert [line.split()[0] for line in listing.splitlines()] == ["alice"]


def typed(tmp_path: Path, answers: list[str], *args: str) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal, typing each answer at the next prompt."""
    env = {**os.environ, "DICOM_ROUTER_DATABASE_URL": f"sqlite:///{tmp_path / 'db'}",
           "DICOM_ROUTER_SECRET_KEY": SECRET_KEY}
    pid, fd = pty.fork()
    if pid == 0:  # the child: its terminal is the pty
        os.execve(str(ROUTER_BIN), [str(ROUTER_BIN), "--data-dir", str(tmp_path / "data"),
                                    *args], env)
    output = b""
    deadline = time.monotonic() + 60
    answered = 0
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 1024)
        except OSError:  # the child exited and closed the terminal
            break
        if not chunk:
            break
        output += chunk
        # Answer each prompt once it is shown (getpass flushes what was typed before it).
        if answered < len(answers) and output.count(b"password: ") > answered:
            os.write(fd, answers[answered].encode() + b"\n")
            answered += 1
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_user_add_at_a_terminal_asks_twice(tmp_path: Path) -> None:
    code, output = typed(tmp_path, ["a typed password", "another typed one"],
                         "user", "add", "tess", "--role", "operator")
    assert code == 2 and "the two passwords differ" in output
    assert "a typed password" not in output  # not echoed
    code, output = typed(tmp_path, ["a typed password", "a typed password"],
                         "user", "add", "tess", "--role", "operator")
    assert code == 0 and "Repeat the password" in output, output
    assert "created user 'tess'" in output
