"""The fleet database: SQLite by default, PostgreSQL for ``postgresql://`` URLs — one schema, one
list of migrations, the same SQL for both (placeholders are written ``?`` and translated).

    sqlite:///var/lib/edgeopt/fleet.db   (or a plain path)      the standard library's sqlite3, WAL mode
    postgresql://user@host:5432/fleet                           psycopg 3 (the ``fleet`` extra)

The service and the CLI open their own connections; every change happens in a transaction, and
the rollout rows carry a revision number so concurrent writers (the controller's tick, an operator's
``rollout abort``) never overwrite each other's decisions (see ``fleet.store``).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

from edgeopt.errors import EnvironmentFault, MissingDependency, RemoteError, UserInputError

# Each migration: (version, what it does, statements). Never edit a released migration; append one.
# {serial_pk} and {real} are filled in per dialect.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "devices, rollouts, waves, assignments, events, desired outbox, service status", [
        """CREATE TABLE devices (
            device_id TEXT PRIMARY KEY,
            online INTEGER NOT NULL DEFAULT 0,
            agent_version TEXT, profile TEXT,
            labels TEXT NOT NULL DEFAULT '{}',
            model_name TEXT, model_version TEXT,
            update_state TEXT, update_target TEXT, update_rollout TEXT, update_reason TEXT, update_since {real},
            update_changed_at {real},
            health TEXT, telemetry TEXT,
            failed_target TEXT, failed_reason TEXT, failed_at {real},
            first_seen {real}, last_seen {real},
            updated_at {real} NOT NULL DEFAULT 0)""",
        "CREATE INDEX devices_by_update ON devices (updated_at)",
        """CREATE TABLE rollouts (
            rollout_id TEXT PRIMARY KEY,
            model_name TEXT NOT NULL, model_version TEXT NOT NULL,
            spec TEXT NOT NULL, state TEXT NOT NULL, current_wave INTEGER NOT NULL, reason TEXT,
            revision INTEGER NOT NULL, created_at {real} NOT NULL, updated_at {real} NOT NULL)""",
        """CREATE TABLE rollout_waves (
            rollout_id TEXT NOT NULL, wave INTEGER NOT NULL, size INTEGER NOT NULL, state TEXT NOT NULL,
            started_at {real}, success_since {real}, ended_at {real},
            PRIMARY KEY (rollout_id, wave))""",
        """CREATE TABLE rollout_devices (
            rollout_id TEXT NOT NULL, device_id TEXT NOT NULL, wave INTEGER NOT NULL,
            assigned_at {real}, previous_name TEXT, previous_version TEXT,
            outcome TEXT NOT NULL, reason TEXT, outcome_at {real},
            PRIMARY KEY (rollout_id, device_id))""",
        "CREATE INDEX rollout_devices_by_device ON rollout_devices (device_id)",
        """CREATE TABLE rollout_events (
            event_id {serial_pk}, rollout_id TEXT NOT NULL, at {real} NOT NULL, kind TEXT NOT NULL,
            detail TEXT NOT NULL)""",
        "CREATE INDEX rollout_events_by_rollout ON rollout_events (rollout_id, event_id)",
        """CREATE TABLE desired (
            device_id TEXT PRIMARY KEY, model_name TEXT, model_version TEXT, rollout_id TEXT,
            revision INTEGER NOT NULL, published_revision INTEGER NOT NULL, updated_at {real} NOT NULL)""",
        """CREATE TABLE service_status (
            name TEXT PRIMARY KEY, detail TEXT NOT NULL, updated_at {real} NOT NULL)""",
    ]),
    (2, "devices: the messages each device refused, by topic kind and reason (JSON)", [
        "ALTER TABLE devices ADD COLUMN rejected_messages TEXT",
    ]),
    (3, "a device's telemetry over time and its changes of state (the dashboard's device page)", [
        """CREATE TABLE device_samples (
            device_id TEXT NOT NULL, at {real} NOT NULL, sample TEXT NOT NULL)""",
        "CREATE INDEX device_samples_by_device ON device_samples (device_id, at)",
        "CREATE INDEX device_samples_by_time ON device_samples (at)",
        """CREATE TABLE device_history (
            device_id TEXT NOT NULL, at {real} NOT NULL, entry TEXT NOT NULL)""",
        "CREATE INDEX device_history_by_device ON device_history (device_id, at)",
        "CREATE INDEX device_history_by_time ON device_history (at)",
    ]),
    (4, "leases: which replica of fleet serve runs the controller (the epoch fences a stale leader's writes)", [
        """CREATE TABLE leases (
            name TEXT PRIMARY KEY, holder TEXT NOT NULL, epoch INTEGER NOT NULL, expires_at {real} NOT NULL)""",
    ]),
]

DIALECT_WORDS = {
    "sqlite": {"serial_pk": "INTEGER PRIMARY KEY AUTOINCREMENT", "real": "DOUBLE PRECISION"},
    "postgresql": {"serial_pk": "BIGSERIAL PRIMARY KEY", "real": "DOUBLE PRECISION"},
}


def redact(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    u = urlparse(url)
    if u.password:
        netloc = f"{u.username}:***@{u.hostname}" + (f":{u.port}" if u.port else "")
        return urlunparse(u._replace(netloc=netloc))
    return url


class Connection:
    """One database connection, safe to share between threads (calls are serialized)."""

    def __init__(self, raw, dialect: str):
        self.raw, self.dialect = raw, dialect
        self._lock = threading.RLock()
        self._depth = 0

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgresql" else sql

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            cur = self.raw.execute(self._sql(sql), tuple(params))
            if cur.description is None:
                return []
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""
        with self._lock:
            return self.raw.execute(self._sql(sql), tuple(params)).rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        with self._lock:
            if self.dialect == "postgresql":
                with self.raw.cursor() as cur:
                    cur.executemany(self._sql(sql), [tuple(r) for r in rows])
            else:
                self.raw.executemany(sql, [tuple(r) for r in rows])

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """All statements inside commit together or not at all (nesting joins the outer one)."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self
                finally:
                    self._depth -= 1
                return
            self._depth = 1
            try:
                if self.dialect == "postgresql":
                    with self.raw.transaction():
                        yield self
                else:
                    self.raw.execute("BEGIN IMMEDIATE")
                    try:
                        yield self
                    except BaseException:
                        self.raw.execute("ROLLBACK")
                        raise
                    self.raw.execute("COMMIT")
            finally:
                self._depth = 0

    def close(self) -> None:
        with self._lock, contextlib.suppress(Exception):
            self.raw.close()


