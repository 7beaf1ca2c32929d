"""Each network parser under atheris for a bounded number of runs: no exception but ours."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.harness import TARGETS

ROOT = Path(__file__).resolve().parents[2]
RUNS = 3000


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_target_raises_only_malformed_error(target: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.harness",
            target,
            f"-runs={RUNS}",
            "-seed=1",
            f"-artifact_prefix={tmp_path}/",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Done {RUNS} runs" in proc.stderr
