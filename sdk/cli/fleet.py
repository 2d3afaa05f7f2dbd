"""``edgeopt fleet``: the signed model repository and its MQTT server."""

from __future__ import annotations

import json
from pathlib import Path

import click

REPO_OPTION = click.option("--repo", type=click.Path(path_type=Path), required=True, envvar="EDGEOPT_REPO",
                           help="Repository directory (from 'edgeopt keys init'); or $EDGEOPT_REPO.")


@click.group("fleet")
def fleet_cmd() -> None:
    """Publish models into the signed repository and serve it to devices."""


@fleet_cmd.command("publish")
@click.argument("artifact", type=click.Path(path_type=Path))
@REPO_OPTION
@click.option("--name", help="Model name (default: the manifest's).")
@click.option("--version", "model_version", help="Model version (default: the manifest's).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def publish_cmd(artifact: Path, repo: Path, name: str | None, model_version: str | None, as_json: bool) -> None:
    """Verify ARTIFACT (an 'edgeopt convert' output directory), pack it and sign it into the repository."""
    from edgeopt.fleet.repository import Repository

    entry = Repository(repo).publish(artifact, name, model_version)
    click.echo(json.dumps(entry) if as_json else
               f"published {entry['name']}@{entry['version']} ({entry['length']} bytes, sha256 {entry['sha256'][:16]}…)")


@fleet_cmd.command("revoke")
@click.argument("model")
@REPO_OPTION
def revoke_cmd(model: str, repo: Path) -> None:
    """Remove MODEL (NAME@VERSION) from the signed targets: devices will refuse it from now on."""
    from edgeopt.errors import UserInputError
    from edgeopt.fleet.repository import Repository

    name, sep, version = model.partition("@")
    if not sep:
        raise UserInputError(f"expected NAME@VERSION, got {model!r}")
    Repository(repo).revoke(name, version)
    click.echo(f"revoked {name}@{version}")


@fleet_cmd.command("models")
@REPO_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models_cmd(repo: Path, as_json: bool) -> None:
    """The models in the signed targets."""
    from edgeopt.fleet.repository import Repository

    models = Repository(repo).list_models()
    if as_json:
        click.echo(json.dumps(models, indent=2))
        return
    for m in models:
        click.echo(f"{m['name']}@{m['version']}  {m['format']}  {m['length']} bytes  profile {m.get('profile') or '-'}")


@fleet_cmd.command("serve")
@REPO_OPTION
@click.option("--broker", required=True, help="Broker URL, e.g. mqtt://localhost:1883 or mqtts://host:8883?ca=ca.pem")
@click.option("--prefix", default="edgeopt", show_default=True, help="Topic prefix.")
@click.option("--chunk-size", type=int, default=64 * 1024, show_default=True,
              help="Largest artifact chunk per message (keep under the broker's payload limit).")
@click.option("--timestamp-refresh", type=float, default=3600.0, show_default=True,
              help="Seconds between re-signing the timestamp (must be well under its expiry).")
def serve_cmd(repo: Path, broker: str, prefix: str, chunk_size: int, timestamp_refresh: float) -> None:
    """Serve the repository's metadata and artifacts to devices over MQTT until interrupted."""
    import signal
    import threading

    from edgeopt.fleet.repo_server import RepoServer
    from edgeopt.fleet.repository import Repository
    from edgeopt.mqtt import PahoTopics, connect, make_client

    repository = Repository(repo)
    client = make_client(f"edgeopt-repo-{threading.get_native_id()}", broker)
    connect(client)
    server = RepoServer(repository, PahoTopics(client), prefix, chunk_size)
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    click.echo(f"serving {repository.root} on {broker} under {prefix}/repo/", err=True)
    try:
        while not stop.wait(timestamp_refresh):
            repository.refresh_timestamp()
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
        client.loop_stop()
        click.echo(json.dumps(server.snapshot_stats()), err=True)
