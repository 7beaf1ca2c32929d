"""Socket inode → process → application, read from /proc.

Linux keeps no index from a socket to the processes holding it: the only way
is to read every `/proc/PID/fd/N` link and look for `socket:[INODE]`, 10-35 ms
for a whole desktop. `ProcessIndex` makes that affordable:

- a scan only enters processes owned by the uid sock_diag reported for the
  socket (the owner of `/proc/PID`, i.e. the effective uid of a dumpable
  process), which also avoids a permission error per foreign process when
  not root;
- a scan remembers every socket it passes, so the next new flows of the same
  user are dict hits; a remembered (pid, fd) is checked with one readlink
  before it is trusted, since fds are closed and reused;
- a miss rescans at most once per `min_rescan_interval` per uid, so a burst of
  flows from sockets that vanished (or belong to another namespace) cannot
  turn into a burst of scans.

Applications are cached per (pid, start time): a PID reused by a new process
has a different start time, so it is never mistaken for the old one.
Processes come and go during a scan; the ones that vanish are skipped.
Not thread-safe: use one instance from one thread (a worker, never the data
path).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["AppInfo", "ProcessIndex", "ProcessIndexStatistics"]

# What a process vanishing (or turning unreadable) mid-read looks like.
_VANISHED: Final = (FileNotFoundError, PermissionError, ProcessLookupError, NotADirectoryError)
_SOCKET_PREFIX: Final = "socket:["
# /proc/PID/cmdline can be as long as ARG_MAX; the start of it names the app.
_MAX_CMDLINE: Final = 64 * 1024
# proc(5): starttime is field 22 of /proc/PID/stat; counting from the field
# after "(comm)", which is field 3, that is index 19.
_STARTTIME_INDEX: Final = 22 - 3
# Applications remembered; PIDs of exited processes are never looked up again,
# so the oldest entries go first once the bound is reached.
DEFAULT_MAX_APPS: Final = 4096


@dataclass(frozen=True, slots=True)
class AppInfo:
    """One process, as the policy sees an application."""

    pid: int
    name: str  # /proc/PID/comm (at most 15 characters, settable by the process)
    exe: str  # target of /proc/PID/exe; "" when unreadable (another user's, a kernel thread)
    cmdline: tuple[str, ...]
    uid: int

    @property
    def exe_name(self) -> str:
        """The executable's file name ("" when unknown)."""
        return os.path.basename(self.exe)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready form (control socket, status output)."""
        return {
            "pid": self.pid,
            "name": self.name,
            "exe": self.exe,
            "cmdline": list(self.cmdline),
            "uid": self.uid,
        }


@dataclass(frozen=True, slots=True)
class ProcessIndexStatistics:
    scans: int  # full /proc scans
    scan_seconds_total: float
    processes_scanned: int  # processes whose fds were read, over all scans
    inode_hits: int  # pid_of_inode answered from the cache
    inode_stale: int  # cached (pid, fd) no longer held the socket
    inode_misses: int  # not found, even after a scan
    rescans_suppressed: int  # misses that did not scan because of the rate limit
    app_hits: int  # app_of_pid answered from the cache
    app_reads: int  # app_of_pid read the process afresh


class ProcessIndex:
    """Finds the process holding a socket, and describes processes."""

    def __init__(
        self,
        proc_root: Path = Path("/proc"),
        *,
        min_rescan_interval: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        max_apps: int = DEFAULT_MAX_APPS,
    ) -> None:
        # Plain strings: path objects would cost more than the syscalls.
        self._root = os.fspath(proc_root)
        self._min_rescan_interval = min_rescan_interval
        self._clock = clock
        # uid → socket inode → (pid, fd), as of the last scan for that uid.
        self._sockets: dict[int, dict[int, tuple[int, int]]] = {}
        self._last_scan: dict[int, float] = {}
        # pid → (start time, app): one entry per PID, replaced when it is reused.
        self._apps: dict[int, tuple[int, AppInfo]] = {}
        self._max_apps = max_apps
        self._scans = 0
        self._scan_seconds = 0.0
        self._processes_scanned = 0
        self._inode_hits = 0
        self._inode_stale = 0
        self._inode_misses = 0
        self._suppressed = 0
        self._app_hits = 0
        self._app_reads = 0

    def pid_of_inode(self, inode: int, uid: int) -> int | None:
        """A process of `uid` holding the socket `inode`, or None.

        When several processes share the socket (a fork), the one found first
        wins: the lowest PID at the last scan, usually the parent. Raises
        `OSError` only if `proc_root` itself cannot be listed.
        """
        table = self._sockets.get(uid)
        if table is not None:
            hit = table.get(inode)
            if hit is not None:
                if self._holds(hit[0], hit[1], inode):
                    self._inode_hits += 1
                    return hit[0]
                self._inode_stale += 1
                del table[inode]
        now = self._clock()
        last = self._last_scan.get(uid)
        if last is not None and now - last < self._min_rescan_interval:
            self._suppressed += 1
            self._inode_misses += 1
            return None
        self._last_scan[uid] = now
        table = self._scan(uid)
        self._sockets[uid] = table
        hit = table.get(inode)
        if hit is None:
            self._inode_misses += 1
            return None
        return hit[0]

    def app_of_pid(self, pid: int) -> AppInfo | None:
        """The process `pid` as an application, or None if it is gone."""
        start = self.start_time(pid)
        if start is None:
            return None
        cached = self._apps.get(pid)
        if cached is not None and cached[0] == start:
            self._app_hits += 1
            return cached[1]
        info = self._read_app(pid)
        # The PID may have been reused while its files were read; only the
        # same start time before and after proves they describe one process.
        if info is None or self.start_time(pid) != start:
            return None
        self._app_reads += 1
        apps = self._apps
        # Re-inserting moves the PID to the young end; dicts keep order.
        apps.pop(pid, None)
        if len(apps) >= self._max_apps:
            del apps[next(iter(apps))]
        apps[pid] = (start, info)
        return info

    def statistics(self) -> ProcessIndexStatistics:
        return ProcessIndexStatistics(
            scans=self._scans,
            scan_seconds_total=self._scan_seconds,
            processes_scanned=self._processes_scanned,
            inode_hits=self._inode_hits,
            inode_stale=self._inode_stale,
            inode_misses=self._inode_misses,
            rescans_suppressed=self._suppressed,
            app_hits=self._app_hits,
            app_reads=self._app_reads,
        )

    # --- /proc ---------------------------------------------------------------

    def _scan(self, uid: int) -> dict[int, tuple[int, int]]:
        started = time.perf_counter()
        found: dict[int, tuple[int, int]] = {}
        scanned = 0
        with os.scandir(self._root) as processes:
            for proc in processes:
                name = proc.name
                if not (name.isascii() and name.isdigit()):
                    continue
                try:
                    if proc.stat(follow_symlinks=False).st_uid != uid:
                        continue
                    pid = int(name)
                    scanned += 1
                    with os.scandir(proc.path + "/fd") as fds:
                        for fd in fds:
                            try:
                                link = os.readlink(fd.path)
                            except _VANISHED:
                                continue  # the fd closed since the listing
                            if link.startswith(_SOCKET_PREFIX):
                                inode = _socket_inode(link)
                                if inode is not None and fd.name.isdigit():
                                    found.setdefault(inode, (pid, int(fd.name)))
                except _VANISHED:
                    continue  # the process exited (or changed owner) mid-scan
        self._scans += 1
        self._processes_scanned += scanned
        self._scan_seconds += time.perf_counter() - started
        return found

    def _holds(self, pid: int, fd: int, inode: int) -> bool:
        try:
            link = os.readlink(f"{self._root}/{pid}/fd/{fd}")
        except _VANISHED:
            return False
        return link == f"{_SOCKET_PREFIX}{inode}]"

    def start_time(self, pid: int) -> int | None:
        """Field 22 of /proc/PID/stat (clock ticks after boot), or None if gone."""
        try:
            with open(f"{self._root}/{pid}/stat", "rb") as file:
                data = file.read()
        except _VANISHED:
            return None
        # comm may hold spaces and parentheses; it ends at the last ")".
        fields = data[data.rfind(b")") + 1 :].split()
        try:
            return int(fields[_STARTTIME_INDEX])
        except (IndexError, ValueError):
            return None

    def _read_app(self, pid: int) -> AppInfo | None:
        base = f"{self._root}/{pid}"
        try:
            uid = os.stat(base).st_uid
            with open(base + "/comm", "rb") as file:
                name = file.read().rstrip(b"\n").decode("utf-8", "replace")
            with open(base + "/cmdline", "rb") as file:
                raw_cmdline = file.read(_MAX_CMDLINE)
        except _VANISHED:
            return None
        try:
            exe = os.readlink(os.fsencode(base + "/exe")).decode("utf-8", "replace")
        except _VANISHED:
            exe = ""
        args = raw_cmdline.split(b"\0")
        if args and not args[-1]:
            args.pop()  # the terminating NUL
        cmdline = tuple(arg.decode("utf-8", "replace") for arg in args)
        return AppInfo(pid=pid, name=name, exe=exe, cmdline=cmdline, uid=uid)


def _socket_inode(link: str) -> int | None:
    # "socket:[12345]"
    digits = link[len(_SOCKET_PREFIX) : -1]
    if link[-1:] != "]" or not (digits.isascii() and digits.isdigit()):
        return None
    return int(digits)
