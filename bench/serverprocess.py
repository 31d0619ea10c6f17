"""Run this site in a uvicorn or daphne child process on a free loopback port.

Shared by the benchmarks (`manage.py chatbench`) and the live-server tests.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from django.conf import settings

LOG_TAIL_CHARS = 4000
# The server refuses (closes with 1009) a WebSocket message over this many bytes without
# buffering it; the consumer answers frames over CHAT_FRAME_MAX_BYTES (64 KiB) with an error frame.
WS_MAX_MESSAGE_BYTES = 1024 * 1024
# uvicorn's WebSocket protocol implementations, by --server name; "uvicorn" is how bin/serve runs the site.
UVICORN_WS = {
    "uvicorn": "websockets-sansio",
    "uvicorn-legacy-ws": "websockets",
    "uvicorn-wsproto": "wsproto",
    # bin/serve's, but compressing each frame for clients that offer permessage-deflate (chatbench --deflate).
    "uvicorn-deflate": "websockets-sansio",
}


class ServerFailed(Exception):
    """A server process that died or did not answer; the message ends with its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """One uvicorn or daphne process on its own port; output goes to a log file."""

    def __init__(
        self, name: str, kind: str, app: str, env: dict[str, str], log_path: Path, uvicorn_options: Sequence[str] = ()
    ) -> None:
        self.name = name
        self.kind = kind
        self.app = app
        self.env = env
        self.log_path = log_path
        # Added to the production command's (a test's short keep-alive interval, say).
        self.uvicorn_options = list(uvicorn_options)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.kind == "daphne":
            return [
                sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port),
                "--websocket-max-message-size", str(WS_MAX_MESSAGE_BYTES), self.app,
            ]  # fmt: skip
        ws = UVICORN_WS[self.kind]
        return [
            sys.executable, "-m", "uvicorn", self.app,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--no-access-log", "--log-level", "warning", "--loop", "uvloop", "--ws", ws,
            "--ws-max-size", str(WS_MAX_MESSAGE_BYTES),
            "--ws-per-message-deflate", "true" if self.kind == "uvicorn-deflate" else "false",
            *self.uvicorn_options,
        ]  # fmt: skip

    def spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"=== {self.name}: {' '.join(self.command())}\n".encode())
            log.flush()
            # No reloader and no worker fork: Popen.pid is the process that serves.
            self.proc = subprocess.Popen(
                self.command(),
                cwd=settings.BASE_DIR,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float) -> None:
        """Block until GET / answers (any status); ServerFailed if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerFailed(
                    f"{self.name} ({self.kind} {self.app}) exited with code {self.proc.returncode} before "
                    f"answering HTTP.\n{self.log_tail()}"
                )
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                conn.request("GET", "/")
                conn.getresponse().read()
                return
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()
            if time.monotonic() > deadline:
                raise ServerFailed(
                    f"{self.name} ({self.kind} {self.app}) did not answer GET / within {timeout:.0f} s.\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.1)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_ticks(self) -> int | None:
        """utime + stime of the process (all its threads), in clock ticks."""
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except (OSError, AttributeError):
            return None
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)

    def peak_rss_mib(self) -> float | None:
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except (OSError, AttributeError):
            return None
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
        return round(int(match.group(1)) / 1024, 1) if match else None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the process (no graceful shutdown) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - nothing more we can do
                pass

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self) -> str:
        return f"--- {self.name} log ({self.log_path}), tail ---\n{self.log_text()[-LOG_TAIL_CHARS:]}"


class ClusterHost(ServerProcess):
    """An app host of `bin/cluster`'s, measured but not started here: its sockets go through HAProxy.

    `port` is HAProxy's, on the loopback (it spreads the sockets over the
    hosts, least connections first); the CPU and memory are the host's
    uvicorn process's. The cluster is the operator's: stopping the bench
    leaves it running.
    """

    def __init__(self, name: str, port: int, pid: int, log_path: Path) -> None:
        super().__init__(name, "uvicorn", "chatsite.asgi:application", {}, log_path)
        self.port = port
        self.proc = _Running(pid)  # type: ignore[assignment]

    @classmethod
    def of_cluster(cls, name: str) -> list[ClusterHost]:
        """The app hosts of the cluster `bin/cluster up` started with CLUSTER_NAME=name."""
        directory = Path(os.environ.get("CLUSTER_DIR", f"/tmp/{name}-cluster"))
        try:
            port = int((directory / "port").read_text())
        except OSError:
            raise ServerFailed(f"No cluster named {name!r} is up ({directory}/port): run bin/cluster up.") from None
        hosts = []
        for host in ("app1", "app2", "app3"):
            listed = subprocess.run(["ip", "netns", "pids", f"{name}-{host}"], capture_output=True, text=True)
            pids = [int(pid) for pid in listed.stdout.split()]
            uvicorn = [pid for pid in pids if b"uvicorn" in _cmdline(pid)]
            if uvicorn:
                hosts.append(cls(host, port, uvicorn[0], directory / "logs" / f"{host}.log"))
        if not hosts:
            raise ServerFailed(f"The cluster {name!r} runs no app host: bin/cluster status says why.")
        return hosts

    def spawn(self) -> None:
        raise ServerFailed("A cluster's hosts are started by bin/cluster.")

    def wait_ready(self, timeout: float) -> None:
        pass

    def stop(self) -> None:
        pass

    def kill(self) -> None:
        pass


class _Running:
    """The little of subprocess.Popen that measuring a process not started here needs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> int | None:
        return None if Path(f"/proc/{self.pid}").exists() else 0


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
