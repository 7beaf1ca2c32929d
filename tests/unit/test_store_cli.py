"""`--store`, `--shared-pool`, `--anchor-id` and `anchor-node store migrate` on the command line.

Bad values are one error line; a PostgreSQL store that was never migrated
stops `run` with one error line saying what to run, before anything of the
host is changed (only loopback ports are bound by then), and no password
of the URL is ever printed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from anchor_node.store.pg_schema import SCHEMA_VERSION
from tests.unit.test_cli_errors import anchor_paths, assert_one_line_error, run


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--store", "ftp://u:secret@h/x"], ["--store", "postgresql://"]),
        (["--shared-pool", "10.0.0.0/16"], ["--pool 100.64.0.0/10", "--shared-pool 10.0.0.0/16"]),
        (["--shared-pool", "10.0.0.0/33"], ["--shared-pool"]),
        (["--anchor-id", "two words"], ["--anchor-id"]),
    ],
    ids=["store-scheme", "pool-outside-shared", "shared-pool-bad", "anchor-id"],
)
def test_bad_store_options(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    outcome = run("anchor_node", "run", *args, *anchor_paths(tmp_path))
    line = assert_one_line_error(outcome, "anchor-node", *fragments)
    assert "secret" not in line


def test_run_refuses_an_unmigrated_store_and_migrate_fixes_it(
    postgres_url: str, tmp_path: Path
) -> None:
    url = postgres_url.replace("postgres@", "postgres:secret@")
    outcome = run(
        "anchor_node",
        "run",
        "--store",
        url,
        "--listen",
        "127.0.0.1",
        "--sip-port",
        "45160",
        "--tunnel-port",
        "45161",
        *anchor_paths(tmp_path),
    )
    assert outcome.code == 1 and "Traceback" not in outcome.stderr
    last = outcome.stderr.splitlines()[-1]  # after the start's log lines
    assert last.startswith("anchor-node: error: store postgresql://postgres@/")
    assert "schema version 0" in last and "run 'anchor-node store migrate" in last
    assert "secret" not in outcome.stderr
    first = run("anchor_node", "store", "migrate", "--store", url)
    assert first.code == 0 and f"schema version 0 -> {SCHEMA_VERSION}" in first.stdout
    again = run("anchor_node", "store", "migrate", "--store", url)
    assert again.code == 0 and "up to date" in again.stdout
    assert "secret" not in first.stdout + first.stderr + again.stdout + again.stderr


def test_migrate_a_sqlite_store(tmp_path: Path) -> None:
    path = tmp_path / "state" / "anchor.sqlite"
    outcome = run("anchor_node", "store", "migrate", "--store", f"sqlite://{path}")
    assert outcome.code == 0 and "0 -> 1" in outcome.stdout  # SQLite's own version
    assert path.stat().st_mode & 0o777 == 0o600
    outcome = run("anchor_node", "store", "migrate", "--state", str(path))
    assert outcome.code == 0 and "up to date" in outcome.stdout
