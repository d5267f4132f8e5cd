"""A throw-away PostgreSQL for tests: the distribution's `postgresql` package (initdb, pg_ctl), a cluster
in a temporary directory owned by an unprivileged user, listening on 127.0.0.1 and a free port only.

PostgreSQL refuses to run as root, so under root the cluster runs as `nobody`. fsync is off: the data is
thrown away, and durability across a crash of the machine is PostgreSQL's business, not the tests'.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "scripts" / "install-postgres.sh"


def _bindir() -> Path | None:
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    found.sort(key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(found[-1]).parent if found else None


def postgres_bindir() -> Path:
    """initdb's directory, installing the package (scripts/install-postgres.sh) where it is missing; skips
    the test, with the reason, only where it cannot be installed."""
    bindir = _bindir()
    if bindir is None:
        run = subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True, timeout=600)
        bindir = _bindir()
        if bindir is None:
            tail = (run.stdout + run.stderr).strip().splitlines()[-3:]
            pytest.skip(
                f"PostgreSQL (the distribution's postgresql package) cannot be installed: {' '.join(tail)}"
            )
    return bindir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.port = 0
        self.dir: Path | None = None
        self._user: str | None = None

    def _run(self, *args: str) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.dir), "LC_ALL": "C"}
        subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            check=True,
            capture_output=True,
            cwd=self.dir,
            env=env,
            user=self._user,
            group=self._user and pwd.getpwnam(self._user).pw_gid,
            timeout=120,
        )

    def start(self) -> PostgresCluster:
        self.dir = Path(tempfile.mkdtemp(prefix="diffserve-pg-"))
        if os.geteuid() == 0:
            self._user = "nobody"
            entry = pwd.getpwnam(self._user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", "data", "-U", "diffserve", "--auth=trust", "-E", "UTF8", "--no-sync")
        self.port = _free_port()
        options = f"-h 127.0.0.1 -p {self.port} -k {self.dir} -F -c max_connections=100"
        try:
            self._run("pg_ctl", "-D", "data", "-o", options, "-l", "server.log", "-w", "-t", "60", "start")
        except subprocess.CalledProcessError as e:
            log = (
                (self.dir / "server.log").read_text(errors="replace")
                if (self.dir / "server.log").exists()
                else ""
            )
            raise RuntimeError(f"PostgreSQL did not start: {e.stderr!r}\n{log}") from None
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://diffserve@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.dir is None:
            return
        try:
            self._run("pg_ctl", "-D", "data", "-m", "immediate", "-w", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None


def cluster_fixture():
    """The body of a module- or session-scoped fixture: a started cluster, stopped and removed after."""
    pytest.importorskip("psycopg", reason="psycopg 3 (pip install 'diffserve[postgres]') is not installed")
    cluster = PostgresCluster(postgres_bindir()).start()
    try:
        yield cluster
    finally:
        cluster.stop()
