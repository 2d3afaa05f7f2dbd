"""The ``edgeopt agent`` group (run, status, install-service, install-model); ``edgeopt-agent`` itself
is ``edgeopt.cli.agent``, which loads no click.

Only click, the config and the CLI's error handling are imported up front; the agent itself (numpy,
the runtime for the model, and paho-mqtt when a broker is configured) when a command needs it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from edgeopt.agent.config import default_config_text, load_config, parse_config
from edgeopt.agent.transport import PASSWORD_CREDENTIAL
from edgeopt.cli.agent import DESCRIPTION, run_agent
from edgeopt.errors import UserInputError
from edgeopt.fsutil import atomic_write_bytes, environment_fault

UNIT_NAME = "edgeopt-agent.service"


@click.command("run", short_help="Run the agent (same as edgeopt-agent).", help=DESCRIPTION,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-c", "--config", "config_path", type=click.Path(path_type=Path), required=True,
              help="Agent configuration (TOML); keys and defaults: docs/agent.md.")
@click.option("--debug", is_flag=True, help="Show tracebacks (same as EDGEOPT_DEBUG=1).")
@click.version_option(package_name="edgeopt", message="edgeopt-agent %(version)s")
def run_cmd(config_path: Path, debug: bool) -> None:
    code = run_agent(config_path, debug)
    if code:
        raise SystemExit(code)


@click.command("install-service", short_help="Write the systemd unit and a default config.")
@click.option("--unit-dir", type=click.Path(path_type=Path), default=Path("/etc/systemd/system"),
              show_default=True, help="Where to write edgeopt-agent.service.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=Path("/etc/edgeopt/agent.toml"),
              show_default=True, help="Config file the unit runs with (written with defaults when missing).")
@click.option("--exec", "exec_path", type=click.Path(path_type=Path),
              help="The edgeopt-agent executable (default: the one next to this Python).")
@click.option("--device-id", default="", help="Device id for the default config (default: the host name).")
@click.option("--mqtt-host", default="", help="Broker for the default config (default: none; results to a file).")
@click.option("--force", is_flag=True, help="Overwrite an existing unit file and config.")
def install_service_cmd(unit_dir: Path, config_path: Path, exec_path: Path | None, device_id: str, mqtt_host: str,
                        force: bool) -> None:
    """Write the systemd unit (Type=notify, watchdog, DynamicUser, hardening) and a default config.

    Missing folders (--unit-dir, the config's) are created, mode 0755; the unit names the executable
    and the config by absolute path."""
    import shutil
    import tomllib

    exe = exec_path or Path(sys.executable).parent / "edgeopt-agent"
    if not exe.is_file() or not os.access(exe, os.X_OK):
        found = shutil.which("edgeopt-agent")
        if exec_path or not found:
            raise UserInputError(f"{exe}: not an executable edgeopt-agent (pass --exec PATH)")
        exe = Path(found)
    config_path = config_path.absolute()
    unit_path = unit_dir.absolute() / UNIT_NAME
    write_config = force or not config_path.exists()
    password_file = None if write_config else _password_file(config_path)  # the config the unit will run with
    if password_file is not None and not Path(password_file).is_absolute():
        raise UserInputError(f"{config_path}: [mqtt] password_file {password_file!r} is a relative path; the "
                             f"service starts in / and systemd loads credentials by absolute path: give one")
    unit = render_unit(exe.resolve(), config_path, password_file)
    if unit_path.exists() and not force:
        raise UserInputError(f"{unit_path} exists; pass --force to replace it")
    if write_config:
        config_text = default_config_text(device_id, mqtt_host)
        parse_config(tomllib.loads(config_text), str(config_path))  # e.g. a --device-id MQTT topics cannot carry
    for folder in (unit_path.parent, config_path.parent):
        _make_folders(folder)
    atomic_write_bytes(unit_path, unit.encode(), mode=0o644)
    click.echo(f"wrote {unit_path}")
    if write_config:
        # readable by the unit's throw-away user; it holds no secret (a password lives in [mqtt] password_file)
        atomic_write_bytes(config_path, config_text.encode(), mode=0o644)
        click.echo(f"wrote {config_path}")
    else:
        click.echo(f"kept the existing {config_path}")
    click.echo("next: systemctl daemon-reload && systemctl enable --now edgeopt-agent")


def _make_folders(folder: Path) -> None:
    """Create ``folder`` and any missing parents, each 0755 whatever the umask (systemd and the unit's
    throw-away user must be able to enter them)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    try:
        for new in reversed(missing):
            new.mkdir()
            new.chmod(0o755)
    except OSError as exc:
        raise environment_fault(exc, new) from exc


def render_unit(exe: Path, config_path: Path, password_file: str | None = None) -> str:
    """The shipped unit (hardware/systemd/edgeopt-agent.service) with ExecStart filled in, and the
    broker password file handed to the unit's throw-away user as a credential: DynamicUser cannot
    read the root-only file ('edgeopt fleet provision' writes it 0600); the agent reads the
    credential ($CREDENTIALS_DIRECTORY/mqtt.password, agent/transport.py) in its place."""
    from importlib import resources  # here: ~1 MiB of the running agent's memory otherwise

    template = resources.files("edgeopt.hardware").joinpath("systemd", UNIT_NAME).read_text()
    lines = []
    for line in template.splitlines():
        if line.startswith("ExecStart="):
            line = f"ExecStart={exe} --config {config_path}"
        lines.append(line)
        if line.startswith("Environment=") and password_file:
            lines.append(f"LoadCredential={PASSWORD_CREDENTIAL}:{password_file}")
    return "\n".join(lines) + "\n"


def _password_file(config_path: Path) -> str | None:
    """[mqtt] password_file of an existing config (None: no config yet, or no password)."""
    import tomllib

    try:
        mqtt = tomllib.loads(config_path.read_text()).get("mqtt", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    value = mqtt.get("password_file") if isinstance(mqtt, dict) else None
    return value if isinstance(value, str) and value else None


@click.command("install-model", short_help="Install an artifact into the inactive slot and activate it.")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--state-dir", type=click.Path(path_type=Path), help="The agent's state directory.")
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="Take the state directory from this agent config.")
@click.option("--allow-failed", is_flag=True, help="Install even though its report.json says a check failed.")
def install_model_cmd(artifact: Path, state_dir: Path | None, config_path: Path | None, allow_failed: bool) -> None:
    """Verify ARTIFACT (an `edgeopt convert` output), copy it into the inactive slot and make that slot
    active (one atomic rename); a running agent switches to it within [model] poll_interval_s.

    A model the agent cannot feed windows of sensor samples (an image model, one without
    preprocessing it could infer, several inputs) is refused, naming why.

    An artifact whose report.json says the conversion failed a check is refused unless --allow-failed.
    Run as root on a state directory another user owns (the agent's), the new files are given to
    that user."""
    from edgeopt.agent.statedir import StateDir  # lazy: numpy (edgeopt.artifact)

    if (state_dir is None) == (config_path is None):
        raise UserInputError("give exactly one of --state-dir or --config")
    if not artifact.exists():
        raise UserInputError(f"{artifact} does not exist (give the directory 'edgeopt convert -o DIR' wrote)")
    window = hop = 0  # the config's [preprocessing] overrides, which the agent applies too
    if config_path is not None:
        config = load_config(config_path)
        state_dir, window, hop = config.state_dir, config.preprocessing.window, config.preprocessing.hop
    from edgeopt.agent.model import check_feedable  # lazy: numpy and the runtimes

    check_feedable(artifact, window, hop)
    slot = StateDir(state_dir).install(artifact, allow_failed=allow_failed)
    click.echo(f"installed {artifact} into slot {slot} of {state_dir} (now active)")


@click.command("status", short_help="What a running agent is doing, and where its time goes.")
@click.option("-c", "--config", "config_path", type=click.Path(path_type=Path),
              help="The agent's configuration (its [telemetry] status_file, else {state_dir}/status.json).")
@click.option("--status-file", type=click.Path(path_type=Path), help="Read this status file instead.")
@click.option("--json", "as_json", is_flag=True, help="Print the status file's JSON as it is.")
def status_cmd(config_path: Path | None, status_file: Path | None, as_json: bool) -> None:
    """Read the status file the agent rewrites every [telemetry] interval_s and print its state, its
    counters and the per-stage profile: for each of its threads (each source, inference, the result
    writer), microseconds per window in each stage, waits included, so each thread's stages add up to
    its wall time (docs/agent.md, "Where the time goes")."""
    from edgeopt.cli.render import print_agent_status  # lazy: rich

    if (config_path is None) == (status_file is None):
        raise UserInputError("give exactly one of --config or --status-file")
    path = status_file or load_config(config_path).status_file
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserInputError(f"{path}: no status file (is the agent running with this configuration?)") from None
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read the status file: {exc.strerror}") from None
    try:
        status = json.loads(text)
        status["telemetry"]["status"]
    except (ValueError, KeyError, TypeError):
        raise UserInputError(f"{path}: not an edgeopt-agent status file") from None
    if as_json:
        click.echo(json.dumps(status, indent=2))
    else:
        print_agent_status(status)


@click.group("agent")
def agent_group() -> None:
    """The device agent: run it, see its status, install it as a systemd service, install a model into
    its state dir."""


agent_group.add_command(run_cmd)
agent_group.add_command(status_cmd)
agent_group.add_command(install_service_cmd)
agent_group.add_command(install_model_cmd)
