"""Sources: where sensor samples come from. The interface every source implements, and what they
share, is ``edgeopt.agent.sources.base``; each kind of source is one module here, and ``make_source``
builds the one a ``[[sources]]`` table names."""

from __future__ import annotations

from edgeopt.agent.config import SourceBase
from edgeopt.agent.sources.base import Source, SourceContext
from edgeopt.agent.sources.lines import (
    MqttTopicSource,
    SerialPortSource,
    StdinLinesSource,
    UnixDatagramSource,
    UnixStreamSocketSource,
)
from edgeopt.agent.sources.replay import CsvReplaySource, NpyReplaySource
from edgeopt.agent.sources.synthetic import SyntheticImuSource


def make_source(cfg: SourceBase, ctx: SourceContext) -> Source:
    kinds: dict[str, type[Source]] = {c.kind: c for c in (
        CsvReplaySource, NpyReplaySource, StdinLinesSource, UnixStreamSocketSource, UnixDatagramSource,
        SerialPortSource, MqttTopicSource, SyntheticImuSource)}
    return kinds[cfg.type](cfg, ctx)
