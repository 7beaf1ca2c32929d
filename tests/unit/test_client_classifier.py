"""Classifier: real sockets and processes end to end, fakes for the counters."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ground.errors import MalformedError
from paft.flow import PROTO_ICMP, PROTO_TCP, PROTO_UDP, FiveTuple
from upmt_client.classifier import Classifier
from upmt_client.procscan import ProcessIndex
from upmt_client.sockdiag import SockDiag, SocketOwner

LOOP = socket.inet_pton(socket.AF_INET, "127.0.0.1")

# Holds one UDP socket, announces its port, and waits for its stdin to close.
CHILD = """
import socket, sys
with open("/proc/self/comm", "w") as comm:
    comm.write("upmt-test-app")
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
sys.stdin.read()
"""


@pytest.fixture
def classifier() -> Iterator[Classifier]:
    try:
        diag = SockDiag()
    except OSError as exc:
        pytest.skip(f"NETLINK_SOCK_DIAG is unavailable here: {exc}")
    made = Classifier(diag)
    yield made
    made.close()


@pytest.fixture
def child() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    port = int(process.stdout.readline())
    yield process, port
    process.communicate(b"")


def test_classify_a_flow_of_this_process(classifier: Classifier) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as client:
            key = FiveTuple(
                PROTO_TCP, LOOP, client.getsockname()[1], LOOP, listener.getsockname()[1]
            )
            app = classifier.classify(key)
    assert app is not None
    assert app.pid == os.getpid()
    assert app.name == Path("/proc/self/comm").read_text().rstrip("\n")
    assert app.exe == os.readlink("/proc/self/exe")
    assert app.uid == os.geteuid()


def test_classify_a_udp_socket_of_another_process(
    classifier: Classifier, child: tuple[subprocess.Popen[bytes], int]
) -> None:
    process, port = child
    # The child's unconnected socket answers for any peer.
    key = FiveTuple(PROTO_UDP, LOOP, port, socket.inet_pton(socket.AF_INET, "192.0.2.1"), 53)
    app = classifier.classify(key)
    assert app is not None
    assert app.pid == process.pid
    assert app.name == "upmt-test-app"
    assert app.exe == os.path.realpath(sys.executable)
    assert app.exe_name == os.path.basename(os.path.realpath(sys.executable))
    assert app.cmdline[:2] == (sys.executable, "-c")


def test_data_path_and_worker_split(
    classifier: Classifier, child: tuple[subprocess.Popen[bytes], int]
) -> None:
    process, port = child
    owner = classifier.owner(FiveTuple(PROTO_UDP, LOOP, port, LOOP, 9))
    assert owner is not None
    assert classifier.cached_app(owner) is None  # the worker has not run yet
    app = classifier.app_for_owner(owner)
    assert app is not None and app.pid == process.pid
    assert classifier.cached_app(owner) is app
    stats = classifier.statistics()
    assert (stats.lookups, stats.diag_hits, stats.app_lookups) == (1, 1, 1)
    assert (stats.cached_app_hits, stats.cached_app_misses) == (1, 1)


def test_unclassifiable_flows(classifier: Classifier) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    assert classifier.classify(FiveTuple(PROTO_ICMP, LOOP, 7, LOOP, 7)) is None
    assert classifier.classify(FiveTuple(PROTO_UDP, LOOP, free, LOOP, 9)) is None
    stats = classifier.statistics()
    assert (stats.unsupported, stats.lookups, stats.diag_misses) == (1, 1, 1)
    assert stats.scans == 0  # a miss in sock_diag never reaches /proc


# --- with fakes ---------------------------------------------------------------


class FakeDiag:
    def __init__(self, owners: dict[FiveTuple, SocketOwner]) -> None:
        self.owners = owners
        self.failure: Exception | None = None

    def lookup(self, key: FiveTuple) -> SocketOwner | None:
        if self.failure is not None:
            raise self.failure
        return self.owners.get(key)

    def close(self) -> None:
        pass


def fake_proc(root: Path, pid: int, sockets: dict[int, int]) -> None:
    base = root / str(pid)
    (base / "fd").mkdir(parents=True)
    rest = "S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0"
    (base / "stat").write_text(f"{pid} (app{pid}) {rest} {pid * 10} 0\n")
    (base / "comm").write_text(f"app{pid}\n")
    (base / "cmdline").write_bytes(f"app{pid}\0".encode())
    for fd, inode in sockets.items():
        (base / "fd" / str(fd)).symlink_to(f"socket:[{inode}]")


def key(port: int) -> FiveTuple:
    return FiveTuple(PROTO_TCP, LOOP, port, LOOP, 80)


def test_errors_are_counted_not_raised(tmp_path: Path) -> None:
    diag = FakeDiag({})
    classifier = Classifier(diag, ProcessIndex(tmp_path))
    diag.failure = TimeoutError("no reply")
    assert classifier.owner(key(1)) is None
    diag.failure = MalformedError("garbage")
    assert classifier.owner(key(1)) is None
    assert classifier.statistics().diag_errors == 2


def test_socket_without_process_and_cache_bound(tmp_path: Path) -> None:
    uid = os.geteuid()
    fake_proc(tmp_path, 10, {3: 100, 4: 101, 5: 102})
    owners = {key(port): SocketOwner(inode, uid) for port, inode in [(1, 100), (2, 101), (3, 102)]}
    owners[key(4)] = SocketOwner(999, uid)  # a socket no process holds any more
    index = ProcessIndex(tmp_path, min_rescan_interval=0.0)
    classifier = Classifier(FakeDiag(owners), index, max_cached_sockets=2)
    apps = [classifier.classify(key(port)) for port in (1, 2, 3)]
    assert [app.pid if app else None for app in apps] == [10, 10, 10]
    assert classifier.classify(key(4)) is None
    # Only the two most recent sockets are remembered for the data path.
    assert classifier.cached_app(SocketOwner(100, uid)) is None
    assert classifier.cached_app(SocketOwner(102, uid)) is apps[2]
    stats = classifier.statistics()
    assert stats.no_process == 1
    assert stats.scans == 2  # the first lookup, then the miss for inode 999
    assert stats.inode_cache_hits == 2
    assert stats.app_cache_hits == 2


# --- cost on this machine -------------------------------------------------------


def test_measure_costs(classifier: Classifier) -> None:
    """Prints the cost of one sock_diag lookup and of one /proc scan (run with -s)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as client:
            hit = FiveTuple(
                PROTO_TCP, LOOP, client.getsockname()[1], LOOP, listener.getsockname()[1]
            )
            miss = FiveTuple(PROTO_UDP, LOOP, 1, LOOP, 2)
            rounds = 5000
            costs = {}
            for name, flow in [("hit", hit), ("miss", miss)]:
                started = time.perf_counter()
                for _ in range(rounds):
                    classifier.owner(flow)
                costs[name] = (time.perf_counter() - started) / rounds
            # The socket's process is found in the first scan; later lookups
            # are cache hits verified by one readlink.
            owner = classifier.owner(hit)
            assert owner is not None
            started = time.perf_counter()
            assert classifier.app_for_owner(owner) is not None
            first = time.perf_counter() - started
            started = time.perf_counter()
            for _ in range(rounds):
                classifier.app_for_owner(owner)
            cached = (time.perf_counter() - started) / rounds

    # Full scans: an inode nobody holds, with no rate limit.
    index = ProcessIndex(min_rescan_interval=0.0)
    for _ in range(20):
        index.pid_of_inode(1, os.geteuid())
    stats = index.statistics()
    processes = stats.processes_scanned // stats.scans
    print()
    print(f"sock_diag lookup, socket found: {costs['hit'] * 1e6:7.1f} us")
    print(f"sock_diag lookup, no socket:    {costs['miss'] * 1e6:7.1f} us")
    print(f"first app_for_owner (a scan):   {first * 1e3:7.2f} ms")
    print(f"cached app_for_owner:           {cached * 1e6:7.1f} us")
    print(
        f"full /proc scan (uid {os.geteuid()}):     "
        f"{stats.scan_seconds_total / stats.scans * 1e3:7.2f} ms over {processes} processes"
    )
