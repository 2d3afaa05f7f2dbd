"""Sinks: where results go. One small interface: ``write(meta, results)`` gets one inference batch
(``meta``: device and model; ``results``: one record per window, in window order), ``close()``
flushes. A sink that cannot keep up must not lose results silently: the MQTT sink spools to the
on-disk outbox, the file sinks write synchronously."""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Any

from edgeopt.agent.config import JsonlSink, SinkBase
from edgeopt.fsutil import environment_fault


class Sink:
    kind = ""

    def write(self, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}


COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))  # made once: json.dumps(separators=...) makes one per call


def window_lines(meta: dict[str, Any], results: list[dict[str, Any]]) -> list[str]:
    """One JSON object per window: the batch's device/model fields plus the window's record (the
    shared fields are encoded once per batch)."""
    head = COMPACT_JSON.encode(meta)[:-1] + ","
    return [head + COMPACT_JSON.encode(r)[1:] for r in results]


class StdoutResultsSink(Sink):
    kind = "stdout"

    def write(self, meta, results) -> None:
        sys.stdout.write("".join(line + "\n" for line in window_lines(meta, results)))
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

    def write(self, meta, results) -> None:
        # one record per batch: the size check (two stat calls) and the flush happen once per batch,
        # so a file may pass max_bytes by at most one batch
        lines = window_lines(meta, results)
        self.handler.emit(logging.makeLogRecord({"msg": "\n".join(lines), "levelno": logging.INFO}))
        self.lines += len(lines)

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
