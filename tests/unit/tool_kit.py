"""Programs the unit tests run: found, or the test skips (and fails under CI, which has them)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

import pytest

__all__ = ["in_scratch_namespace", "need"]


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is missing in CI (./run installs it)")
        pytest.skip(f"{tool} is not installed")
    return path


def in_scratch_namespace(setup: list[str], argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run `argv` in a network namespace of its own after `setup` (ip commands) there.

    The namespace lives as long as the process: nothing to remove, nothing
    of the caller's network touched. Without root, in a user namespace.
    """
    need("unshare")
    need("ip")
    prefix = ["unshare", "--net"]
    if os.geteuid() != 0:
        prefix = ["unshare", "--user", "--map-root-user", "--net"]
    script = " && ".join([*setup, f"exec {shlex.join(argv)}"])
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        reason = f"no network namespace here ({probe.stderr.strip()})"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True, timeout=30)
