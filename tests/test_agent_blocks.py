"""The agent's block path against its definition, one window at a time: windowing of whole chunks,
the window queue's drop counting on blocks, and the per-batch JSON encoding of results."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from edgeopt.agent import results as results_mod
from edgeopt.agent.batcher import QueueClosed, WindowQueue
from edgeopt.agent.config import JsonlSink
from edgeopt.agent.results import encode_results
from edgeopt.agent.sinks import JsonlResultsSink
from edgeopt.agent.windowing import Preprocessing, WindowBatch, WindowBlock, Windower


def preprocessing(window, hop, channels_first, channels=3, normalize=True):
    rng = np.random.default_rng(window * 100 + hop)
    mean = rng.normal(size=channels).astype(np.float32) if normalize else None
    std = rng.uniform(0.5, 2.0, size=channels).astype(np.float32) if normalize else None
    return Preprocessing(window, hop, channels_first, channels, None, mean, std, 50.0)


def reference_windows(samples, timestamps, pre, nan_policy):
    """The definition, a sample and a window at a time: window i covers samples [i*hop, i*hop + window),
    numbered i whether or not it is dropped; NaN/Inf samples are dropped with their windows, zeroed, or
    replaced by the channel's last finite value (0 before the first); then (x - mean) / std."""
    x = samples.astype(np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if nan_policy == "zero":
        x = np.where(np.isfinite(x), x, np.float32(0))
    elif nan_policy == "hold":
        last = np.zeros(x.shape[1], np.float32)
        for t in range(len(x)):
            x[t] = np.where(np.isfinite(x[t]), x[t], last)
            last = x[t].copy()
    if pre.mean is not None:
        x = (x - pre.mean) / pre.std
    out, dropped = [], 0
    for i in range((len(x) - pre.window) // pre.hop + 1 if len(x) >= pre.window else 0):
        s = i * pre.hop
        if nan_policy == "drop" and bad[s:s + pre.window].any():
            dropped += 1
            continue
        data = x[s:s + pre.window]
        out.append((i, timestamps[s], timestamps[s + pre.window - 1], data.T if pre.channels_first else data))
    return out, dropped


def block_windows(blocks):
    return [(int(b.seq[i]), b.t_start[i], b.t_end[i], b.data[i]) for b in blocks for i in range(len(b))]


@pytest.mark.parametrize("window,hop", [(8, 8), (8, 3), (8, 1), (5, 9), (1, 1)])
@pytest.mark.parametrize("channels_first", [True, False])
@pytest.mark.parametrize("nan_policy", ["drop", "zero", "hold"])
@pytest.mark.parametrize("seed", range(3))
def test_block_windowing_gives_the_per_sample_windows_across_any_chunking(window, hop, channels_first, nan_policy,
                                                                           seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 120))
    samples = rng.normal(size=(n, 3)).astype(np.float32)
    if n and seed:  # some NaN / Inf samples
        samples[rng.integers(0, n, size=3), rng.integers(0, 3, size=3)] = [np.nan, np.inf, -np.inf]
    timestamps = 1.7e9 + np.cumsum(rng.uniform(0.01, 0.03, size=n))
    pre = preprocessing(window, hop, channels_first, normalize=seed != 1)
    expected, dropped = reference_windows(samples, timestamps, pre, nan_policy)

    w = Windower("imu", pre, nan_policy)
    cuts = np.sort(rng.integers(0, n + 1, size=int(rng.integers(0, 12))))  # chunks of any size, empty ones too
    blocks = [w.push(samples[a:b], timestamps[a:b]) for a, b in zip([0, *cuts], [*cuts, n], strict=True)]

    got = block_windows(blocks)
    assert [g[:3] for g in got] == [e[:3] for e in expected]  # ids (seq), t_start, t_end: exactly
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g[3], e[3])  # bit for bit: the same float32 operations
    assert w.nan_windows == dropped and w.seq == len(expected) + dropped and w.samples_in == n
    for b in blocks:
        assert b.source == "imu" and b.data.dtype == np.float32 and b.data.flags.c_contiguous
        assert b.data.shape[1:] == pre.window_shape


