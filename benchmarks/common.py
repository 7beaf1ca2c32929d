"""What the benchmarks share: iperf3 in the lab, CPU accounting, result files."""

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from lab.topology import CH_ADDR, IPERF_PORT, Lab

RESULTS = Path(__file__).resolve().parent / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def iperf3_tcp(lab: Lab, seconds: int, streams: int = 1, role: str = "mh") -> dict[str, float]:
    """Run iperf3 from `role` to the CH; received Mbit/s and retransmits."""
    proc = lab.exec(
        role,
        "iperf3",
        "-c",
        CH_ADDR,
        "-p",
        str(IPERF_PORT),
        "-t",
        str(seconds),
        "-P",
        str(streams),
        "-J",
        timeout=seconds + 60,
    )
    result = json.loads(proc.stdout)
    end = result["end"]
    return {
        "mbit_s": end["sum_received"]["bits_per_second"] / 1e6,
        "bytes": float(end["sum_received"]["bytes"]),
        "retransmits": float(end["sum_sent"].get("retransmits", 0)),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def code_version() -> str | None:
    """The commit the measured code is at ("+dirty" with uncommitted changes), if known."""
    root = str(Path(__file__).resolve().parents[1])

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True)
        if done.returncode:
            raise OSError(done.stderr.strip())
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except OSError:
        return None
    return commit + ("+dirty" if dirty else "")


def write_results(name: str, results: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    results = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "code": code_version(),
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        **results,
    }
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