class Database:
    def __init__(self, url: str | Path):
        self.url = str(url)
        u = urlparse(self.url)
        if u.scheme in ("postgresql", "postgres"):
            self.dialect = "postgresql"
            self.path = None
        elif u.scheme in ("sqlite", ""):
            self.dialect = "sqlite"
            raw = self.url[len("sqlite:"):] if u.scheme else self.url
            if raw.startswith("//"):
                raw = raw[2:]
            if not raw or raw == ":memory:":
                raise UserInputError(f"database URL {self.url!r}: give a file, e.g. sqlite:///var/lib/edgeopt/fleet.db")
            self.path = Path(raw)
        else:
            raise UserInputError(f"database URL {redact(self.url)!r}: expected sqlite:///PATH (the default) or "
                                 f"postgresql://USER@HOST:PORT/DBNAME")

    def __str__(self) -> str:
        return redact(self.url)

    def connect(self) -> Connection:
        if self.dialect == "sqlite":
            return self._connect_sqlite()
        return self._connect_postgresql()

    def _connect_sqlite(self) -> Connection:
        assert self.path is not None
        if not self.path.parent.is_dir():
            raise UserInputError(f"database {self.path}: directory {self.path.parent} does not exist")
        try:
            raw = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            raw.execute("PRAGMA journal_mode=WAL")
            raw.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives a process crash
            raw.execute("PRAGMA busy_timeout=30000")
        except sqlite3.Error as exc:
            raise EnvironmentFault(f"database {self.path}: cannot open ({exc})") from exc
        return Connection(raw, "sqlite")

    def _connect_postgresql(self) -> Connection:
        try:
            import psycopg
        except ImportError as exc:
            raise MissingDependency("psycopg", "fleet", "the PostgreSQL fleet database") from exc
        try:
            raw = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
        except psycopg.Error as exc:
            first = (str(exc).strip().splitlines() or ["no answer"])[0]
            raise RemoteError(f"database {redact(self.url)} cannot be reached: {first}") from exc
        return Connection(raw, "postgresql")

    def migrate(self, conn: Connection | None = None, migrations: list | None = None) -> int:
        """Bring the schema up to date (idempotent; concurrent callers are serialized); returns its version."""
        migrations = MIGRATIONS if migrations is None else migrations
        own = conn is None
        conn = conn or self.connect()
        words = DIALECT_WORDS[conn.dialect]
        try:
            with conn.transaction():
                if conn.dialect == "postgresql":
                    conn.query("SELECT pg_advisory_xact_lock(7281001)")
                conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                             "description TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)")
                applied = {r["version"] for r in conn.query("SELECT version FROM schema_migrations")}
                known = {v for v, _, _ in migrations}
                if applied - known:
                    raise EnvironmentFault(f"database {self}: schema version {max(applied)} is newer than this "
                                           f"edgeopt knows ({max(known)}); upgrade edgeopt")
                for version, description, statements in migrations:
                    if version in applied:
                        continue
                    for stmt in statements:
                        for word, sql in words.items():
                            stmt = stmt.replace("{" + word + "}", sql)
                        conn.execute(stmt)
                    conn.execute("INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                                 (version, description, time.time()))
            return max(v for v, _, _ in migrations)
        finally:
            if own:
                conn.close()


def open_database(url: str | Path) -> tuple[Database, Connection]:
    """Connect and migrate: what every command that touches the fleet database starts with."""
    db = Database(url)
    conn = db.connect()
    try:
        db.migrate(conn)
    except BaseException:
        conn.close()
        raise
    return db, conn
