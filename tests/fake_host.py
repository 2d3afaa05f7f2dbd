"""The running agent as the updater sees it (``agent.update.updater.Host``), without the agent: a real
state directory, the current model, batch observers the test feeds, and swaps applied at once. With
tests/memory_bus.py for the broker, the updater's steps run in-process, without Mosquitto or an agent
subprocess (the agent's transport: ``MemoryBus.client(payload_only=True)``); the integration tests
(test_update_agent.py and the rest) run the real agent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.agent.model import LoadedModel, load_model
from edgeopt.agent.statedir import StateDir
from edgeopt.agent.telemetry import RejectedMessages
from edgeopt.agent.windowing import WindowBatch, WindowBlock


class FakeHost:
    def __init__(self, state_dir: Path):
        self.state = StateDir(state_dir)
        self.rejected = RejectedMessages()
        self.model: LoadedModel | None = None
        self.observers: list = []
        self.swaps: list[str | None] = []  # the slots switched to, in order (None: no model)
        self.slot_errors: dict[str, str | None] = {}
        self.states_published = 0
        if self.state.active_slot() is not None:
            self.model = load_model(self.state.slot_path(self.state.active_slot()), self.state.active_slot())

    def current_model(self) -> dict[str, Any] | None:
        return self.model.describe() if self.model else None

    def add_batch_observer(self, fn) -> None:
        self.observers.append(fn)

    def remove_batch_observer(self, fn) -> None:
        if fn in self.observers:
            self.observers.remove(fn)

    def request_swap(self, slot: str | None, model: LoadedModel | None, timeout: float = 60.0) -> bool:
        """What the agent's inference loop does between two batches: activate ``slot``, run ``model``."""
        if slot is None:
            self.state.deactivate()
            self.model = None
        else:
            self.state.activate(slot)
            self.model = model or load_model(self.state.slot_path(slot), slot)
        self.swaps.append(slot)
        return True

    def set_slot_error(self, slot: str, problem: str | None) -> None:
        self.slot_errors[slot] = problem

    def publish_state(self) -> None:
        self.states_published += 1

    def infer(self, windows: np.ndarray, corrupt=None) -> None:
        """One batch through the current model, shown to the observers as the pipeline shows it
        (``corrupt``: a function applied to the outputs first, e.g. to make them NaN)."""
        n = len(windows)
        block = WindowBlock("s", np.arange(n), np.zeros(n), np.zeros(n), windows.astype(np.float32))
        batch = WindowBatch([block])
        outputs, seconds = self.model.infer(batch)
        if corrupt is not None:
            outputs = {k: corrupt(v) for k, v in outputs.items()}
        for fn in list(self.observers):
            fn(batch, outputs, seconds, self.model)
