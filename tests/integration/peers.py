"""Real peers for integration tests: a DCMTK ``storescp`` and a moto S3 server over HTTP.

Each runs as a child process on a free 127.0.0.1 port, as a context manager that cleans up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import pytest
from bench_lib.procs import free_port as bench_free_port

STARTUP_TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port for a listener: free on 127.0.0.1 a moment ago, outside the kernel's
    ephemeral range and never handed out twice in one test session (the bench's picker).

    A port from ``bind(0)`` lies in the ephemeral range: any outgoing connection could take it
    before the listener binds, and two calls could return the same port. A three-node test
    once got a port twice; the second node exited on its bind failure after the first node
    had answered its readiness probe, and its DICOM port then refused every connection."""
    return bench_free_port()


def is_listening(port: int) -> bool:
    """Whether some socket listens on ``port`` (from /proc/net, without connecting to it).

    Connecting would make a DICOM SCP see (and log) a bogus association attempt.
    """
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    """Terminate a child, killing it if it has not exited within 5 s."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def require_tool(name: str) -> str:
    """The tool's path, or skip the test if it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} (DCMTK) is not installed")
    return path


class StoreScp:
    """DCMTK ``storescp`` writing received files into ``.folder``, with Nagle disabled.

    ``extra_args`` go before the port, e.g. ``("+xa",)`` to accept every transfer syntax
    storescp knows (its default accepts uncompressed syntaxes only). ``.log()`` returns its
    verbose output (one ``Association Received`` line per association).
    """

    def __init__(
        self,
        base: Path,
        ae_title: str = "STORESCP",
        extra_args: Sequence[str] = (),
        port: int = 0,
    ) -> None:
        self.ae_title = ae_title
        self._fixed_port = port  # 0: a free one
        self.folder = Path(base) / "storescp-received"
        self.log_path = Path(base) / "storescp.log"
        self.extra_args = tuple(extra_args)
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> StoreScp:
        tool = require_tool("storescp")
        self.folder.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):  # the free port may be taken before storescp binds it
            self.port = self._fixed_port or free_port()
            if self._start(tool):
                return self
        raise RuntimeError(f"storescp did not start; see {self.log_path}")

    def _start(self, tool: str) -> bool:
        args = [tool, "-v", "-aet", self.ae_title, "-od", str(self.folder), *self.extra_args]
        env = {**os.environ, "TCP_NODELAY": "1"}
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [*args, str(self.port)], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            if is_listening(self.port):
                return True
            time.sleep(0.02)
        self.stop()
        return False

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Terminate storescp (kill it if it does not exit within 5 s)."""
        process, self._process = self._process, None
        stop_process(process)

    def log(self) -> str:
        """Everything storescp printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until ``text`` appears ``count`` times in the log (it lags the network)."""
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def associations(self) -> int:
        """How many associations storescp has received so far."""
        return self.log().count("Association Received")

    def received(self) -> list[Path]:
        """The files received so far, sorted by name."""
        return sorted(p for p in self.folder.iterdir() if p.is_file())


class _MotoServer:
    """``moto_server`` as a child process: its own state, nothing shared with other tests."""

    def __init__(self, enforce_auth: bool) -> None:
        self.enforce_auth = enforce_auth
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        tool = Path(sys.executable).with_name("moto_server")
        if not tool.exists():
            tool = Path(shutil.which("moto_server") or pytest.skip("moto[server] is not installed"))
        env = dict(os.environ)
        if self.enforce_auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"  # check credentials from the first call
        for _attempt in range(3):  # the free port may be taken before moto binds it
            self.port = free_port()
            self._process = subprocess.Popen(
                [str(tool), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while self._process.poll() is None and time.monotonic() < deadline:
                if is_listening(self.port):
                    return f"http://127.0.0.1:{self.port}"
                time.sleep(0.02)
            self.stop()
        raise RuntimeError("moto_server did not start")

    def stop(self) -> None:
        process, self._process = self._process, None
        stop_process(process)


@contextlib.contextmanager
def s3_server(*, enforce_auth: bool = False) -> Iterator[str]:
    """A fresh moto S3 server over real HTTP on 127.0.0.1; yields its endpoint URL.

    Any credentials work unless ``enforce_auth``: then every request needs an access key
    known to moto's IAM (so a made-up key gets ``InvalidAccessKeyId``).
    """
    server = _MotoServer(enforce_auth)
    endpoint = server.start()
    try:
        yield endpoint
    finally:
        server.stop()