def test_a_block_does_not_share_memory_with_the_samples_pushed():
    pre = preprocessing(4, 4, channels_first=False, normalize=False)
    samples = np.arange(24, dtype=np.float32).reshape(8, 3)
    block = Windower("s", pre).push(samples, np.arange(8.0))
    assert not np.shares_memory(block.data, samples)
    samples[:] = -1
    assert block.data.min() >= 0


def blocks_of(source, seq0, n):
    return WindowBlock(source, np.arange(seq0, seq0 + n), np.arange(seq0, seq0 + n) * 1.0,
                       np.arange(seq0, seq0 + n) + 0.5, np.arange(seq0, seq0 + n, dtype=np.float32)[:, None])


def queued(q):
    batch = q.get_batch(10**6, 0.0, 0.0)
    return [(b.source, int(s)) for b in batch.blocks for s in b.seq]


def queued_when(q, n):
    """Wait until ``n`` windows are queued, then take them."""
    for _ in range(500):
        if len(q) >= n:
            break
        threading.Event().wait(0.01)
    batch = q.get_batch(n, 0.0, 0.0)
    return [(b.source, int(s)) for b in batch.blocks for s in b.seq]


def test_drop_oldest_on_blocks_drops_and_counts_the_oldest_windows_per_source():
    q = WindowQueue(10, "drop-oldest")
    q.put(blocks_of("a", 0, 4))
    q.put(blocks_of("b", 0, 4))
    q.put(blocks_of("a", 4, 5))  # 13 windows for 10 places: a:0..2 go
    assert (q.dropped, dict(q.dropped_by_source), len(q)) == (3, {"a": 3}, 10)
    q.put(blocks_of("b", 4, 25))  # more than the queue holds: everything queued goes, then b:4..18
    assert (q.dropped, dict(q.dropped_by_source)) == (3 + 10 + 15, {"a": 3 + 6, "b": 4 + 15})
    assert queued(q) == [("b", s) for s in range(19, 29)]
    assert q.windows_in == 4 + 4 + 5 + 10 and len(q) == 0  # windows_in: windows that got a place


def test_block_policy_queues_what_fits_and_the_rest_in_order_as_room_frees():
    q = WindowQueue(5, "block")
    done = threading.Event()

    def producer():
        for seq0 in range(0, 28, 7):
            q.put(blocks_of("a", seq0, 7))
        done.set()

    threading.Thread(target=producer, daemon=True).start()
    got = []
    while len(got) < 28:
        batch = q.get_batch(3, 0.0, idle_timeout_s=1.0)
        got += [int(s) for b in batch.blocks for s in b.seq]
    assert got == list(range(28)) and q.dropped == 0 and done.wait(1)


def test_a_blocked_source_resumes_when_half_the_queue_is_free_not_at_every_batch():
    q = WindowQueue(10, "block")
    q.put(blocks_of("a", 0, 10))
    threading.Thread(target=q.put, args=(blocks_of("a", 10, 20),), daemon=True).start()
    assert [s for _, s in queued_when(q, 2)] == [0, 1]
    threading.Event().wait(0.3)
    assert len(q) == 8  # room for 2 of its 20 windows: still waiting
    assert [s for _, s in queued_when(q, 3)] == [2, 3, 4]
    assert [s for _, s in queued_when(q, 10)] == list(range(5, 15))  # then it fills the queue at once


def test_closing_a_blocked_queue_says_how_many_windows_of_the_block_got_in():
    q = WindowQueue(5, "block")
    q.put(blocks_of("a", 0, 3))
    result = {}

    def producer():
        try:
            q.put(blocks_of("a", 3, 6))  # 2 fit, 4 wait for room
        except QueueClosed as closed:
            result["queued"] = closed.queued

    t = threading.Thread(target=producer)
    t.start()
    for _ in range(500):
        if len(q) == 5:
            break
        threading.Event().wait(0.01)
    q.close()
    t.join(5)
    assert result == {"queued": 2} and queued(q) == [("a", s) for s in range(5)] and q.dropped == 0


