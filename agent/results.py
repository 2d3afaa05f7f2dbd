"""Result records of one inference batch, encoded as JSON once for every sink.

A record per window, in window order: ``{"id", "source", "seq", "t_start", "t_end", "outputs":
{name: values}, "top1"}`` (``top1`` for a single [N, K] output, values rounded to 6 decimals, a
non-finite value written as ``null``); the file sinks write each with the batch's ``device`` and
``model`` fields in front, the MQTT sink one ``{"device", "model", "results": [...]}`` message per
batch (docs/agent.md, "Results").

The text is built a column at a time: a column of numbers (the timestamps, each output) goes through
the JSON encoder in one call and is split where its rows meet; the records are then the columns and
the constant texts between them zipped and joined in one call — no dict, no encoder call and no
Python bytecode per window. The encoder is orjson (the ``agent`` extra installs it):
it writes a numpy array's numbers in C, where the standard library's ``json`` formats each float in
Python (7x slower per window, docs/agent.md); without orjson the standard library writes the same
values (an exponent may be spelled differently: ``1e-06`` for orjson's ``1e-6``).
"""

from __future__ import annotations

import json
import math
from functools import cached_property
from itertools import chain, repeat
from typing import Any

import numpy as np

try:
    import orjson
except ImportError:  # an install without the agent extra: the standard library, slower
    orjson = None

from edgeopt.agent.windowing import WindowBatch

COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))  # made once: json.dumps(separators=...) makes one per call
DECIMALS = 6  # output values are rounded to this many decimals


class EncodedResults:
    """One batch's results as JSON text: ``meta`` the batch's device and model fields (an object),
    and per window a record object (``records``); ``lines()`` and ``message()`` are built from the
    columns in one join each, never a record at a time."""

    def __init__(self, meta: str, columns: list[list[str | list[str]]], size: int):
        self.meta = meta
        # per block: the record's texts in order, each a constant (a str: the same for every window) or a
        # column (a list: one str per window); a record is their concatenation
        self._columns = columns
        self._size = size

    def __len__(self) -> int:
        return self._size

    def _join(self, first: str, end: str) -> str:
        """Every record, each starting with ``first`` where it has its '{' and ending with ``end``. One
        ``str.join`` over the columns zipped together (repeat/zip/chain iterate in C): what is done per
        window in Python bytecode holds the GIL the inference thread waits for after each call (encoding
        and JSON Lines 0.97 -> 0.46-0.6 µs per window: docs/benchmarks.md, "Issue 18, third pass")."""
        parts = []
        for block in self._columns:
            n = next(len(c) for c in block if not isinstance(c, str))
            # the block's first text is its records' opening '{"id":...', a constant
            cols = [repeat(first + block[0][1:], n), *(repeat(c, n) if isinstance(c, str) else c for c in block[1:])]
            parts.append(chain.from_iterable(zip(*cols, repeat(end, n), strict=True)))
        return "".join(chain.from_iterable(parts))

    @cached_property
    def records(self) -> list[str]:
        """One JSON object per window (record texts hold no raw newline: JSON escapes it in strings)."""
        return self._join("{", "\n").split("\n")[:-1]

    def lines(self) -> str:
        """JSON Lines: each window's record with the batch's fields in front, each line ending in '\\n'."""
        return self._join(self.meta[:-1] + ",", "\n")

    def message(self) -> bytes:
        """The batch as one message: ``{"device", "model", "results": [records]}``."""
        return f'{self.meta[:-1]},"results":[{self._join("{", ",")[:-1]}]}}'.encode()


def encode_results(meta: dict[str, Any], batch: WindowBatch, outputs: dict[str, np.ndarray]) -> EncodedResults:
    """The records of ``batch`` given the model's ``outputs`` for it ({name: [n, ...]}, in window order)."""
    values = outputs_columns(outputs)
    top1: list[str] | None = None
    if len(outputs) == 1:
        only = next(iter(outputs.values()))
        if only.ndim == 2 and only.shape[1] > 1:
            top1 = json_rows(only.argmax(axis=1))
    columns: list[list[str | list[str]]] = []
    done = 0
    for block in batch.blocks:
        n = len(block)
        if not n:
            continue
        source = _text(block.source)
        seq = json_rows(block.seq)
        own = [v[done:done + n] if isinstance(v, list) else v for v in values]
        columns.append(['{"id":' + source[:-1] + ":", seq, '","source":' + source + ',"seq":', seq, ',"t_start":',
                        json_rows(block.t_start), ',"t_end":', json_rows(block.t_end), ',"outputs":', *own,
                        *([',"top1":', top1[done:done + n]] if top1 is not None else []), "}"])
        done += n
    return EncodedResults(_text(meta), columns, len(batch))


def outputs_columns(outputs: dict[str, np.ndarray]) -> list[str | list[str]]:
    """The ``{name: values}`` object of each window as texts to concatenate: constants and columns
    (values rounded to ``DECIMALS``)."""
    keys = [_text(name) + ":" for name in outputs]
    columns = [json_rows(np.round(v.astype(np.float64), DECIMALS)) for v in outputs.values()]
    if not columns:
        return ["{}"]
    texts: list[str | list[str]] = []
    for i, (key, column) in enumerate(zip(keys, columns, strict=True)):
        texts += [("{" if i == 0 else ",") + key, column]
    return [*texts, "}"]


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
