"""ProcessIndex against fake /proc trees, a naive reference, and the real /proc."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from subprocess import PIPE

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from upmt_client.procscan import AppInfo, ProcessIndex

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown of the fake /proc needs root")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_process(
    root: Path,
    pid: int,
    *,
    comm: str = "app",
    starttime: int = 5000,
    sockets: dict[int, int] | None = None,
    exe: str | None = "/usr/bin/app",
    cmdline: bytes = b"app\0--flag\0",
) -> Path:
    """A /proc/PID directory as the kernel shows it, as far as ProcessIndex reads."""
    base = root / str(pid)
    (base / "fd").mkdir(parents=True, exist_ok=True)
    set_starttime(root, pid, starttime, comm)
    (base / "comm").write_text(comm + "\n")
    (base / "cmdline").write_bytes(cmdline)
    if exe is not None:
        (base / "exe").symlink_to(exe)
    (base / "fd" / "0").symlink_to("/dev/null")
    (base / "fd" / "1").symlink_to("pipe:[777]")
    for fd, inode in (sockets or {}).items():
        set_fd(root, pid, fd, inode)
    return base


def set_starttime(root: Path, pid: int, starttime: int, comm: str = "app") -> None:
    # proc(5) fields 3..21, then starttime (22) and a few more.
    rest = "S 1 1 1 0 -1 4194560 10 0 0 0 1 2 0 0 20 0 1 0"
    (root / str(pid) / "stat").write_text(f"{pid} ({comm}) {rest} {starttime} 1000 20 0\n")


def set_fd(root: Path, pid: int, fd: int, inode: int) -> None:
    link = root / str(pid) / "fd" / str(fd)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(f"socket:[{inode}]")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    root.mkdir()
    # Entries a real /proc has that are not processes.
    (root / "net").mkdir()
    (root / "self").symlink_to("100")
    (root / "uptime").write_text("1.0 1.0\n")
    return root


UID = os.geteuid()


def test_finds_socket_and_caches_the_whole_scan(proc: Path, clock: FakeClock) -> None:
    make_process(proc, 100, sockets={3: 1001, 4: 1002})
    make_process(proc, 200, sockets={7: 2001})
    index = ProcessIndex(proc, clock=clock)
    assert index.pid_of_inode(1001, UID) == 100
    assert index.statistics().scans == 1
    # Every socket seen in that scan is now a dict hit (with one readlink).
    assert index.pid_of_inode(2001, UID) == 200
    assert index.pid_of_inode(1002, UID) == 100
    stats = index.statistics()
    assert stats.scans == 1
    assert stats.inode_hits == 2
    assert stats.processes_scanned == 2
    assert stats.scan_seconds_total > 0


def test_only_processes_of_the_uid_are_scanned(proc: Path, clock: FakeClock) -> None:
    make_process(proc, 100, sockets={3: 1001})
    index = ProcessIndex(proc, clock=clock)
    assert index.pid_of_inode(1001, UID + 1) is None
    assert index.statistics().processes_scanned == 0
    assert index.pid_of_inode(1001, UID) == 100


@needs_root
def test_uid_filter_with_mixed_owners(proc: Path, clock: FakeClock) -> None:
    make_process(proc, 100, sockets={3: 1001})
    other = make_process(proc, 200, sockets={3: 2001})
    os.chown(other, 4242, 4242)
    index = ProcessIndex(proc, clock=clock)
    assert index.pid_of_inode(2001, 0) is None
    clock.now += 1
    assert index.pid_of_inode(2001, 4242) == 200
    assert index.pid_of_inode(1001, 4242) is None  # seen by neither scan of 4242
    assert index.pid_of_inode(1001, 0) == 100  # cached by the first scan


def test_stale_entry_is_verified_and_rescanned(proc: Path, clock: FakeClock) -> None:
    make_process(proc, 100, sockets={3: 1001})
    make_process(proc, 200)
    index = ProcessIndex(proc, clock=clock)
    assert index.pid_of_inode(1001, UID) == 100
    # The socket moved: pid 100 reused fd 3 for another socket, pid 200 holds it.
    set_fd(proc, 100, 3, 9999)
    set_fd(proc, 200, 5, 1001)
    clock.now += 1
    assert index.pid_of_inode(1001, UID) == 200
    stats = index.statistics()
    assert stats.inode_stale == 1
    assert stats.scans == 2


def test_exited_process_is_not_reported(proc: Path, clock: FakeClock) -> None:
    make_process(proc, 100, sockets={3: 1001})
    index = ProcessIndex(proc, clock=clock)
    assert index.pid_of_inode(1001, UID) == 100
    shutil.rmtree(proc / "100")
    clock.now += 1
    assert index.pid_of_inode(1001, UID) is None


def test_rescan_rate_limit(proc: Path, clock: FakeClock) -> None:
    index = ProcessIndex(proc, min_rescan_interval=0.05, clock=clock)
    assert index.pid_of_inode(1001, UID) is None
    assert index.statistics().scans == 1
    make_process(proc, 100, sockets={3: 1001})
    clock.now += 0.01
    assert index.pid_of_inode(1001, UID) is None  # too soon: no scan
    assert index.pid_of_inode(1002, UID) is None
    stats = index.statistics()
    assert (stats.scans, stats.rescans_suppressed) == (1, 2)
    # Another uid has its own budget.
    assert index.pid_of_inode(1001, UID + 1) is None
    assert index.statistics().scans == 2
    clock.now += 0.05
    assert index.pid_of_inode(1001, UID) == 100
    assert index.statistics().scans == 3


def test_vanished_processes_are_skipped(
    proc: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_process(proc, 100, sockets={3: 1001})
    make_process(proc, 150, sockets={3: 1500})
    make_process(proc, 160, sockets={3: 1600})
    make_process(proc, 200, sockets={3: 2001})
    (proc / "300").mkdir()  # exited between the listing and its fd directory
    (proc / "301").mkdir()
    (proc / "301" / "fd").write_text("")  # not a directory
    real_readlink = os.readlink
    failures: dict[str, type[OSError]] = {
        str(proc / "150" / "fd" / "3"): ProcessLookupError,
        str(proc / "160" / "fd" / "3"): PermissionError,
        str(proc / "200" / "fd" / "0"): FileNotFoundError,
    }

    def flaky_readlink(path: str) -> str:
        failure = failures.get(path)
        if failure is not None:
            raise failure(2, "vanished")
        return real_readlink(path)

    monkeypatch.setattr(os, "readlink", flaky_readlink)
    index = ProcessIndex(proc, clock=clock)
    assert index.pid_of_inode(2001, UID) == 200
    assert index.pid_of_inode(1001, UID) == 100
    assert index.pid_of_inode(1500, UID) is None
    assert index.pid_of_inode(1600, UID) is None


def test_app_of_pid(proc: Path) -> None:
    make_process(
        proc, 100, comm="web (x) 1", cmdline=b"/usr/bin/app\0--port\0\xff80\0", exe="/usr/bin/app"
    )
    index = ProcessIndex(proc)
    app = index.app_of_pid(100)
    assert app == AppInfo(
        pid=100,
        name="web (x) 1",
        exe="/usr/bin/app",
        cmdline=("/usr/bin/app", "--port", "\ufffd80"),
        uid=UID,
    )
    assert app.exe_name == "app"
    assert app.to_json() == {
        "pid": 100,
        "name": "web (x) 1",
        "exe": "/usr/bin/app",
        "cmdline": ["/usr/bin/app", "--port", "\ufffd80"],
        "uid": UID,
    }
    assert index.start_time(100) == 5000


def test_app_without_readable_exe_or_cmdline(proc: Path) -> None:
    make_process(proc, 2, comm="kthreadd", exe=None, cmdline=b"")
    app = ProcessIndex(proc).app_of_pid(2)
    assert app is not None
    assert (app.name, app.exe, app.exe_name, app.cmdline) == ("kthreadd", "", "", ())


def test_app_of_missing_or_garbled_pid(proc: Path) -> None:
    index = ProcessIndex(proc)
    assert index.app_of_pid(4000) is None
    make_process(proc, 100)
    (proc / "100" / "stat").write_text("100 (app) S 1\n")
    assert index.app_of_pid(100) is None


def test_app_cache_and_pid_reuse(proc: Path) -> None:
    make_process(proc, 100, comm="first", starttime=5000)
    index = ProcessIndex(proc)
    first = index.app_of_pid(100)
    assert first is not None and first.name == "first"
    # Same start time: the same process; the cached answer is served.
    (proc / "100" / "comm").write_text("renamed\n")
    assert index.app_of_pid(100) is first
    assert index.statistics().app_hits == 1
    # A new process with the reused PID has another start time.
    set_starttime(proc, 100, 7000, "second")
    (proc / "100" / "comm").write_text("second\n")
    second = index.app_of_pid(100)
    assert second is not None and second.name == "second"
    assert index.statistics().app_reads == 2


def test_app_cache_is_bounded(proc: Path) -> None:
    for pid in (100, 101, 102):
        make_process(proc, pid, comm=f"app{pid}")
    index = ProcessIndex(proc, max_apps=2)
    for pid in (100, 101, 102, 101):
        assert index.app_of_pid(pid) is not None
    assert index.statistics().app_reads == 3
    assert index.statistics().app_hits == 1
    assert index.app_of_pid(100) is not None  # evicted, read again
    assert index.statistics().app_reads == 4


def test_pid_reused_while_being_read(proc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_process(proc, 100, comm="old", starttime=5000)
    index = ProcessIndex(proc)
    real_read_app = ProcessIndex._read_app

    def read_then_reuse(self: ProcessIndex, pid: int) -> AppInfo | None:
        info = real_read_app(self, pid)
        set_starttime(proc, pid, 6000, "new")
        return info

    monkeypatch.setattr(ProcessIndex, "_read_app", read_then_reuse)
    assert index.app_of_pid(100) is None


# --- against a naive reference -------------------------------------------------

PIDS = [10, 11, 12, 13]
INODES = [500, 501, 502, 503, 504, 505]
FDS = [3, 4, 5]

# One step: (pid, fd, inode or None to close the fd) or a lookup of an inode.
steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("set"),
            st.sampled_from(PIDS),
            st.sampled_from(FDS),
            st.none() | st.sampled_from(INODES),
        ),
        st.tuples(st.just("exit"), st.sampled_from(PIDS), st.just(0), st.none()),
        st.tuples(st.just("lookup"), st.just(0), st.just(0), st.sampled_from(INODES)),
    ),
    max_size=40,
)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


@settings(max_examples=60, deadline=None)
@given(steps)
def test_matches_a_naive_scan(
    scratch: Path, script: list[tuple[str, int, int, int | None]]
) -> None:
    root = Path(tempfile.mkdtemp(dir=scratch))
    try:
        for pid in PIDS:
            make_process(root, pid)
        # Without the rate limit, every answer must be exact.
        index = ProcessIndex(root, min_rescan_interval=0.0)
        for action, pid, fd, inode in script:
            if action == "set":
                link = root / str(pid) / "fd" / str(fd)
                if not (root / str(pid)).exists():
                    continue
                if link.is_symlink():
                    link.unlink()
                if inode is not None:
                    link.symlink_to(f"socket:[{inode}]")
            elif action == "exit":
                shutil.rmtree(root / str(pid), ignore_errors=True)
            else:
                assert inode is not None
                holders = naive_holders(root, inode)
                found = index.pid_of_inode(inode, UID)
                if holders:
                    assert found in holders
                else:
                    assert found is None
    finally:
        shutil.rmtree(root)


def naive_holders(root: Path, inode: int) -> set[int]:
    holders = set()
    for process in root.iterdir():
        if process.name.isdigit():
            for fd in (process / "fd").iterdir():
                if os.readlink(fd) == f"socket:[{inode}]":
                    holders.add(int(process.name))
    return holders


# --- the real /proc ------------------------------------------------------------


def test_real_proc_finds_this_process() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        inode = os.fstat(sock.fileno()).st_ino
        index = ProcessIndex()
        assert index.pid_of_inode(inode, os.geteuid()) == os.getpid()
        app = index.app_of_pid(os.getpid())
    assert app is not None
    assert app.name == Path("/proc/self/comm").read_text().rstrip("\n")
    assert app.exe == os.readlink("/proc/self/exe")
    assert list(app.cmdline) == Path("/proc/self/cmdline").read_bytes().decode().split("\0")[:-1]
    assert app.uid == os.geteuid()


def test_real_start_time_is_field_22() -> None:
    # A process started just now has a start time (in clock ticks after boot)
    # within a few seconds of the system's uptime.
    index = ProcessIndex()
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=PIPE)
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        start = index.start_time(child.pid)
    finally:
        child.communicate(b"")
    assert start is not None
    ticks = os.sysconf("SC_CLK_TCK")
    assert abs(start / ticks - uptime) < 5
