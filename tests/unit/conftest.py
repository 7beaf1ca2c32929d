"""Fixtures shared by the unit tests."""

import itertools
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from anchor_node.store.location import StoreLocation, migrate_store, parse_store
from tests.unit.postgres_kit import PostgresServer, find_binaries
from tests.unit.store_kit import Backend
from upmt.offload import probe_udp_offload


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Sockets a test opens, closed after it."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback (::1) here")


# CI runs on kernels with UDP GSO and GRO: there a missing one is a failure, not a skip.
needs_udp_offload = pytest.mark.skipif(
    bool(probe_udp_offload()) and os.environ.get("CI") != "true",
    reason="this kernel has no UDP_GRO or UDP_SEGMENT",
)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the whole session, on a unix socket only.

    Skipped where it cannot start (no PostgreSQL installed, no `postgres`
    user for a root run); under CI, which installs it, that is a failure.
    """
    bindir = find_binaries()
    reason = None
    server = None
    if bindir is None:
        reason = "no PostgreSQL here (initdb and postgres; Debian: postgresql)"
    else:
        try:
            server = PostgresServer(bindir)
            server.start()
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            detail = (
                exc.stderr.decode(errors="replace").strip()
                if isinstance(exc, subprocess.CalledProcessError) and exc.stderr
                else str(exc)
            )
            reason = f"PostgreSQL did not start: {detail}"
            if server is not None:
                server.stop()
            server = None
    if server is None:
        assert reason is not None
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    yield server
    server.stop()


_databases = itertools.count()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database of the session's cluster, as a `--store` URL."""
    return postgres_server.create_database(f"t{os.getpid()}_{next(_databases)}")


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each store implementation in turn, migrated and empty."""
    if request.param == "postgresql":
        location = parse_store(request.getfixturevalue("postgres_url"), tmp_path / "unused")
        migrate_store(location)
    else:
        location = StoreLocation(path=tmp_path / "store.sqlite")
    backend = Backend(request.param, location)
    yield backend
    backend.close()


@pytest.fixture
def pg(postgres_url: str, tmp_path: Path) -> Iterator[Backend]:
    """The PostgreSQL store alone, migrated and empty."""
    location = parse_store(postgres_url, tmp_path / "unused")
    migrate_store(location)
    backend = Backend("postgresql", location)
    yield backend
    backend.close()
