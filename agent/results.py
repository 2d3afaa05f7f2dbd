"""Result records of one inference batch, encoded as JSON once for every sink.

A record per window, in window order: ``{"id", "source", "seq", "t_start", "t_end", "outputs":
{name: values}, "top1"}`` (``top1`` for a single [N, K] output, values rounded to 6 decimals, a
non-finite value written as ``null``); the file sinks write each with the batch's ``device`` and
``model`` fields in front, the MQTT sink one ``{"device", "model", "results": [...]}`` message per
batch (docs/agent.md, "Results").

The text is built a column at a time: a column of numbers (the timestamps, each output) goes through
the JSON encoder in one call and is split where its rows meet, so what is left per window is one
string format — no dict, no encoder call. The encoder is orjson (the ``agent`` extra installs it):
it writes a numpy array's numbers in C, where the standard library's ``json`` formats each float in
Python (7x slower per window, docs/agent.md); without orjson the standard library writes the same
values (an exponent may be spelled differently: ``1e-06`` for orjson's ``1e-6``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import orjson
except ImportError:  # an install without the agent extra: the standard library, slower
    orjson = None

from edgeopt.agent.windowing import WindowBatch

COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))  # made once: json.dumps(separators=...) makes one per call
DECIMALS = 6  # output values are rounded to this many decimals


@dataclass(frozen=True)
class EncodedResults:
    """One batch's results as JSON text: ``meta`` the batch's device and model fields (an object),
    ``records`` one object per window."""

    meta: str
    records: list[str]

    def __len__(self) -> int:
        return len(self.records)

    def lines(self) -> str:
        """JSON Lines: each window's record with the batch's fields in front, each line ending in '\\n'."""
        head = self.meta[:-1] + ","
        return "".join([head + record[1:] + "\n" for record in self.records])

    def message(self) -> bytes:
        """The batch as one message: ``{"device", "model", "results": [records]}``."""
        return f'{self.meta[:-1]},"results":[{",".join(self.records)}]}}'.encode()


def encode_results(meta: dict[str, Any], batch: WindowBatch, outputs: dict[str, np.ndarray]) -> EncodedResults:
    """The records of ``batch`` given the model's ``outputs`` for it ({name: [n, ...]}, in window order)."""
    outputs_text = outputs_objects(outputs)
    top1 = [""] * len(batch)
    if len(outputs) == 1:
        only = next(iter(outputs.values()))
        if only.ndim == 2 and only.shape[1] > 1:
            top1 = [',"top1":' + k for k in json_rows(only.argmax(axis=1))]
    records: list[str] = []
    for block in batch.blocks:
        source = _text(block.source)
        id_head, source_field = '{"id":' + source[:-1] + ":", '","source":' + source
        done = len(records)
        rows = zip(block.seq.tolist(), json_rows(block.t_start), json_rows(block.t_end),
                   outputs_text[done:done + len(block)], top1[done:done + len(block)], strict=True)
        records += [f'{id_head}{seq}{source_field},"seq":{seq},"t_start":{t_start},"t_end":{t_end},'
                    f'"outputs":{values}{top}}}' for seq, t_start, t_end, values, top in rows]
    return EncodedResults(_text(meta), records)


def outputs_objects(outputs: dict[str, np.ndarray]) -> list[str]:
    """Each window's ``{name: values}`` object, values rounded to ``DECIMALS``."""
    keys = [_text(name) + ":" for name in outputs]
    columns = [json_rows(np.round(v.astype(np.float64), DECIMALS)) for v in outputs.values()]
    if len(columns) == 1:  # the usual case, without a join per window
        head = "{" + keys[0]
        return [head + values + "}" for values in columns[0]]
    return ["{" + ",".join(map(str.__add__, keys, values)) + "}" for values in zip(*columns, strict=True)]


def json_rows(column: np.ndarray) -> list[str]:
    """The JSON text of each row of a numeric array (non-finite numbers as ``null``). A column of
    numbers, or of rows of numbers, is encoded in one call and split where its rows meet (number texts
    hold no ',', '[' or ']', so the split is exact); deeper arrays are encoded row by row."""
    if not len(column):
        return []
    if column.ndim > 2:
        return [_encode(row) for row in column]
    text = _encode(column)
    if column.ndim == 1:
        return text[1:-1].split(",")
    return text[1:-1].replace("],[", "]\n[").split("\n")


def _text(obj: Any) -> str:
    """A string or a small object (the batch's fields) as JSON, by the same encoder as the numbers."""
    return orjson.dumps(obj).decode() if orjson is not None else COMPACT_JSON.encode(obj)


def _encode(array: np.ndarray) -> str:
    if orjson is not None:
        return orjson.dumps(np.ascontiguousarray(array), option=orjson.OPT_SERIALIZE_NUMPY).decode()
    rows = array.tolist()
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        rows = _nulls(rows)
    return COMPACT_JSON.encode(rows)


def _nulls(value):
    """``value`` (a number or nested lists of numbers) with every non-finite number as None."""
    if isinstance(value, list):
        return [_nulls(v) for v in value]
    return value if math.isfinite(value) else None
