"""Programs the unit tests run: found, or the test skips (and fails under CI, which has them)."""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["need"]


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is missing in CI (./run installs it)")
        pytest.skip(f"{tool} is not installed")
    return path
