"""Where the store lives (`--store`), and opening or migrating it.

`--store` is a PostgreSQL URL (`postgresql://user@host/db`, also
`postgres://`), `sqlite:///path`, or a plain path; without it the store is
the SQLite file `--state`, as it has always been. A password may sit in the
URL, though a `.pgpass` file (or `PGPASSFILE`), which libpq reads by
itself, keeps it out of command lines and config files: `display` is the
URL without it, and the only form that reaches a log line or an error.

psycopg is imported only for a PostgreSQL store.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from anchor_node.store.api import DEFAULT_PREFIX_CAP, Store
from ground.errors import ConfigError

__all__ = [
    "DEFAULT_STATE",
    "StoreLocation",
    "migrate_store",
    "open_store",
    "parse_store",
    "redact_url",
]

DEFAULT_STATE = Path("/var/lib/upmt/anchor-node.sqlite")
_PG_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True, slots=True)
class StoreLocation:
    path: Path | None = None  # the SQLite file
    url: str | None = None  # the PostgreSQL URL, as given (password and all)

    @property
    def shared(self) -> bool:
        """Whether other anchors may use the same store."""
        return self.url is not None

    @property
    def display(self) -> str:
        return redact_url(self.url) if self.url is not None else str(self.path)


def parse_store(text: str | None, state: Path) -> StoreLocation:
    """The store `--store` names; None: the SQLite file `state`."""
    if text is None or text == "":
        return StoreLocation(path=state)
    scheme, sep, rest = text.partition("://")
    if sep and scheme.lower() in _PG_SCHEMES:
        return StoreLocation(url=text)
    if sep and scheme.lower() == "sqlite":
        # sqlite:///var/lib/x (absolute) or sqlite://relative/x
        if not rest:
            raise ConfigError(f"--store {text!r}: no file after sqlite://")
        return StoreLocation(path=Path(rest))
    if sep:
        raise ConfigError(
            f"--store {redact_url(text)!r}: use postgresql://..., sqlite:///PATH or a path"
        )
    return StoreLocation(path=Path(text))


def redact_url(url: str) -> str:
    """`url` without a password, in its user part or among its query parameters."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable store URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}@{hostinfo}" if user else hostinfo
    query = "&".join(p for p in parts.query.split("&") if p.partition("=")[0] != "password")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def open_store(
    location: StoreLocation,
    pool: ipaddress.IPv4Network,
    *,
    shared_pool: ipaddress.IPv4Network | None = None,
    prefix_cap: int = DEFAULT_PREFIX_CAP,
    anchor_id: str | None = None,
) -> Store:
    """The store, opened: SetupError if it cannot be reached, SchemaMismatch if it is
    not migrated (SQLite migrates itself)."""
    if location.url is not None:
        from anchor_node.store.postgres import PostgresStore

        return PostgresStore(
            location.url,
            pool,
            display=location.display,
            shared_pool=shared_pool,
            prefix_cap=prefix_cap,
            anchor_id=anchor_id,
        )
    from anchor_node.store.sqlite import SqliteStore

    assert location.path is not None
    location.path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteStore(
        location.path,
        pool,
        shared_pool=shared_pool,
        prefix_cap=prefix_cap,
        anchor_id=anchor_id,
    )


def migrate_store(location: StoreLocation) -> tuple[int, int]:
    """Create or upgrade the store's schema; (version before, version after)."""
    if location.url is not None:
        import psycopg

        from anchor_node.store import pg_schema
        from anchor_node.store.postgres import connection_parameters
        from ground.errors import SetupError

        params = connection_parameters(location.url, "migrate")
        try:
            with psycopg.connect(**params, autocommit=True) as conn:  # type: ignore[arg-type]
                return pg_schema.migrate(conn)
        except psycopg.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise SetupError(f"cannot migrate the store {location.display}: {first}") from None
    from anchor_node.store.sqlite import migrate_file

    assert location.path is not None
    location.path.parent.mkdir(parents=True, exist_ok=True)
    return migrate_file(location.path)
