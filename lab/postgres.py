"""A throwaway PostgreSQL server: its own cluster, removed when stopped.

`initdb` and `postgres` (from PATH, else Debian's /usr/lib/postgresql/*/bin)
run in a fresh directory under /tmp, as the `postgres` user when the caller
is root (the server refuses root; root's home and pytest's temporary
directories may be 0700, which that user cannot cross). The cluster runs
without fsync (nothing of it outlives its user).

By default it opens no TCP port (``listen_addresses=''``), only its unix
socket: what the store's unit tests use. The lab starts it inside one of
its network namespaces instead, listening on that namespace's address, with
trust authentication for the lab's network only: nothing leaves the lab.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, LiteralString

import psycopg

__all__ = ["PostgresServer", "find_binaries"]

START_TIMEOUT = 30.0


def find_binaries() -> Path | None:
    """The directory holding `initdb` and `postgres`, the newest Debian version first."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    found = shutil.which("initdb")
    if found is not None:
        candidates.append(str(Path(found).resolve().parent))
    for directory in candidates:
        if (Path(directory) / "initdb").exists() and (Path(directory) / "postgres").exists():
            return Path(directory)
    return None


class PostgresServer:
    """One cluster: `start` it, make databases, `stop` it (and its directory goes).

    `netns`: the network namespace the server runs in (root only), where it
    listens on `listen` and trusts clients from the network `trust` (CIDR).
    """

    def __init__(
        self,
        bindir: Path,
        *,
        netns: str | None = None,
        listen: str = "",
        trust: str | None = None,
        prefix: str = "upmt-pg-",
    ) -> None:
        if netns is not None and os.geteuid() != 0:
            raise RuntimeError("a server in a network namespace needs root")
        self.bindir = bindir
        self.netns = netns
        self.listen = listen
        self.trust = trust
        self.root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log = self.root / "postgres.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._user: str | None = None
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.root, ignore_errors=True)
                raise RuntimeError("running as root and there is no 'postgres' user") from None
            self._user = "postgres"
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.socket_dir.mkdir()
        if self._user is not None:
            shutil.chown(self.socket_dir, self._user, self._user)

    def start(self) -> None:
        subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            user=self._user,
            check=True,
            capture_output=True,
            cwd=self.root,
        )
        if self.trust is not None:
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.write(f"host all postgres {self.trust} trust\n")
        server = [
            str(self.bindir / "postgres"),
            "-D",
            str(self.data),
            "-k",
            str(self.socket_dir),
            "-c",
            f"listen_addresses={self.listen}",
            "-c",
            "fsync=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=60",
            "-c",
            "shared_buffers=16MB",
        ]
        user = self._user
        if self.netns is not None:
            # Entering the namespace needs root, the server refuses it: drop to
            # the server's user after `ip netns exec` (both exec, one pid).
            drop = ["setpriv", f"--reuid={self._user}", f"--regid={self._user}", "--init-groups"]
            server = ["ip", "netns", "exec", self.netns, *drop, *server]
            user = None
        with open(self.log, "wb") as log:
            self._process = subprocess.Popen(
                server, user=user, stdout=log, stderr=subprocess.STDOUT, cwd=self.root
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"postgres exited at start: {self.log_tail()}")
            try:
                with psycopg.connect(self.conninfo("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not start: {self.log_tail()}") from None
                time.sleep(0.05)

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])
        return "(no log)"

    def conninfo(self, dbname: str) -> str:
        return f"host={self.socket_dir} user=postgres dbname={dbname}"

    def url(self, dbname: str) -> str:
        """A `--store` URL for `dbname` (the socket directory as the host parameter)."""
        return f"postgresql://postgres@/{dbname}?host={self.socket_dir}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def query(
        self, dbname: str, sql: LiteralString, params: tuple[Any, ...] = ()
    ) -> list[tuple[Any, ...]]:
        """The rows of one statement, over the unix socket."""
        with psycopg.connect(self.conninfo(dbname), autocommit=True) as conn:
            return list(conn.execute(sql, params).fetchall())

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self.root, ignore_errors=True)
