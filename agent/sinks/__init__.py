"""Sinks: where results go. One small interface: ``write(results)`` gets one inference batch, encoded
once for every sink (``EncodedResults``: the device and model fields, and one JSON record per window
in window order), ``close()`` flushes. A sink that cannot keep up must not lose results silently:
the MQTT sink spools to the on-disk outbox, the file sinks write synchronously, one write per batch."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Any

from edgeopt.agent.config import JsonlSink, SinkBase
from edgeopt.agent.results import EncodedResults
from edgeopt.fsutil import environment_fault


class Sink:
    kind = ""

    def write(self, results: EncodedResults) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}


class StdoutResultsSink(Sink):
    kind = "stdout"

    def write(self, results) -> None:
        sys.stdout.write(results.lines())
        sys.stdout.flush()


class _RaisingRotatingFileHandler(logging.handlers.RotatingFileHandler):
    def handleError(self, record) -> None:  # logging would print a traceback and go on: let the sink count it
        raise


class JsonlResultsSink(Sink):
    """JSON Lines, rotated by size with the standard library's RotatingFileHandler."""

    kind = "jsonl"

    def __init__(self, cfg: JsonlSink):
        path = Path(cfg.path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handler = _RaisingRotatingFileHandler(path, maxBytes=cfg.max_bytes, backupCount=cfg.keep,
                                                       encoding="utf-8")
        except OSError as exc:
            raise environment_fault(exc, path) from exc
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        self.lines = 0

    def write(self, results) -> None:
        # one record per batch: the size check (two stat calls) and the flush happen once per batch,
        # so a file may pass max_bytes by at most one batch
        self.handler.emit(logging.makeLogRecord({"msg": results.lines()[:-1], "levelno": logging.INFO}))
        self.lines += len(results)

    def close(self) -> None:
        self.handler.close()

    def stats(self) -> dict[str, Any]:
        return {"lines": self.lines}


def make_sink(cfg: SinkBase, **context: Any) -> Sink:
    if cfg.type == "stdout":
        return StdoutResultsSink()
    if cfg.type == "jsonl":
        return JsonlResultsSink(cfg)  # type: ignore[arg-type]
    if cfg.type == "mqtt":
        from edgeopt.agent.sinks.mqtt import MqttResultsSink

        return MqttResultsSink(context["topic"], context["outbox"], context["publisher"])
    raise ValueError(f"unknown sink type {cfg.type!r}")
