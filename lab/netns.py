"""Running commands inside the lab's network namespaces.

Everything the lab does to the kernel goes through `ip -n NS` or
`ip netns exec NS`, so nothing is ever created in the caller's namespace.
"""

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from ground.errors import SetupError


def run(
    cmd: Sequence[str], *, check: bool = True, timeout: float = 60.0, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command, raising SetupError with its error line on failure.

    The first line of what it printed, or, for a Python traceback, the last
    one (the exception itself).
    """
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, input=input, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SetupError(f"{' '.join(cmd)}: {exc}") from None
    if check and proc.returncode != 0:
        err = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()
        line = err[-1] if err and err[0].startswith("Traceback") else err[0] if err else ""
        raise SetupError(f"{' '.join(cmd)}: {line or proc.returncode}")
    return proc


def ns_run(
    ns: str,
    cmd: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60.0,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `cmd` inside namespace `ns`."""
    return run(["ip", "netns", "exec", ns, *cmd], check=check, timeout=timeout, input=input)


def ns_popen(
    ns: str, cmd: Sequence[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `cmd` in the background inside `ns`, output to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


def ns_exists(ns: str) -> bool:
    return Path("/run/netns", ns).exists()


def ns_pids(ns: str) -> list[int]:
    proc = run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def kill_namespace_processes(ns: str, grace: float = 3.0) -> None:
    """SIGTERM every process of the namespace, SIGKILL what is left after `grace`."""
    pids = ns_pids(ns)
    for pid in pids:
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = [p for p in pids if _alive(p)]
    for pid in pids:
        _kill(pid, signal.SIGKILL)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> int | None:
    """SIGTERM a process started by `ns_popen`, SIGKILL it after `grace`; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)
    return proc.returncode


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it no longer holds the namespace.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
