"""``edgeopt fleet simulate | provision | broker-config``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from edgeopt.cli.fleet_options import PREFIX_OPTION, REPO_OPTION
from edgeopt.errors import UserInputError
from edgeopt.fleet.rollout_spec import parse_selector
from edgeopt.fleet.security import BrokerSecurity
from edgeopt.fleet.serve_options import parse_listen
from edgeopt.mqtt import redact_url
from edgeopt.protocol import ModelRef, ProtocolError


@click.command("simulate")
@click.option("--broker", required=True, envvar="EDGEOPT_BROKER", help="Broker URL (mqtt://host:port, mqtts://...).")
@click.option("--devices", "count", type=int, default=10, show_default=True, help="How many simulated devices.")
@click.option("--fail-rate", type=float, default=0.0, show_default=True,
              help="Share of devices whose update fails (drawn reproducibly per device and version).")
@click.option("--fail-mode", type=click.Choice(["self-test", "probation", "health", "silent"]), default="self-test",
              show_default=True, help="How a failing update fails (see docs/fleet.md).")
@click.option("--fail-versions", default="", metavar="V1,V2", help="Only updates to these versions fail.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the failure draw.")
@click.option("--labels", "label_terms", multiple=True, default=("fleet=sim",), show_default=True,
              metavar="LABEL=VALUE[,...]", help="Labels every simulated device reports.")
@click.option("--profile", default="raspberry-pi-4", show_default=True, help="Hardware profile they report.")
@click.option("--initial-model", metavar="NAME@VERSION", help="The model they start with (installed at the factory).")
@click.option("--root", type=click.Path(path_type=Path), help="Root metadata to pin (REPO/metadata/1.root.json).")
@click.option("--repo", type=click.Path(path_type=Path), envvar="EDGEOPT_REPO",
              help="Take the pinned root from this repository (instead of --root).")
@click.option("--verify", type=click.Choice(["shared", "full"]), default="shared", show_default=True,
              help="TUF metadata checked once per process (shared) or by every device (full).")
@click.option("--self-test", type=click.Choice(["simulated", "golden"]), default="simulated", show_default=True,
              help="'golden' runs the artifact's golden vectors with the real runtime on every device.")
@click.option("--id-prefix", default="sim-", show_default=True, help="Device ids are PREFIX00000, PREFIX00001, ...")
@click.option("--first-index", type=int, default=0, show_default=True, help="Number of the first device.")
@click.option("--workers", type=int, default=32, show_default=True, help="Threads for downloads and checks.")
@click.option("--chunk-size", type=int, default=64 * 1024, show_default=True,
              help="Bytes per repository request (at most the server's --chunk-size).")
@click.option("--step-delay", type=float, default=0.0, show_default=True, help="Seconds spent in each update state.")
@click.option("--probation", type=float, default=0.0, show_default=True, help="Seconds in PROBATION.")
@click.option("--telemetry-interval", type=float, default=0.0, show_default=True,
              help="Seconds between telemetry messages (0: none).")
@click.option("--duration", type=float, default=0.0, show_default=True, help="Stop after this many seconds (0: never).")
@PREFIX_OPTION
@click.option("--repo-url", default="", metavar="URL",
              help="Fetch the repository over HTTP(S) from URL (its metadata/ and targets/), as agents with "
                   "[update] repo_url do, instead of through the MQTT repository server.")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
def simulate_cmd(broker: str, count: int, fail_rate: float, fail_mode: str, fail_versions: str, seed: int,
                 label_terms: tuple[str, ...], profile: str, initial_model: str | None, root: Path | None,
                 repo: Path | None, verify: str, self_test: str, id_prefix: str, first_index: int, workers: int,
                 chunk_size: int, step_delay: float, probation: float, telemetry_interval: float, duration: float,
                 prefix: str, repo_url: str, as_json: bool) -> None:
    """Run N simulated devices, each with its own MQTT connection, until interrupted: they report
    state, follow 'desired', download and verify updates through the repository server, and fail
    as asked (for demos and scale tests)."""
    import signal
    import threading

    from edgeopt.fleet.simulator import FailurePlan, SimConfig, Simulator  # lazy: numpy, python-tuf

    if root is None and repo is not None:
        root = Path(repo) / "metadata" / "1.root.json"
    try:
        model = ModelRef.parse(initial_model) if initial_model else None
    except ProtocolError as exc:
        raise UserInputError(f"--initial-model: {exc}") from None
    versions = frozenset(v.strip() for v in fail_versions.split(",") if v.strip()) or None
    config = SimConfig(broker=broker, devices=count, prefix=prefix, id_prefix=id_prefix, first_index=first_index,
                       labels=parse_selector(label_terms), profile=profile, initial_model=model, root=root,
                       verify=verify, self_test=self_test, workers=workers, chunk_size=chunk_size,
                       step_delay=step_delay, probation=probation, telemetry_interval=telemetry_interval,
                       failures=FailurePlan(fail_rate, fail_mode, versions, seed=seed), repo_url=repo_url)
    sim = Simulator(config).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    click.echo(f"{count} simulated device(s) connected to {redact_url(broker)} ({id_prefix}{first_index:05d}…)",
               err=True)
    started = time.monotonic()
    try:
        while not stop.wait(5.0):
            s = sim.summary()
            click.echo(f"{s['connected']}/{s['devices']} connected; models {s['models']}; states {s['update_states']}",
                       err=True)
            if duration and time.monotonic() - started >= duration:
                break
    except KeyboardInterrupt:
        pass
    finally:
        summary = sim.summary()
        sim.stop()
    click.echo(json.dumps(summary) if as_json else f"stopped: models {summary['models']}", err=not as_json)


@click.command("broker-config")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--host", "hosts", multiple=True, help="Name or address devices use for the broker (repeatable; "
                                                     "localhost and 127.0.0.1 are always added).")
@click.option("--port", type=int, default=8883, show_default=True, help="TLS listener port.")
@click.option("--bind", default="0.0.0.0", show_default=True, help="Address the listener binds.")
@click.option("--broker-user", help="User Mosquitto runs as once started as root (default: mosquitto when run "
                                    "as root, else you); it gets read access to passwd, acl and server.key.")
@PREFIX_OPTION
def broker_config_cmd(directory: Path, hosts: tuple[str, ...], port: int, bind: str, broker_user: str | None,
                      prefix: str) -> None:
    """Generate a Mosquitto configuration in DIRECTORY: a CA and a server certificate (TLS only), a
    password file with the fleet service's account, and an ACL that keeps each device to its own
    topics. Add devices with 'edgeopt fleet provision'."""
    sec = BrokerSecurity.init(directory, list(hosts), port, bind, prefix, broker_user=broker_user)
    d = sec.dir.resolve()
    click.echo(f"broker configuration in {d}:\n"
               f"  run the broker:   mosquitto -c {d / 'mosquitto.conf'}   (as root it runs as its 'user')\n"
               f"  fleet service:    edgeopt fleet --config {d / 'fleet.toml'} serve --repo REPO\n"
               f"  add a device:     edgeopt fleet provision DEVICE_ID --broker-config {d} --repo REPO\n"
               f"  then reload:      {sec.reload_command()}\n"
               f"  keep {d / 'ca.key'} offline once the server certificate is made")
    for warning in sec.warnings:
        click.echo(f"warning: {warning}", err=True)


@click.command("broker-bridge")
@click.argument("site", type=click.Path(path_type=Path))
@click.argument("central", type=click.Path(path_type=Path))
@click.option("--address", required=True, metavar="HOST:PORT",
              help="Where the SITE broker reaches the CENTRAL one (a name in CENTRAL's certificate).")
@PREFIX_OPTION
def broker_bridge_cmd(site: Path, central: Path, address: str, prefix: str) -> None:
    """Bridge two brokers made by 'edgeopt fleet broker-config': devices on SITE reach a fleet service
    on CENTRAL (and the other way), every topic under the prefix both ways over TLS. Adds a bridge
    account to CENTRAL's password file and ACL, copies CENTRAL's CA to SITE and writes
    SITE/conf.d/bridge.conf, which SITE's mosquitto.conf includes. Restart both brokers after."""
    host, port = parse_listen(address, "--address", "central.example.com:8883")
    name = BrokerSecurity(site).bridge_to(BrokerSecurity(central), f"{host}:{port}", prefix)
    click.echo(f"bridged {site} to {central} as {name} ({host}:{port}): restart both brokers\n"
               f"  (the central broker re-reads passwords and ACL on SIGHUP: {BrokerSecurity(central).reload_command()};"
               f" the site broker reads a new bridge at start)")