def test_a_batch_inside_one_block_is_a_view_and_across_blocks_a_copy_in_order():
    q = WindowQueue(100)
    big = blocks_of("a", 0, 10)
    q.put(big)
    q.put(blocks_of("b", 0, 10))
    first = q.get_batch(4, 0.0)
    assert np.shares_memory(first.data, big.data) and first.data[:, 0].tolist() == [0, 1, 2, 3]
    across = q.get_batch(10, 0.0)
    assert [b.source for b in across.blocks] == ["a", "b"] and across.data[:, 0].tolist() == [4, 5, 6, 7, 8, 9,
                                                                                            0, 1, 2, 3]
    assert across.describe() == "a:4 ... b:3"


# -- results ------------------------------------------------------------------------------------------
def reference_records(batch, outputs):
    """docs/agent.md, "Results": one dict per window."""
    lists = {n: nulls(np.round(v.astype(np.float64), 6).tolist()) for n, v in outputs.items()}
    top1 = None
    if len(outputs) == 1:
        only = next(iter(outputs.values()))
        if only.ndim == 2 and only.shape[1] > 1:
            top1 = only.argmax(axis=1).tolist()
    records, i = [], 0
    for b in batch.blocks:
        for k in range(len(b)):
            rec = {"id": f"{b.source}:{b.seq[k]}", "source": b.source, "seq": int(b.seq[k]),
                   "t_start": float(b.t_start[k]), "t_end": float(b.t_end[k]),
                   "outputs": {n: v[i] for n, v in lists.items()}}
            if top1 is not None:
                rec["top1"] = top1[i]
            records.append(rec)
            i += 1
    return records


def nulls(value):
    """JSON has no NaN or Infinity: a non-finite output is written as null."""
    if isinstance(value, list):
        return [nulls(v) for v in value]
    return value if np.isfinite(value) else None


COMPACT = {"separators": (",", ":")}


