"""A PostgreSQL cluster of a test's own, to stop and start under load.

`PostgresCluster` runs initdb into a temporary directory and serves it on a
free loopback port (no Unix socket), with trust authentication. The
machine's shared cluster (the one DATABASE_URL names) is never touched.
initdb refuses to run as root, so as root the cluster runs as the `postgres`
user (runuser), in a directory that user owns.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
from django.db import connections

from tests.servers import port_outside_ephemeral_range

START_TIMEOUT = 30  # seconds for pg_ctl to see the server accept connections
STOP_TIMEOUT = 30
DATABASE = "chat"


def postgres_bindir() -> Path:
    """The directory of initdb and pg_ctl: $PG_BINDIR, the newest /usr/lib/postgresql/*/bin, or PATH."""
    if os.environ.get("PG_BINDIR"):
        return Path(os.environ["PG_BINDIR"])
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if versions:
        return Path(versions[-1]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError(
        "No initdb found: install PostgreSQL's server package (apt-get install postgresql) "
        "or set PG_BINDIR to the directory holding initdb and pg_ctl."
    )


class PostgresCluster:
    """One postgres server of a test's own: `start()` (initdb the first time), `stop(mode)`, `start()`, `destroy()`."""

    def __init__(self) -> None:
        self.bindir = postgres_bindir()
        self.directory = Path(tempfile.mkdtemp(prefix="pgcluster-"))
        self.data = self.directory / "data"
        self.log_path = self.directory / "postgres.log"
        self.port = port_outside_ephemeral_range()
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/{DATABASE}"
        # initdb and postgres refuse root: run them as the postgres user, in a directory it owns.
        self.run_as: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.directory, owner.pw_uid, owner.pw_gid)
            self.run_as = ["runuser", "-u", "postgres", "--"]

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        command = [*self.run_as, str(self.bindir / tool), *args]
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")

    def start(self) -> None:
        """Start (or restart, on the same port) and return once it accepts connections."""
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        # Loopback TCP only: no Unix socket in a directory the shared cluster uses. fsync off: the
        # tests stop the server, never the machine, so the OS still holds whatever was committed.
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off"
        self._run(
            "pg_ctl", "start", "-D", str(self.data), "-w", "-t", str(START_TIMEOUT), "-l", str(self.log_path),
            "-o", options, timeout=START_TIMEOUT + 5,
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop: "fast" ends every session (a clean shutdown), "immediate" is a crash the next start recovers from."""
        assert mode in {"smart", "fast", "immediate"}, mode
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", str(STOP_TIMEOUT))

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def create_database(self, name: str = DATABASE) -> None:
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres") as conn:
            conn.autocommit = True
            conn.execute(f'CREATE DATABASE "{name}"')

    def destroy(self, keep_log_in: Path | None = None) -> None:
        """Stop the server if it runs, and remove its directory (keeping its log in `keep_log_in`)."""
        if self.running():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.stop("immediate")
        if keep_log_in is not None:
            with contextlib.suppress(OSError):
                shutil.copy(self.log_path, keep_log_in / self.log_path.name)
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def default_database_on(cluster: PostgresCluster, name: str = DATABASE) -> Iterator[None]:
    """Point this process's `default` database at the cluster for a while, then back at the test database.

    Every connection of the alias, in every thread, reads the one settings dict
    (the way Django's own test runner renames the database), so the test's
    helpers (users, sessions, rooms, reading the messages back) work on the
    cluster unchanged. The tests open a connection per use (CONN_MAX_AGE 0),
    so no connection to the test database stays open meanwhile.
    """
    settings_dict = connections["default"].settings_dict
    keys = ("NAME", "USER", "PASSWORD", "HOST", "PORT")
    saved = {key: settings_dict[key] for key in keys}
    connections["default"].close()
    settings_dict.update(NAME=name, USER="postgres", PASSWORD="", HOST="127.0.0.1", PORT=str(cluster.port))
    try:
        yield
    finally:
        connections["default"].close()
        settings_dict.update(saved)
