"""The sink interface (the package's docstring says what a sink promises); in a module of its own so
that every sink, the MQTT one included, can subclass it while ``edgeopt.agent.sinks`` imports them all."""

from __future__ import annotations

from typing import Any

from edgeopt.agent.results import EncodedResults


class Sink:
    kind = ""

    def write(self, results: EncodedResults) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}
