"""``edgeopt fleet``: the signed model repository, the fleet service, devices and rollouts.

Every command takes its settings from flags, environment variables, or a config file given to the
group (``edgeopt fleet --config fleet.toml ...``): top-level keys (``repo``, ``db``, ``broker``,
``prefix``) apply to every command that has that option, a ``[serve]`` / ``[simulate]`` /
``[rollout.create]`` table to that command only. Flags win over the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgeopt.cli.fleet_ops import broker_bridge_cmd, broker_config_cmd, provision_cmd, simulate_cmd
from edgeopt.cli.fleet_options import (
    DB_OPTION,
    OPTIONAL_REPO,
    PREFIX_OPTION,
    REPO_OPTION,
    database_url,
    open_store,
)
from edgeopt.cli.fleet_render import print_devices
from edgeopt.cli.fleet_rollout import rollout_cmd
from edgeopt.delta import CODEC_XOR as DELTA_CODEC_XOR
from edgeopt.errors import UserInputError
from edgeopt.fleet.dashboard.auth import is_local, read_token
from edgeopt.fleet.rollout_spec import parse_selector, selector_text
from edgeopt.fleet.serve_options import SERVE, parse_listen
from edgeopt.fleet.views import device_json


def _load_config(ctx: click.Context, path: Path) -> None:
    """Turn a TOML config file into click's default_map for the fleet subcommands."""
    import tomllib

    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise UserInputError(f"--config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserInputError(f"--config {path}: not valid TOML ({exc})") from None
    group: click.Group = ctx.command  # type: ignore[assignment]

    def defaults(cmd: click.Command, table: dict, shared: dict, where: str) -> dict:
        names = _option_names(cmd)
        out = {names[k]: v for k, v in shared.items() if k in names}
        for key, value in table.items():
            sub = cmd.commands.get(key) if isinstance(cmd, click.Group) else None
            if isinstance(value, dict) and sub is not None:
                out[key] = defaults(sub, value, shared, f"{where}.{key}")
            elif key.replace("-", "_") in names:
                out[names[key.replace("-", "_")]] = value
            else:
                raise UserInputError(f"--config {path}: unknown key '{key}' in [{where}]")
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                out.setdefault(name, defaults(sub, {}, shared, f"{where}.{name}"))
        return out

    shared = {k: v for k, v in data.items() if not isinstance(v, dict)}
    known_shared = {k for c in group.commands.values() for k in _option_names(c, deep=True)}
    for key in shared:
        if key not in known_shared:
            raise UserInputError(f"--config {path}: unknown key '{key}'")
    default_map = {}
    for name, cmd in group.commands.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise UserInputError(f"--config {path}: '{name}' must be a table")
        default_map[name] = defaults(cmd, table, shared, name)
    for key, value in data.items():
        if isinstance(value, dict) and key not in group.commands:
            raise UserInputError(f"--config {path}: unknown table [{key}]")
    ctx.default_map = default_map


def _option_names(cmd: click.Command, deep: bool = False) -> dict[str, str]:
    """Config key → click parameter name: a key is an option's long flag without dashes
    (``selector`` for ``--selector``, ``chunk_size`` or ``chunk-size`` for ``--chunk-size``)."""
    names: dict[str, str] = {}
    for p in cmd.params:
        if isinstance(p, click.Option):
            for opt in p.opts:
                if opt.startswith("--"):
                    names[opt[2:].replace("-", "_")] = p.name  # type: ignore[assignment]
    if deep and isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            names.update(_option_names(sub, deep=True))
    return names


@click.group("fleet")
@click.option("--config", "config_file", type=click.Path(path_type=Path), envvar="EDGEOPT_FLEET_CONFIG",
              help="TOML file with defaults for these commands (see 'edgeopt fleet --help'); or $EDGEOPT_FLEET_CONFIG.")
@click.pass_context
def fleet_cmd(ctx: click.Context, config_file: Path | None) -> None:
    """Publish models, run the fleet service, watch devices and roll models out in waves.

    \b
    edgeopt keys init REPO                              signing keys (once)
    edgeopt fleet publish ARTIFACT --repo REPO          sign a converted model into the repository
    edgeopt fleet serve --repo REPO [--http HOST:PORT]  repository server + registry + rollout controller (+ dashboard)
    edgeopt fleet devices [--selector k=v]              what the registry knows
    edgeopt fleet rollout create --model NAME@VERSION --waves 1%,10%,50%,100% ...; start | status | ...
    edgeopt fleet simulate --broker URL --devices N     simulated devices for demos and scale runs
    edgeopt fleet broker-config DIR / provision DEVICE_ID   Mosquitto TLS + passwords + ACL; device bundles

    With --config FILE, top-level keys (repo, db, broker, prefix) apply to every command that has
    that option and a [serve] / [simulate] / [rollout.create] table to one command; flags win.
    """
    if config_file is not None:
        _load_config(ctx, config_file)


@fleet_cmd.command("publish")
@click.argument("artifact", type=click.Path(path_type=Path))
@REPO_OPTION
@click.option("--name", help="Model name (default: the manifest's).")
@click.option("--version", "model_version", help="Model version (default: the manifest's).")
@click.option("--allow-failed", is_flag=True,
              help="Publish even though its report.json says a check failed (recorded in the signed target).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def publish_cmd(artifact: Path, repo: Path, name: str | None, model_version: str | None, allow_failed: bool,
                as_json: bool) -> None:
    """Verify ARTIFACT (an 'edgeopt convert' output directory), pack it and sign it into the repository.

    Refused when its manifest names another model or version than --name / --version, or when its
    report.json says the conversion failed a check (unless --allow-failed)."""
    from edgeopt.fleet.repository import Repository  # lazy: numpy, for the commands that open the repository

    entry = Repository(repo).publish(artifact, name, model_version, allow_failed=allow_failed)
    if as_json:
        click.echo(json.dumps(entry))
        return
    click.echo(f"published {entry['name']}@{entry['version']} ({entry['length']} bytes, sha256 {entry['sha256'][:16]}…)")
    for d in entry["deltas"]:
        kind = "tensor XOR" if d["codec"] == DELTA_CODEC_XOR else "binary"
        click.echo(f"  delta from {entry['name']}@{d['base_version']}: {d['length']} bytes "
                   f"({d['length'] / entry['length']:.1%} of the full artifact; {kind}: {d['codec']})")
    for d in entry["deltas_skipped"]:
        click.echo(f"  no delta from {entry['name']}@{d['base_version']} ({d['why']}): devices on it take the "
                   f"full artifact")


@fleet_cmd.command("revoke")
@click.argument("model")
@REPO_OPTION
def revoke_cmd(model: str, repo: Path) -> None:
    """Remove MODEL (NAME@VERSION) from the signed targets: devices will refuse it from now on."""
    from edgeopt.fleet.repository import Repository  # lazy: numpy, for the commands that open the repository

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
    from edgeopt.fleet.repository import Repository  # lazy: numpy, for the commands that open the repository

    models = Repository(repo).list_models()
    if as_json:
        click.echo(json.dumps(models, indent=2))
        return
    for m in models:
        click.echo(f"{m['name']}@{m['version']}  {m['format']}  {m['length']} bytes  profile {m.get('profile') or '-'}")


def _serve_option(name: str, **overrides):
    """A flag of ``fleet serve``, generated from its declaration (edgeopt.fleet.serve_options)."""
    p = SERVE[name]
    return p.click_option(p.flag, **overrides)


@fleet_cmd.command("serve")
@REPO_OPTION
@DB_OPTION
@_serve_option("broker", envvar="EDGEOPT_BROKER")
@_serve_option("listen")
@_serve_option("local_broker")
@PREFIX_OPTION
@_serve_option("chunk_size")
@_serve_option("tick")
@_serve_option("timestamp_refresh")
@_serve_option("http", metavar="HOST:PORT")
@_serve_option("http_token_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_serve_option("http_cert", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_serve_option("http_key", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_serve_option("http_repo", metavar="HOST:PORT")
@_serve_option("replicas")
@_serve_option("unicast")
@_serve_option("log_level")
def serve_cmd(repo: Path, db: str | None, broker: str | None, listen: str, local_broker: str, prefix: str,
              chunk_size: int, tick: float, timestamp_refresh: float, http: str | None, http_token_file: Path | None,
              http_cert: Path | None, http_key: Path | None, http_repo: str | None, replicas: bool,
              unicast: bool, log_level: str) -> None:
    """Run the fleet service until interrupted: the repository server (metadata and artifact chunks
    over MQTT), the device registry and the rollout controller, with --http the dashboard, and with
    --http-repo the repository's files over HTTP for devices that fetch them there.
    Restart-safe: everything it knows is in the database, and a rollout in progress continues after
    a restart."""
    import logging
    import signal

    from edgeopt.fleet.service import FleetService, ServiceConfig  # lazy: numpy, and the whole service

    check_http_options(http, http_token_file, http_cert, http_key, http_repo)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = FleetService(ServiceConfig(repo=repo, db=database_url(db, repo), broker=broker, listen=listen,
                                         local_broker=local_broker, prefix=prefix, chunk_size=chunk_size, tick=tick,
                                         timestamp_refresh=timestamp_refresh, http=http, http_token_file=http_token_file,
                                         http_cert=http_cert, http_key=http_key, http_repo=http_repo,
                                         replicas=replicas, unicast=unicast)).start()
    signal.signal(signal.SIGTERM, lambda *_: service._stop.set())
    dashboard = f", dashboard {service.dashboard.url}" if service.dashboard else ""
    dashboard += f", repository files {service.repo_web.url}" if service.repo_web else ""
    role = "leading" if service.leadership.leading else "standing by"
    click.echo(f"fleet service ready: broker {service.broker_text()}, database {service.db}, prefix {prefix}/"
               f"{dashboard}; controller {role} (replica {service.replica_id})", err=True)
    try:
        service.wait()
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()
        click.echo(json.dumps(service.status()), err=True)


def check_http_options(http: str | None, token_file: Path | None, cert: Path | None, key: Path | None,
                       http_repo: str | None = None) -> None:
    """Check the dashboard's and the repository files' flags together, before anything starts
    (--http-cert / --http-key serve either; the token is the dashboard's only)."""
    if http_repo is not None:
        parse_listen(http_repo, "--http-repo", "127.0.0.1:8081")
    if http is None:
        given = [f for f, v in (("--http-token-file", token_file), ("--http-cert", cert), ("--http-key", key))
                 if v and (http_repo is None or f == "--http-token-file")]
        if given:
            raise UserInputError(f"{given[0]} needs --http HOST:PORT (the dashboard is off without it)")
    if (cert is None) != (key is None):
        raise UserInputError("--http-cert and --http-key go together")
    if http is None:
        return
    token = read_token(token_file) if token_file is not None else None
    host, _ = parse_listen(http, "--http", "127.0.0.1:8080")
    if token is None and not is_local(host):
        raise UserInputError(f"--http {http}: other machines could reach the dashboard there; give "
                             f"--http-token-file (or listen on 127.0.0.1)")


@fleet_cmd.command("devices")
@OPTIONAL_REPO
@DB_OPTION
@click.option("--selector", "selectors", multiple=True, metavar="LABEL=VALUE[,...]",
              help="Only devices with these labels (repeatable; all must match).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def devices_cmd(repo: Path | None, db: str | None, selectors: tuple[str, ...], as_json: bool) -> None:
    """The devices the registry knows: labels, profile, model, update state, online, last seen."""
    selector = parse_selector(selectors)
    store = open_store(db, repo)
    devices = store.list_devices(selector)
    if as_json:
        click.echo(json.dumps([device_json(d) for d in devices], indent=2))
        return
    if not devices:
        known = store.count_devices()
        click.echo(f"no device matches {selector_text(selector)} ({known} device(s) known)", err=True)
        return
    print_devices(devices)


fleet_cmd.add_command(rollout_cmd)
fleet_cmd.add_command(simulate_cmd)
fleet_cmd.add_command(provision_cmd)
fleet_cmd.add_command(broker_config_cmd)
fleet_cmd.add_command(broker_bridge_cmd)
