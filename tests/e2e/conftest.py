"""Fixtures for end-to-end tests: a fresh namespace lab per test, always torn down.

Where root, namespaces or the tools are missing the tests skip with the
reason — except under CI (CI=true), where that is a failure: CI must run them.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.topology import Lab, have_lab_privileges


@pytest.fixture
def lab(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Lab]:
    reason = have_lab_privileges()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"end-to-end test cannot run in CI: the lab {reason}")
        pytest.skip(f"end-to-end test: the lab {reason}")
    marker = request.node.get_closest_marker("lab")
    options = dict(marker.kwargs) if marker else {}
    lab = Lab(tmp_path / "lab", **options)
    lab.up()
    try:
        yield lab
    finally:
        lab.down()
