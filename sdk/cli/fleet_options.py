"""The options and the fleet database that the ``edgeopt fleet`` command modules share (cli/fleet.py,
fleet_ops.py, fleet_rollout.py): a module of their own, so that cli/fleet.py imports the command
modules that use them at its top."""

from __future__ import annotations

from pathlib import Path

import click

from edgeopt.errors import UserInputError
from edgeopt.fleet.db import open_database
from edgeopt.fleet.store import FleetStore

REPO_OPTION = click.option("--repo", type=click.Path(path_type=Path), required=True, envvar="EDGEOPT_REPO",
                           help="Repository directory (from 'edgeopt keys init'); or $EDGEOPT_REPO.")
OPTIONAL_REPO = click.option("--repo", type=click.Path(path_type=Path), envvar="EDGEOPT_REPO",
                             help="Repository directory; or $EDGEOPT_REPO (the default database lives in it).")
DB_OPTION = click.option("--db", envvar="EDGEOPT_FLEET_DB", metavar="URL",
                         help="Fleet database: sqlite:///PATH or postgresql://USER@HOST/DB; or $EDGEOPT_FLEET_DB "
                              "(default: sqlite:///REPO/fleet.db).")
PREFIX_OPTION = click.option("--prefix", default="edgeopt", show_default=True, help="MQTT topic prefix.")


def database_url(db: str | None, repo: Path | None) -> str:
    if db:
        return db
    if repo is None:
        raise UserInputError("no fleet database: pass --db URL, or --repo REPO for the default sqlite:///REPO/fleet.db")
    if not Path(repo).is_dir():
        raise UserInputError(f"repository directory {repo} does not exist (run 'edgeopt keys init {repo}')")
    return f"sqlite:///{Path(repo).resolve() / 'fleet.db'}"


def open_store(db: str | None, repo: Path | None) -> FleetStore:
    _, conn = open_database(database_url(db, repo))
    return FleetStore(conn)
