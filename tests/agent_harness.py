"""Running the real ``edgeopt-agent`` in a subprocess from a config dict, and reading its status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

AGENT = str(Path(sys.executable).parent / "edgeopt-agent")


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def to_toml(config: dict[str, Any]) -> str:
    """Tables and arrays of tables of scalars (all an agent config needs)."""
    out = []
    for name, value in config.items():
        if isinstance(value, list):
            for table in value:
                out.append(f"[[{name}]]")
                out += [f"{k} = {toml_value(v)}" for k, v in table.items()]
                out.append("")
        else:
            out.append(f"[{name}]")
            out += [f"{k} = {toml_value(v)}" for k, v in value.items()]
            out.append("")
    return "\n".join(out)


def base_config(tmp: Path, **sections: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"agent": {"device_id": "dev1", "state_dir": str(tmp / "state")},
                              "telemetry": {"interval_s": 0.2}}
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(name), dict):
            config[name] = {**config[name], **value}
        else:
            config[name] = value
    return config


class AgentProcess:
    def __init__(self, tmp: Path, config: dict[str, Any], env: dict[str, str] | None = None, stdin=None,
                 name: str = "agent.toml", command: list[str] | None = None, user: int | None = None):
        """``command`` replaces the edgeopt-agent executable (e.g. another interpreter running it);
        ``user`` runs it as that uid (and its group)."""
        self.tmp = tmp
        self.config_path = tmp / name
        self.config_path.write_text(to_toml(config))
        self.state_dir = Path(config["agent"]["state_dir"])
        self.status_path = Path(config.get("telemetry", {}).get("status_file") or self.state_dir / "status.json")
        as_user = {} if user is None else {"user": user, "group": user, "extra_groups": []}
        self.proc = subprocess.Popen([*(command or [AGENT]), "--config", str(self.config_path)],
                                     stdin=stdin or subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env={**os.environ, **(env or {})}, **as_user)
        self.out = self.err = ""

    def status(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.status_path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def wait_status(self, predicate, timeout: float = 20.0, what: str = "status") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.status()
            if last is not None and predicate(last):
                return last
            if self.proc.poll() is not None:
                self.communicate()
                raise AssertionError(f"agent exited {self.proc.returncode} while waiting for {what}: {self.err}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; last status: {json.dumps(last)[:2000]}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def communicate(self, timeout: float = 30.0) -> int:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"agent still running after {timeout} s; stderr: {err.decode()[-2000:]}") from None
        self.out += out.decode()
        self.err += err.decode()
        return self.proc.returncode

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.communicate()


def results_from_jsonl(path: Path) -> list[dict[str, Any]]:
    files = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:])) + [path]
    rows = []
    for f in files:
        if f.exists():
            rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows
