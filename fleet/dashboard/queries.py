"""What the dashboard's ``/api/`` reads from the fleet database: pages of devices (filtered, sorted),
one device with the rollouts it took part in, rollouts, a fleet summary, and a change stamp the live
updates poll. Plain functions of a ``FleetStore``; the HTTP layer (server.py) only parses and encodes."""

from __future__ import annotations

import json
import time
from typing import Any

from edgeopt.errors import NotFound, UserInputError
from edgeopt.fleet.rollout import health_readings
from edgeopt.fleet.rollout_spec import parse_selector
from edgeopt.fleet.store import FleetStore
from edgeopt.fleet.views import device_json, rollout_json
from edgeopt.protocol import ModelRef, ProtocolError

# sort key → ORDER BY (device_id breaks ties, so paging is stable)
SORTS = {"device": "device_id", "online": "online", "model": "model_name, model_version",
         "state": "update_state", "last_seen": "last_seen", "profile": "profile"}
MAX_PAGE = 500


def _flag(text: str | None, what: str) -> bool | None:
    if text in (None, ""):
        return None
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise UserInputError(f"{what}={text!r}: expected true or false")


def _like(text: str) -> str:
    return text.replace("!", "!!").replace("%", "!%").replace("_", "!_")


def device_page(store: FleetStore, params: dict[str, str]) -> dict[str, Any]:
    """``params``: label=K=V[,K=V] (all must match), model=NAME@VERSION (or NAME), state=UPDATE_STATE,
    online=true|false, q=text in the device id, sort=KEY, order=asc|desc, offset, limit (≤ 500).

    Filtered, counted, ordered and paged by the database; only the page's rows are read whole. A label
    is matched in the stored JSON text: ``"KEY": "VALUE"`` (json.dumps with sorted keys, as the store
    writes it) occurs there exactly when the device has that label, since keys and values are made of
    letters, digits, '_', '.' and '-' only (LABEL_KEY_RE / LABEL_VALUE_RE, on the way in and here)."""
    where, args = [], []
    model = params.get("model") or ""
    if model:
        try:
            ref = ModelRef.parse(model) if "@" in model else None
        except ProtocolError as exc:
            raise UserInputError(f"model={model!r}: {exc}") from None
        where.append("model_name = ?" + (" AND model_version = ?" if ref else ""))
        args += [ref.name, ref.version] if ref else [model]
    if state := params.get("state"):
        if state == "none":
            where.append("update_state IS NULL")
        else:
            where.append("update_state = ?")
            args.append(state)
    online = _flag(params.get("online"), "online")
    if online is not None:
        where.append("online = ?")
        args.append(int(online))
    if q := params.get("q"):
        where.append("device_id LIKE ? ESCAPE '!'")
        args.append(f"%{_like(q)}%")
    for key, value in (parse_selector([params["label"]]) if params.get("label") else {}).items():
        where.append("labels LIKE ? ESCAPE '!'")
        args.append(f"%{_like(json.dumps({key: value})[1:-1])}%")
    sort = params.get("sort") or "device"
    if sort not in SORTS:
        raise UserInputError(f"sort={sort!r}: one of {', '.join(SORTS)}")
    order = params.get("order") or "asc"
    if order not in ("asc", "desc"):
        raise UserInputError(f"order={order!r}: asc or desc")
    try:
        offset, limit = int(params.get("offset") or 0), int(params.get("limit") or 50)
    except ValueError:
        raise UserInputError("offset and limit must be whole numbers") from None
    if offset < 0 or not 1 <= limit <= MAX_PAGE:
        raise UserInputError(f"offset must be >= 0 and limit in 1..{MAX_PAGE}")
    direction = " DESC" if order == "desc" else ""
    columns = ", ".join(f"{c}{direction}" for c in SORTS[sort].split(", "))
    condition = f"WHERE {' AND '.join(where)}" if where else ""
    total = int(store.conn.query(f"SELECT COUNT(*) AS n FROM devices {condition}", args)[0]["n"])
    page = [r["device_id"] for r in store.conn.query(
        f"SELECT device_id FROM devices {condition} ORDER BY {columns}, device_id LIMIT ? OFFSET ?",
        [*args, limit, offset])]
    records = store.load_devices(page)
    return {"total": total, "offset": offset, "limit": limit,
            "devices": [device_json(records[i]) for i in page if i in records]}


def summary(store: FleetStore) -> dict[str, Any]:
    """Counts over the whole fleet: online, by update state, by model (the filters' choices)."""
    q = store.conn.query
    return {"devices": store.count_devices(),
            "online": int(q("SELECT COUNT(*) AS n FROM devices WHERE online = 1")[0]["n"]),
            "states": {r["s"] or "none": int(r["n"]) for r in
                       q("SELECT update_state AS s, COUNT(*) AS n FROM devices GROUP BY update_state")},
            "models": {f"{r['name']}@{r['version']}" if r["name"] else "none": int(r["n"]) for r in
                       q("SELECT model_name AS name, model_version AS version, COUNT(*) AS n FROM devices "
                         "GROUP BY model_name, model_version ORDER BY model_name, model_version")}}


