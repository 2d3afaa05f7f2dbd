"""What an operator does to rollouts — create one, start, pause, resume or abort it — as functions the
CLI (``edgeopt fleet rollout ...``) and the dashboard (``POST /api/rollouts...``) both call, so a form
and a flag are checked by the same code and act through the same compare-and-set writes
(``FleetStore.save_decision``) the controller uses."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgeopt.errors import RemoteError, UserInputError
from edgeopt.fleet.rollout import Decision, apply_command, new_rollout
from edgeopt.fleet.rollout_spec import ROLLOUT_PARAMS, rollout_spec, selector_text
from edgeopt.fleet.store import FleetStore
from edgeopt.protocol import ROLLOUT_ID_RE, ModelRef, ProtocolError


@dataclass(frozen=True)
class Created:
    rollout_id: str
    model: ModelRef
    devices: int
    waves: list[int]
    started: bool


def parse_model(text: str, what: str = "--model") -> ModelRef:
    try:
        return ModelRef.parse(text)
    except ProtocolError as exc:
        raise UserInputError(f"{what}: {exc}") from None


def check_published(published: list[str], model: ModelRef, repo: Any) -> None:
    """``published``: 'NAME@VERSION' of every model in the signed targets."""
    if str(model) not in published:
        listing = ", ".join(published[-8:]) if published else "nothing published yet"
        raise UserInputError(f"{model} is not in the repository {repo} (published: {listing}); "
                             f"publish it with 'edgeopt fleet publish'")


def create_rollout(open_store: Callable[[], FleetStore], published: Callable[[], list[str]], repo: Any,
                   model_text: str, selectors: tuple[str, ...] | list[str], options: dict[str, Any],
                   rollout_id: str | None = None, start: bool = False) -> Created:
    """Plan a rollout of ``model_text`` over the devices the selectors match now (``options``: the
    rollout's declared parameters, typed or as text); start it when asked. Every mistake is one
    ``UserInputError`` naming the flag, before anything is written; the flags are checked before the
    repository (``published``: 'NAME@VERSION' of every signed model) and the database are opened."""
    model = parse_model(model_text)
    spec = rollout_spec(model, selectors, **options)
    online_only = options.get("online_only", False)
    if isinstance(online_only, str):  # a form's or a script's text ("false" is no true value)
        online_only = next(p for p in ROLLOUT_PARAMS if p.name == "online_only").coerce(online_only, "--online-only")
    check_published(published(), model, repo)
    rollout_id = rollout_id or f"{model.name}-{model.version}-{secrets.token_hex(3)}".replace("+", ".")
    if not ROLLOUT_ID_RE.fullmatch(rollout_id):
        raise UserInputError(f"--id {rollout_id!r}: use letters, digits, '.', '_', '-' (at most 64)")
    store = open_store()
    if rollout_id in store.rollout_ids():
        raise UserInputError(f"--id {rollout_id!r}: a rollout with this id exists")
    devices = [d.device_id for d in store.list_devices(spec.selector) if d.online or not online_only]
    if not devices:
        raise UserInputError(f"selector {selector_text(spec.selector)} matches no {'online ' if online_only else ''}"
                             f"device ({store.count_devices()} device(s) known; see 'edgeopt fleet devices')")
    now = time.time()
    status, assignments = new_rollout(rollout_id, spec, devices, now)
    store.create_rollout(status, assignments)
    if start:
        command_rollout(store, rollout_id, "start")
    return Created(rollout_id, model, len(devices), [w.size for w in status.waves], start)


def command_rollout(store: FleetStore, rollout_id: str, command: str, reason: str | None = None,
                    attempts: int = 20) -> Decision:
    """Start, pause, resume or abort ``rollout_id``, retried while the controller moves it between our
    read and our write (the write is compare-and-set on the rollout's revision)."""
    for _ in range(attempts):
        status, assignments = store.load_rollout(rollout_id)
        decision = apply_command(status, assignments, command, time.time(), reason)
        if store.save_decision(decision, status.revision):
            return decision
        time.sleep(0.1)
    raise RemoteError(f"rollout {rollout_id} kept changing under the command; try again")
