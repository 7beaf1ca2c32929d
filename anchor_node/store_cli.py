"""`anchor-node store migrate`: create or upgrade the store's schema.

A PostgreSQL store is migrated only by this command, never by `run` (which
refuses a schema that does not match, saying so): the anchors sharing it
may be of different releases, and the operator picks the moment. The
SQLite file is also brought up to date by `run` itself, as it always was.
"""

from __future__ import annotations

from pathlib import Path

import click

from anchor_node.store.location import DEFAULT_STATE, migrate_store, parse_store

__all__ = ["store"]


@click.group()
def store() -> None:
    """The store of leases, keys, registrations and tunnel records."""


@store.command()
@click.option(
    "--store",
    "target",
    default=None,
    metavar="URL|PATH",
    help="postgresql://USER@HOST/DB, sqlite:///PATH or a path [default: the --state file].",
)
@click.option(
    "--state",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_STATE,
    show_default=True,
    help="The SQLite file, without --store.",
)
def migrate(target: str | None, state: Path) -> None:
    """Create the store's schema, or bring it to this release's version (idempotent)."""
    location = parse_store(target, state)
    before, after = migrate_store(location)
    if before == after:
        click.echo(f"store {location.display}: schema version {after}, up to date")
    elif before > after:
        click.echo(
            f"store {location.display}: schema version {before}, newer than this "
            f"release's ({after}): left alone"
        )
    else:
        click.echo(f"store {location.display}: schema version {before} -> {after}")
