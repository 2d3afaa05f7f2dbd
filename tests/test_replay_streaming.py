"""Replay sources stream their file (issue 18): the windows are exactly those a whole-file replay
gives — the file parsed at once and windowed in one push — whatever the block size, with malformed
rows, NaN samples, recorded timestamps, a column-major .npy and a loop; and no block read from the
file is larger than ``CHUNK_SAMPLES``."""

from __future__ import annotations

import numpy as np
import pytest

from edgeopt.agent.batcher import WindowQueue
from edgeopt.agent.config import CsvSource, NpySource
from edgeopt.agent.sources import SourceContext, make_source
from edgeopt.agent.sources import replay as replay_mod
from edgeopt.agent.windowing import Preprocessing, Windower
from edgeopt.errors import UserInputError

RATE = 50.0
PRE = Preprocessing(window=16, hop=5, channels_first=True, channels=3, channel_names=("ax", "ay", "az"),
                    mean=np.array([0.1, -0.2, 1.0], np.float32), std=np.array([2.0, 0.5, 1.5], np.float32),
                    sample_rate_hz=RATE)


def replayed(cfg, nan_policy="drop"):
    """Run a replay source to its end; (windows as a dict of columns, the source)."""
    queue = WindowQueue(1 << 20, "block")
    src = make_source(cfg, SourceContext(PRE, nan_policy, queue))
    src._run()
    batch = queue.get_batch(1 << 20, 0.0, 0.0)
    cols = {k: np.concatenate([getattr(b, k) for b in batch.blocks]) if batch.blocks else np.empty(0)
            for k in ("seq", "t_start", "t_end", "data")}
    return cols, src


def whole_file(samples, stamps, nan_policy="drop"):
    """What the replay gave before it streamed: every sample windowed in one push."""
    block = Windower("r", PRE, nan_policy).push(samples, stamps)
    return {"seq": block.seq, "t_start": block.t_start, "t_end": block.t_end, "data": block.data}


def assert_same(got, want):
    for k in ("seq", "t_start", "t_end", "data"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.fixture(params=[7, 64, 4096], ids=lambda n: f"chunk{n}")
def chunk(request, monkeypatch):
    """Blocks smaller than a window, not a multiple of the hop, and the default."""
    monkeypatch.setattr(replay_mod, "CHUNK_SAMPLES", request.param)
    return request.param


def num(v) -> str:
    """A float32 sample as text that parses back to the same float32."""
    return repr(float(v))


def signal(n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 3)) * [1.0, 0.3, 2.0] + [0.0, 0.5, 9.8]).astype(np.float32)


def test_npy_windows_equal_whole_file(tmp_path, chunk):
    x = signal(1003)
    np.save(tmp_path / "x.npy", x)
    got, _ = replayed(NpySource(type="npy", name="r", path=str(tmp_path / "x.npy"), replay="fast"))
    start = got["t_start"][0]  # the replay's clock: the first sample's time
    assert_same(got, whole_file(x, start + np.arange(len(x)) / RATE))


@pytest.mark.parametrize("dtype", ["<f8", ">f4", "<i2"])
def test_npy_any_numeric_dtype_and_column_major(tmp_path, chunk, dtype):
    x = (signal(517) * 100).astype(dtype)
    np.save(tmp_path / "f.npy", np.asfortranarray(x))
    got, _ = replayed(NpySource(type="npy", name="r", path=str(tmp_path / "f.npy"), replay="fast"))
    assert_same(got, whole_file(x.astype(np.float32), got["t_start"][0] + np.arange(len(x)) / RATE))


