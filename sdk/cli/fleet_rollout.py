"""``edgeopt fleet rollout``: create a staged rollout, start / pause / resume / abort it, watch it.

Commands write to the fleet database; the running ``edgeopt fleet serve`` acts on them at its next
tick (decisions are made and persisted there, see ``edgeopt.fleet.rollout``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from edgeopt.cli.fleet_options import DB_OPTION, OPTIONAL_REPO, REPO_OPTION, open_store
from edgeopt.cli.fleet_render import print_rollouts, rollout_renderable
from edgeopt.errors import CheckFailed, UserInputError
from edgeopt.fleet.operations import command_rollout, create_rollout
from edgeopt.fleet.rollout_spec import ROLLOUT_PARAMS
from edgeopt.fleet.views import rollout_json


@click.group("rollout")
def rollout_cmd() -> None:
    """Staged rollouts: waves, health gates, automatic abort and rollback."""


def _published(repo: Path) -> list[str]:
    from edgeopt.fleet.repository import Repository  # lazy: numpy (edgeopt.artifact), for one check

    return [f"{m['name']}@{m['version']}" for m in Repository(repo).list_models()]


def _rollout_options(fn):
    """The rollout's options as flags, from their declarations (edgeopt.fleet.rollout_spec.ROLLOUT_PARAMS);
    ``rollout_spec`` checks the values, naming the flag."""
    for p in reversed(ROLLOUT_PARAMS):
        fn = p.click_option(p.flag, callback=None, **({"metavar": "MS"} if p.name == "max_latency_p95" else {}))(fn)
    return fn


@rollout_cmd.command("create")
@click.option("--model", "model_text", required=True, metavar="NAME@VERSION", help="The version to roll out.")
@click.option("--selector", "selectors", multiple=True, metavar="LABEL=VALUE[,...]",
              help="Devices whose labels match (repeatable; all must match; default: every device).")
@_rollout_options
@click.option("--id", "rollout_id", help="Rollout id (default: NAME-VERSION-RANDOM).")
@click.option("--start", "start_now", is_flag=True, help="Start it right away.")
@REPO_OPTION
@DB_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def create_cmd(model_text: str, selectors: tuple[str, ...], rollout_id: str | None, start_now: bool, repo: Path,
               db: str | None, as_json: bool, **options) -> None:
    """Plan a rollout of NAME@VERSION over the devices the selector matches now."""
    created = create_rollout(lambda: open_store(db, repo), lambda: _published(repo), repo, model_text, selectors,
                             options, rollout_id, start_now)
    if as_json:
        click.echo(json.dumps({"rollout_id": created.rollout_id, "devices": created.devices, "waves": created.waves,
                               "started": created.started}))
    else:
        sizes = " → ".join(str(n) for n in created.waves)
        then = " (started)" if start_now else f"; start it with: edgeopt fleet rollout start {created.rollout_id}"
        click.echo(f"created rollout {created.rollout_id}: {created.model} to {created.devices} device(s) in "
                   f"{len(created.waves)} wave(s) of {sizes}{then}")


def _command(rollout_id: str, command: str, repo: Path | None, db: str | None, reason: str | None = None) -> None:
    decision = command_rollout(open_store(db, repo), rollout_id, command, reason)
    extra = f"; {len(decision.desired)} device(s) told to go back" if command == "abort" else ""
    click.echo(f"rollout {rollout_id}: {decision.rollout.state}{extra}")


def _simple(command: str, summary: str):
    @click.argument("rollout_id")
    @OPTIONAL_REPO
    @DB_OPTION
    def cmd(rollout_id: str, repo: Path | None, db: str | None) -> None:
        _command(rollout_id, command, repo, db)

    cmd.__doc__ = summary
    return rollout_cmd.command(command)(cmd)


start_cmd = _simple("start", "Start ROLLOUT_ID: its first wave begins at the service's next tick.")
pause_cmd = _simple("pause", "Hold ROLLOUT_ID in its current wave (the failure threshold still aborts it).")
resume_cmd = _simple("resume", "Let a paused ROLLOUT_ID continue.")


@rollout_cmd.command("abort")
@click.argument("rollout_id")
@click.option("--reason", help="Recorded with the abort.")
@OPTIONAL_REPO
@DB_OPTION
def abort_cmd(rollout_id: str, reason: str | None, repo: Path | None, db: str | None) -> None:
    """Abort ROLLOUT_ID: every device it told goes back to the version it ran before."""
    _command(rollout_id, "abort", repo, db, reason)


@rollout_cmd.command("status")
@click.argument("rollout_id", required=False)
@OPTIONAL_REPO
@DB_OPTION
@click.option("--watch", is_flag=True,
              help="Redraw every second until the rollout ends; exit 0 when it completed, 1 when it aborted.")
@click.option("--events", "with_events", is_flag=True, help="Include the decision log (with --json).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status_cmd(rollout_id: str | None, repo: Path | None, db: str | None, watch: bool, with_events: bool,
               as_json: bool) -> None:
    """One rollout's waves, progress, failures and why it ended; without ROLLOUT_ID, every rollout."""
    from rich.console import Console
    from rich.live import Live

    store = open_store(db, repo)
    if rollout_id is None:
        if watch:
            raise UserInputError("--watch needs a ROLLOUT_ID")
        rows = [rollout_json(*store.load_rollout(r)) for r in store.rollout_ids()]
        click.echo(json.dumps(rows, indent=2)) if as_json else print_rollouts(rows)
        return

    def snapshot() -> dict:
        status, assignments = store.load_rollout(rollout_id)
        told = store.load_devices(d for d, a in assignments.items() if a.assigned_at is not None)
        return rollout_json(status, assignments, store.events(rollout_id) if with_events else None, told)

    info = snapshot()
    if as_json and not watch:
        click.echo(json.dumps(info, indent=2))
        return
    console = Console(highlight=False)
    if not watch:
        console.print(rollout_renderable(info, store.service_status()))
        return
    with Live(rollout_renderable(info, store.service_status()), console=console, refresh_per_second=4) as live:
        while info["state"] not in ("COMPLETED", "ABORTED"):
            time.sleep(1.0)
            info = snapshot()
            live.update(rollout_renderable(info, store.service_status()))
    if not console.is_terminal:
        console.print()
    if as_json:
        click.echo(json.dumps(info, indent=2))
    if info["state"] == "ABORTED":
        raise CheckFailed(f"rollout {rollout_id} aborted in wave {info['current_wave']} (why: see above, or "
                          f"'edgeopt fleet rollout status {rollout_id} --json')")
