"""The store tests' PostgreSQL server: the lab's (`lab.postgres`), on a unix socket only."""

from lab.postgres import PostgresServer, find_binaries

__all__ = ["PostgresServer", "find_binaries"]
