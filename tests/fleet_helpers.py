"""Fixtures for the fleet tests: a throw-away PostgreSQL database (skipped with a reason when no server
answers), database URLs for both backends, and small artifacts/repositories."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# The server the PostgreSQL tests use (trust auth on this machine); override with EDGEOPT_TEST_PG.
PG_ADMIN_URL = os.environ.get("EDGEOPT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin():
    import psycopg

    return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)


def postgres_available() -> str | None:
    """None when the server answers, else why not (for the skip reason)."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'edgeopt[fleet]')"
    try:
        _admin().close()
    except psycopg.Error as exc:
        return f"no PostgreSQL server answers at {PG_ADMIN_URL} ({str(exc).strip().splitlines()[0]})"
    return None


def throwaway_postgres() -> Iterator[str]:
    """Create a new database, yield its URL, drop it afterwards."""
    reason = postgres_available()
    if reason:
        pytest.skip(reason)
    name = f"edgeopt_test_{uuid.uuid4().hex[:12]}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with _admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> Iterator[str]:
    """A fresh fleet database URL, once per backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
    else:
        yield from throwaway_postgres()


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"