@click.command("provision")
@click.argument("device_id")
@click.option("--broker-config", "security_dir", type=click.Path(path_type=Path), required=True,
              help="Directory from 'edgeopt fleet broker-config'.")
@REPO_OPTION
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("provisioned"), show_default=True,
              help="Where OUT/DEVICE_ID/ is written.")
@click.option("--host", help="Broker host name the device connects to (default: the first --host of broker-config).")
@click.option("--port", type=int, help="Broker port (default: the listener's).")
@click.option("--install-dir", default="/etc/edgeopt", show_default=True,
              help="Where the bundle will live on the device (paths in agent.toml).")
@click.option("--state-dir", default="/var/lib/edgeopt-agent", show_default=True,
              help="The agent's state directory on the device.")
@click.option("--sensor-socket", default="/run/edgeopt-agent/sensor.sock", show_default=True,
              help="Unix socket of the default sensor source in agent.toml.")
@click.option("--source", type=click.Choice(["unix-stream", "synthetic"]), default="unix-stream", show_default=True,
              help="The sensor source in agent.toml: a Unix socket for your sensor's lines, or 'synthetic' (a "
                   "generated accelerometer stream, to try the fleet before a sensor is wired).")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="Label the device reports (repeatable; rollout selectors match them).")
@click.option("--profile", default="", help="Hardware profile the device reports.")
@click.option("--force", is_flag=True, help="Provision an existing device again, with a new password.")
@PREFIX_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def provision_cmd(device_id: str, security_dir: Path, repo: Path, out: Path, host: str | None, port: int | None,
                  install_dir: str, state_dir: str, sensor_socket: str, source: str, labels: tuple[str, ...],
                  profile: str, force: bool, prefix: str, as_json: bool) -> None:
    """Give DEVICE_ID its broker password (added to the broker's password file), the broker CA, the
    repository's pinned root metadata and a complete agent config, in OUT/DEVICE_ID/. Reload the
    broker afterwards (the command is printed)."""
    from edgeopt.fleet.provision import provision  # lazy: numpy (the repository)

    info = provision(device_id, security_dir, repo, out, host, port, prefix, install_dir, force, state_dir,
                     sensor_socket, labels, profile, source)
    if as_json:
        click.echo(json.dumps(info))
    else:
        click.echo(f"provisioned {device_id} in {info['directory']} (broker {info['broker']}, root "
                   f"v{info['root_version']}); copy it to {info['install_dir']} on the device\n"
                   f"reload the broker: {info['reload_command']}")
