"""Tables and JSON for the fleet commands (devices, rollout status)."""

from __future__ import annotations

import time
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table


def ago(t: float | None, now: float | None = None) -> str:
    if t is None:
        return "-"
    dt = max(0.0, (now or time.time()) - t)
    if dt < 120:
        return f"{dt:.0f} s ago"
    if dt < 7200:
        return f"{dt / 60:.0f} min ago"
    return f"{dt / 3600:.1f} h ago"


def duration(start: float | None, end: float | None) -> str:
    if start is None:
        return "-"
    dt = (end or time.time()) - start
    return f"{dt:.1f} s" if dt < 120 else f"{dt / 60:.1f} min"


def print_devices(devices: list) -> None:
    table = Table(title=f"{len(devices)} device(s)", title_justify="left")
    for col in ("device", "online", "model", "update", "labels", "profile", "agent", "last seen"):
        table.add_column(col, no_wrap=col in ("device", "model"))
    now = time.time()
    for d in devices:
        u = d.update
        update = "-" if u is None else u.state + (f" → {u.target}" if u.target and u.state != "IDLE" else "")
        if u is not None and u.reason and u.state in ("ROLLING_BACK", "ROLLED_BACK"):
            update += f" ({u.reason[:40]})"
        table.add_row(escape(d.device_id), "[green]yes[/green]" if d.online else "[red]no[/red]",
                      str(d.model) if d.model else "-", escape(update),
                      escape(",".join(f"{k}={v}" for k, v in sorted(d.labels.items()))), d.profile or "-",
                      d.agent_version or "-", ago(d.last_seen, now))
    Console(highlight=False, soft_wrap=True).print(table)


STATE_STYLE = {"RUNNING": "cyan", "COMPLETED": "green", "ABORTED": "red", "PAUSED": "yellow", "CREATED": "white"}


def rollout_renderable(info: dict[str, Any], service: list[dict[str, Any]] | None = None):
    spec = info["spec"]
    style = STATE_STYLE.get(info["state"], "white")
    head = (f"[bold]rollout {escape(info['rollout_id'])}[/bold]: {escape(info['target'])} to {info['devices']} "
            f"device(s) matching {escape(info['selector'])} — [{style}]{info['state']}[/{style}]")
    rules = (f"bake {spec['bake_s']:g} s, success ≥ {spec['success_threshold']:.0%}, abort past "
             + " or ".join(x for x in (f"{spec['failure_pct']:.0%}" if spec["failure_pct"] is not None else "",
                                       f"{spec['failure_count']} devices" if spec["failure_count"] is not None else "")
                           if x)
             + f" failed, device timeout {spec['device_timeout_s']:g} s")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("wave", "state", "size", "told", "ok", "failed", "pending", "progress", "time"):
        table.add_column(col, justify="right" if col not in ("state", "progress") else "left", no_wrap=True)
    for w in info["waves"]:
        width = 10
        done = round(width * w["success"] / w["size"]) if w["size"] else width
        bad = min(width - done, round(width * w["failure"] / w["size"])) if w["size"] else 0
        bar = f"[green]{'█' * done}[/green][red]{'█' * bad}[/red]{'·' * (width - done - bad)}"
        ws = STATE_STYLE.get(w["state"], "white")
        table.add_row(str(w["wave"]), f"[{ws}]{w['state']}[/{ws}]", str(w["size"]), str(w["told"]),
                      str(w["success"]), str(w["failure"]), str(w["pending"]), bar,
                      duration(w["started_at"], w["ended_at"]))
    parts: list = [head, escape(rules), table]
    t = info.get("transfer")
    if t and t["devices_reporting"]:
        parts.append(f"downloaded: {t['bytes']:,} bytes by {t['devices_reporting']} device(s), "
                     f"{t['share']:.1%} of the {t['full_bytes']:,} full artifacts would take "
                     f"({t['deltas']} by delta)")
    if info["reason"]:
        parts.append(f"[bold]why:[/bold] {escape(info['reason'])}")
    by_reason: dict[str, list[str]] = {}
    for f in info["failures"]:
        by_reason.setdefault(f["reason"] or "?", []).append(f["device_id"])
    for reason, devices in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))[:0 if info["reason"] else 5]:
        shown = ", ".join(devices[:4]) + (", …" if len(devices) > 4 else "")
        parts.append(escape(f"failed: {len(devices)} × {reason} ({shown})"))
    for s in service or []:
        stale = time.time() - s["updated_at"] > 15 or s.get("stopped_at")
        parts.append(f"service: {'[red]not running[/red] (last heartbeat ' if stale else 'running, heartbeat '}"
                     f"{ago(s['updated_at'])}{')' if stale else ''}, broker {escape(s.get('broker', '-'))}")
    return Group(*parts)


def print_rollouts(rows: list[dict[str, Any]]) -> None:
    table = Table(title=f"{len(rows)} rollout(s)", title_justify="left")
    for col in ("rollout", "target", "state", "wave", "devices", "updated", "failed", "created"):
        table.add_column(col)
    for r in rows:
        style = STATE_STYLE.get(r["state"], "white")
        table.add_row(escape(r["rollout_id"]), escape(r["target"]), f"[{style}]{r['state']}[/{style}]",
                      f"{r['current_wave']}/{len(r['waves'])}", str(r["devices"]),
                      str(sum(w["success"] for w in r["waves"])), str(sum(w["failure"] for w in r["waves"])),
                      ago(r["created_at"]))
    Console(highlight=False, soft_wrap=True).print(table)