def strict_loads(text):
    """json.loads refusing the NaN / Infinity constants (not JSON: a JavaScript consumer chokes on them)."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(params=["orjson", "json"])
def encoder(request, monkeypatch):
    """orjson (the agent extra installs it), and the standard library where it is not installed."""
    if request.param == "orjson":
        return pytest.importorskip("orjson").dumps
    monkeypatch.setattr(results_mod, "orjson", None)
    return lambda obj: json.dumps(obj, **COMPACT).encode()


@pytest.mark.parametrize("shapes", [{"probs": (4,)}, {"score": ()}, {"one": (1,)}, {"map": (2, 3)},
                                    {"probs": (4,), "embedding": (3,)}, {"empty": (0,)}])
@pytest.mark.parametrize("seed", range(3))
def test_batch_encoding_is_byte_identical_to_the_encoder_on_each_record(shapes, seed, encoder):
    rng = np.random.default_rng(seed)
    sources = ["imu", 'we"ird\\name', "bücher-ß", "a,b],[c"]
    blocks = []
    for _ in range(int(rng.integers(1, 4))):
        n = int(rng.integers(1, 7))
        seq0 = int(rng.integers(0, 10**9))
        t0 = float(rng.uniform(0, 2e9))
        blocks.append(WindowBlock(sources[int(rng.integers(0, len(sources)))], np.arange(seq0, seq0 + n),
                                  t0 + np.arange(n) * 0.02, t0 + 1.26 + np.arange(n) * 0.02,
                                  np.zeros((n, 1), np.float32)))
    batch = WindowBatch(blocks)
    scale = [1e-7, 1.0, 1e5][seed]
    outputs = {name: (rng.normal(size=(len(batch), *shape)) * scale).astype(np.float32)
               for name, shape in shapes.items()}
    if seed == 2:
        first = next(iter(outputs.values()))
        if first.size:
            first.reshape(-1)[:3] = [np.nan, np.inf, -np.inf][:first.size]
    meta = {"device": "dev-ü", "model": {"name": "imu", "version": "1.2"}}

    encoded = encode_results(meta, batch, outputs)

    records = reference_records(batch, outputs)
    assert encoded.records == [encoder(r).decode() for r in records]
    assert encoded.lines() == "".join(encoder({**meta, **r}).decode() + "\n" for r in records)
    assert encoded.message() == encoder({**meta, "results": records})
    assert [strict_loads(line) for line in encoded.lines().splitlines()] == [{**meta, **r} for r in records]


def test_jsonl_sink_rotates_by_size_keeps_every_line_and_deletes_the_oldest(tmp_path):
    path = tmp_path / "out" / "results.jsonl"
    sink = JsonlResultsSink(JsonlSink(type="jsonl", path=str(path), max_bytes=1024, keep=2))
    pre = preprocessing(2, 2, True, normalize=False)
    w = Windower("s", pre)
    meta = {"device": "d", "model": {"name": "m", "version": "1"}}
    written = []
    for i in range(12):
        block = w.push(np.zeros((8, 3), np.float32), 100.0 * i + np.arange(8))
        encoded = encode_results(meta, WindowBatch([block]), {"y": np.ones((len(block), 2), np.float32)})
        sink.write(encoded)
        written += encoded.lines().splitlines()
    sink.close()
    files = [path.with_name("results.jsonl.2"), path.with_name("results.jsonl.1"), path]
    assert not path.with_name("results.jsonl.3").exists()
    kept = [line for f in files for line in f.read_text().splitlines()]
    assert kept == written[len(written) - len(kept):]  # the newest lines, in order, none lost inside
    assert all(0 < f.stat().st_size <= 1024 for f in files[:2]) and len(kept) >= 3 * len(encoded)
    assert sink.stats() == {"lines": len(written)}


def test_jsonl_sink_appends_to_an_existing_file_and_counts_its_size(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("x" * 1000 + "\n")
    sink = JsonlResultsSink(JsonlSink(type="jsonl", path=str(path), max_bytes=1024, keep=1))
    block = Windower("s", preprocessing(2, 2, True, normalize=False)).push(np.zeros((2, 3), np.float32),
                                                                          np.arange(2.0))
    sink.write(encode_results({"device": "d", "model": {}}, WindowBatch([block]), {"y": np.ones((1, 2))}))
    sink.close()
    assert path.with_name("r.jsonl.1").read_text() == "x" * 1000 + "\n"  # the old content rotated out whole
    assert json.loads(path.read_text())["id"] == "s:0"


def test_jsonl_sink_splits_a_large_write_at_lines_so_no_file_passes_max_bytes(tmp_path):
    """The writer encodes several batches together: one write may be many times max_bytes."""
    path = tmp_path / "r.jsonl"
    sink = JsonlResultsSink(JsonlSink(type="jsonl", path=str(path), max_bytes=1000, keep=50))
    w = Windower("s", preprocessing(2, 2, True, normalize=False))
    block = w.push(np.zeros((200, 3), np.float32), np.arange(200.0))
    encoded = encode_results({"device": "d", "model": {"name": "m", "version": "1"}}, WindowBatch([block]),
                             {"y": np.ones((len(block), 2), np.float32)})
    sink.write(encoded)
    wide = encode_results({"device": "d" * 1500, "model": {}}, WindowBatch([block[:1]]), {"y": np.ones((1, 2))})
    sink.write(wide)  # one line longer than max_bytes: a file of its own
    sink.close()
    files = sorted(tmp_path.glob("r.jsonl.*"), key=lambda p: -int(p.suffix[1:])) + [path]
    assert len(files) > 5 and all(f.stat().st_size <= 1000 for f in files[:-1])
    assert path.read_text() == wide.lines()
    kept = [line for f in files for line in f.read_text().splitlines()]
    assert kept == encoded.lines().splitlines() + wide.lines().splitlines()


def test_a_batch_splits_into_runs_of_n_windows_in_order():
    blocks = [WindowBlock(s, np.arange(k) + 10 * i, np.zeros(k), np.zeros(k), np.full((k, 1), i, np.float32))
              for i, (s, k) in enumerate([("a", 5), ("b", 3), ("a", 7)])]
    parts = WindowBatch(blocks).split(4)
    assert [len(p) for p in parts] == [4, 4, 4, 3]
    assert [(b.source, b.seq.tolist()) for p in parts for b in p.blocks] == [
        ("a", [0, 1, 2, 3]), ("a", [4]), ("b", [10, 11, 12]), ("a", [20, 21, 22, 23]), ("a", [24, 25, 26])]


def test_a_failing_call_in_a_take_of_several_loses_only_its_windows():
    """Batch-1 models get up to 32 waiting windows at once, run one call each: when one call fails,
    the others' results are still written and only that call's window is counted lost."""
    from types import SimpleNamespace

    from edgeopt.agent.config import parse_config
    from edgeopt.agent.pipeline import Pipeline
    from edgeopt.agent.telemetry import InferenceStats
    from edgeopt.runtime import RuntimeFailure

    class Model(SimpleNamespace):
        def run_calls(self, batch, max_call=None):
            seqs = [int(s) for b in batch.blocks for s in b.seq]
            if 5 in seqs:
                raise RuntimeFailure("window 5 broke the runtime")
            return {"y": np.asarray(seqs, np.float32)[:, None]}, [(1, 1e-4)] * len(seqs)

    pre = preprocessing(2, 2, True, normalize=False)
    model = Model(pre=pre, fixed_batch=1, name="m", version="1", state_resets=0)
    written = []
    sink = SimpleNamespace(kind="list", write=lambda results: written.extend(results.records))
    config = parse_config({"source": [{"type": "synthetic"}], "batching": {"max_batch": 1}})
    pipeline = Pipeline(config, model, [sink], "dev", InferenceStats())
    pipeline.queue.put(Windower("s", pre).push(np.zeros((24, 3), np.float32), np.arange(24.0)))  # 12 windows
    assert pipeline.step(0.0) == 12
    pipeline.writer.close()
    assert pipeline.inference_errors == 1 and pipeline.windows_inferred == 12
    assert [json.loads(r)["seq"] for r in written] == [s for s in range(12) if s != 5]


def test_a_step_hands_its_results_to_the_writer_at_once_and_not_the_samples():
    """The writer is woken when half its backlog waits or a step ends, not for every take: one take's
    results are written when its step ends, without more takes or closing (a slow live source must not
    hold results back); what waits for the writer is the windows' ids and timestamps, not their samples."""
    from types import SimpleNamespace

    from edgeopt.agent.config import parse_config
    from edgeopt.agent.pipeline import Pipeline
    from edgeopt.agent.telemetry import InferenceStats

    class Model(SimpleNamespace):
        def run_calls(self, batch, max_call=None):
            seqs = [int(s) for b in batch.blocks for s in b.seq]
            return {"y": np.asarray(seqs, np.float32)[:, None]}, [(len(seqs), 1e-4)]

    pre = preprocessing(2, 2, True, normalize=False)
    model = Model(pre=pre, fixed_batch=None, name="m", version="1", state_resets=0)
    written, handed = [], []
    sink = SimpleNamespace(kind="list", write=lambda results: written.extend(results.records))
    config = parse_config({"source": [{"type": "synthetic"}], "batching": {"max_batch": 64}})
    pipeline = Pipeline(config, model, [sink], "dev", InferenceStats())
    submit = pipeline.writer.submit
    pipeline.writer.submit = lambda batch, outputs, model=None: (handed.append(batch), submit(batch, outputs, model))
    block = Windower("s", pre).push(np.ones((24, 3), np.float32), np.arange(24.0))  # 12 windows
    pipeline.queue.put(block)
    assert pipeline.step(0.0) == 12
    for _ in range(200):
        if len(written) == 12:
            break
        threading.Event().wait(0.01)
    assert [json.loads(r)["seq"] for r in written] == list(range(12))
    (labels,) = handed
    assert [b.data.size for b in labels.blocks] == [0]
    assert np.array_equal(labels.blocks[0].seq, block.seq) and np.array_equal(labels.blocks[0].t_end, block.t_end)
    pipeline.writer.close()
