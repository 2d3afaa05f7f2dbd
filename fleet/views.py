"""The fleet's records as JSON: what ``edgeopt fleet devices --json``, ``rollout status --json`` and the
dashboard's ``/api/`` print. One shape for a device and one for a rollout, wherever they are shown."""

from __future__ import annotations

from typing import Any

from edgeopt.fleet.rollout import Outcome, progress
from edgeopt.fleet.rollout_spec import selector_text


def device_json(d) -> dict[str, Any]:
    u = d.update
    t = d.telemetry
    return {"device_id": d.device_id, "online": d.online, "labels": d.labels, "profile": d.profile,
            "agent_version": d.agent_version, "model": d.model.to_json() if d.model else None,
            "update": None if u is None else {"state": u.state, "target": u.target.to_json() if u.target else None,
                                              "rollout": u.rollout, "reason": u.reason, "since": u.since},
            "health": None if d.health is None else d.health.__dict__,
            "telemetry": None if t is None else {"latency_p50_ms": t.latency_p50_ms, "latency_p95_ms": t.latency_p95_ms,
                                                 "error_rate": t.error_rate, "windows_per_s": t.windows_per_s,
                                                 "inference_errors": t.inference_errors, "profile": t.profile},
            "last_failure": None if d.failed_target is None else {"target": str(d.failed_target),
                                                                   "reason": d.failed_reason, "at": d.failed_at},
            "rejected_messages": d.rejected_messages, "last_seen": d.last_seen}


def transfer(status, assignments, devices: dict) -> dict[str, Any]:
    """What the rollout's told devices downloaded for its target, as they report it (telemetry's last
    download): bytes over the network against the full artifact's bytes for each, and how many took a
    delta. Devices that have not reported a download of the target yet are not counted."""
    target = str(status.spec.target)
    reports = [rec.telemetry.last_download for d, a in assignments.items() if a.assigned_at is not None
               and (rec := devices.get(d)) is not None and rec.telemetry is not None
               and rec.telemetry.last_download is not None and rec.telemetry.last_download["target"] == target]
    sent, full = sum(r["bytes"] for r in reports), sum(r["full_bytes"] for r in reports)
    return {"devices_reporting": len(reports), "deltas": sum(r["delta"] for r in reports), "bytes": sent,
            "full_bytes": full, "share": round(sent / full, 4) if full else None}


def rollout_json(status, assignments, events: list | None = None, devices: dict | None = None) -> dict[str, Any]:
    """A rollout as JSON; with ``devices`` (the told devices' records) also its ``transfer``."""
    failures = sorted((a for a in assignments.values() if a.outcome is Outcome.FAILURE), key=lambda a: a.outcome_at or 0)
    return {"rollout_id": status.rollout_id, "target": str(status.spec.target), "state": str(status.state),
            "selector": selector_text(status.spec.selector), "current_wave": status.current_wave + 1,
            "reason": status.reason, "created_at": status.created_at, "updated_at": status.updated_at,
            "revision": status.revision, "devices": len(assignments), "spec": status.spec.to_json(),
            "waves": progress(status, assignments),
            "failures": [{"device_id": a.device_id, "wave": a.wave + 1, "reason": a.reason, "at": a.outcome_at}
                         for a in failures],
            **({"events": events} if events is not None else {}),
            **({"transfer": transfer(status, assignments, devices)} if devices is not None else {})}