def test_csv_with_header_timestamps_labels_nan_and_malformed_rows(tmp_path, chunk):
    x = signal(700, seed=1)
    x[100, 1] = np.nan  # windows holding it are dropped, their numbers kept
    stamps = 1000.0 + np.arange(len(x)) * 0.02
    lines = ["# recorded on the bench", "t,az,label,ax,ay"]
    bad = {50: "1.0,2.0", 51: "x,y,z,w,v", 300: ""}  # before data row i: a malformed row (or a blank line)
    for i, (row, t) in enumerate(zip(x, stamps.tolist(), strict=True)):
        if i in bad:
            lines.append(bad[i])
        lines.append(f"{t!r},{num(row[2])},{i % 4},{num(row[0])},{num(row[1])}")
    (tmp_path / "x.csv").write_text("\n".join(lines) + "\n")
    got, src = replayed(CsvSource(type="csv", name="r", path=str(tmp_path / "x.csv"), replay="fast"))
    assert_same(got, whole_file(x.astype(np.float32), stamps))
    assert src.malformed == 2
    assert src.windower.nan_windows > 0


def test_csv_without_header(tmp_path, chunk):
    x = signal(333, seed=2)
    (tmp_path / "x.csv").write_text("".join(f"{num(a)}, {num(b)} ,{num(c)}\r\n" for a, b, c in x))
    got, _ = replayed(CsvSource(type="csv", name="r", path=str(tmp_path / "x.csv"), replay="fast",
                                channels=["ax", "ay", "az"]))
    assert_same(got, whole_file(x, got["t_start"][0] + np.arange(len(x)) / RATE))


def test_a_loop_continues_the_clock_and_counts_malformed_rows_once(tmp_path, chunk):
    x = signal(200, seed=3)
    rows = [f"{num(a)},{num(b)},{num(c)}" for a, b, c in x]
    rows.insert(10, "1,2")
    (tmp_path / "x.csv").write_text("\n".join(rows) + "\n")
    cfg = CsvSource(type="csv", name="r", path=str(tmp_path / "x.csv"), replay="fast", loop=True)
    queue = WindowQueue(1 << 20, "block")
    src = make_source(cfg, SourceContext(PRE, "drop", queue))
    passes = 3

    emit = src.emit
    seen = []

    def emit_counting(samples, stamps):  # stop after three passes over the file
        emit(samples, stamps)
        seen.append(len(samples))
        if sum(seen) >= passes * len(x):
            src.stopping.set()

    src.emit = emit_counting
    src._run()
    batch = queue.get_batch(1 << 20, 0.0, 0.0)
    got = np.concatenate([b.data for b in batch.blocks])
    start = batch.blocks[0].t_start[0]
    span = len(x) / RATE
    stamps = np.concatenate([start + np.arange(len(x)) / RATE + k * span for k in range(passes)])
    want = Windower("r", PRE).push(np.concatenate([x] * passes), stamps)
    np.testing.assert_array_equal(got, want.data)
    np.testing.assert_allclose(np.concatenate([b.t_start for b in batch.blocks]), want.t_start, rtol=0, atol=1e-9)
    assert src.malformed == 1


def test_blocks_never_exceed_the_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(replay_mod, "CHUNK_SAMPLES", 100)
    np.save(tmp_path / "x.npy", signal(1050))
    (tmp_path / "x.csv").write_text("".join(f"{a},{b},{c}\n" for a, b, c in signal(1050)))
    for cfg in (NpySource(type="npy", name="r", path=str(tmp_path / "x.npy")),
                CsvSource(type="csv", name="r", path=str(tmp_path / "x.csv"))):
        src = make_source(cfg, SourceContext(PRE, "drop", WindowQueue(16, "block")))
        src._open()
        sizes = [len(samples) for samples, _ in src._blocks(True)]
        assert sizes == [100] * 10 + [50], cfg.type


def test_a_truncated_npy_is_refused_before_any_window(tmp_path):
    np.save(tmp_path / "x.npy", signal(1000))
    data = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:len(data) // 2])
    with pytest.raises(UserInputError, match="cut.npy is truncated"):
        replayed(NpySource(type="npy", name="r", path=str(tmp_path / "cut.npy")))
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(UserInputError, match="not a readable .npy file"):
        replayed(NpySource(type="npy", name="r", path=str(tmp_path / "junk.npy")))
    np.save(tmp_path / "3d.npy", np.zeros((4, 3, 2), np.float32))
    with pytest.raises(UserInputError, match=r"holds float32 \[4, 3, 2\]"):
        replayed(NpySource(type="npy", name="r", path=str(tmp_path / "3d.npy")))