def device_detail(store: FleetStore, device_id: str) -> dict[str, Any]:
    record = store.load_devices([device_id]).get(device_id)
    if record is None:
        raise NotFound(f"no device {device_id!r}")
    rows = store.conn.query(
        "SELECT d.rollout_id, d.wave, d.assigned_at, d.outcome, d.reason, d.outcome_at, d.previous_name, "
        "d.previous_version, r.model_name, r.model_version, r.state FROM rollout_devices d JOIN rollouts r "
        "ON r.rollout_id = d.rollout_id WHERE d.device_id = ? ORDER BY r.created_at DESC", (device_id,))
    history = [{"rollout_id": r["rollout_id"], "target": f"{r['model_name']}@{r['model_version']}",
                "rollout_state": r["state"], "wave": r["wave"] + 1, "told_at": r["assigned_at"],
                "outcome": r["outcome"], "reason": r["reason"], "outcome_at": r["outcome_at"],
                "previous": f"{r['previous_name']}@{r['previous_version']}" if r["previous_name"] else None}
               for r in rows]
    return device_json(record) | {"rollouts": history, "history": store.history(device_id, 100)}


SERIES = ("windows_per_s", "latency_p50_ms", "latency_p95_ms", "error_rate", "inference_errors", "agreement")


def device_telemetry(store: FleetStore, device_id: str, params: dict[str, str]) -> dict[str, Any]:
    """A device's telemetry samples as columns (``at`` and one list per series, null where a sample
    lacks it), what the charts plot: the last ``hours`` (default 6; the service keeps 24)."""
    try:
        hours = float(params.get("hours") or 6)
    except ValueError:
        raise UserInputError(f"hours={params.get('hours')!r}: expected a number") from None
    if not 0 < hours <= 24 * 31:
        raise UserInputError(f"hours={hours:g}: must be in (0, 744]")
    if not store.load_devices([device_id]):
        raise NotFound(f"no device {device_id!r}")
    rows = store.samples(device_id, time.time() - hours * 3600)
    return {"at": [at for at, _ in rows], **{k: [s.get(k) for _, s in rows] for k in SERIES}}


def rollouts(store: FleetStore) -> list[dict[str, Any]]:
    """Every rollout, newest first, with its wave progress (no per-device failures: see ``rollout``)."""
    out = []
    for rollout_id in reversed(store.rollout_ids()):
        info = rollout_json(*store.load_rollout(rollout_id))
        info["failed_devices"] = len(info.pop("failures"))
        out.append(info)
    return out


# gate (a RolloutSpec.gates field, the bound) → (the reading it compares, whether the largest reading is the worst)
GATES = {"max_error_rate": ("error_rate", True), "min_agreement": ("agreement", False),
         "max_latency_p95_ms": ("latency_p95_ms", True), "max_nan_outputs": ("nan_outputs", True)}


def gate_values(status, assignments, devices: dict) -> list[dict[str, Any]]:
    """Each health gate the rollout has, with the worst reading among the told devices that run or
    try the target (read as the controller reads them: ``health_readings``) and how many break it."""
    target = status.spec.target
    readings = []
    for a in assignments.values():
        rec = devices.get(a.device_id)
        if a.assigned_at is None or rec is None:
            continue
        trying = rec.update is not None and rec.update.target == target
        if rec.model != target and not trying:
            continue
        telemetry = rec.telemetry if rec.telemetry is not None and rec.telemetry.model == target else None
        readings.append(health_readings(rec.health, telemetry))
    out = []
    for gate, (reading, larger_is_worse) in GATES.items():
        bound = getattr(status.spec.gates, gate)
        if bound is None:
            continue
        values = [r[reading] for r in readings if r[reading] is not None]
        worst = (max(values) if larger_is_worse else min(values)) if values else None
        breaking = sum((v > bound) if larger_is_worse else (v < bound) for v in values)
        out.append({"gate": gate, "bound": bound, "reading": reading, "worst": worst, "devices": len(values),
                    "breaking": breaking})
    return out


def rollout(store: FleetStore, rollout_id: str) -> dict[str, Any]:
    status, assignments = store.load_rollout(rollout_id)
    told = store.load_devices(d for d, a in assignments.items() if a.assigned_at is not None)
    return rollout_json(status, assignments, store.events(rollout_id, limit=200), told) | {
        "gate_values": gate_values(status, assignments, told)}


def change_stamp(store: FleetStore) -> dict[str, Any]:
    """What changed lately, cheaply: the newest device write and every rollout's revision. The live
    stream sends it whenever it differs from the last one sent; the page reloads what it shows."""
    newest = store.conn.query("SELECT MAX(updated_at) AS t FROM devices")[0]["t"]
    revisions = {r["rollout_id"]: r["revision"] for r in
                 store.conn.query("SELECT rollout_id, revision FROM rollouts")}
    return {"devices_updated_at": newest, "rollouts": revisions}
