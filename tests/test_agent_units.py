"""Unit tests of the agent's logic: windowing, batching, the outbox, backoff, sd_notify, config."""

from __future__ import annotations

import random
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgeopt.agent.batcher import QueueClosed, WindowQueue
from edgeopt.agent.config import default_config_text, parse_config, reference_markdown
from edgeopt.agent.outbox import Outbox
from edgeopt.agent.systemd import Notifier
from edgeopt.agent.transport import backoff_delay
from edgeopt.agent.windowing import Preprocessing, WindowBlock, Windower, channel_map
from edgeopt.errors import UserInputError

ROOT = Path(__file__).resolve().parent.parent


def pre(window=4, hop=2, channels_first=True, channels=2, names=None, mean=None, std=None):
    return Preprocessing(window, hop, channels_first, channels, names,
                         None if mean is None else np.asarray(mean, np.float32),
                         None if std is None else np.asarray(std, np.float32), None)


def stream(n, channels=2):
    return np.arange(n * channels, dtype=np.float32).reshape(n, channels), np.arange(n, dtype=np.float64)


def windows(*blocks):
    """(seq, t_start, t_end, data) of every window of ``blocks``, in order."""
    return [(int(b.seq[i]), float(b.t_start[i]), float(b.t_end[i]), b.data[i]) for b in blocks for i in range(len(b))]


# -- windowing ----------------------------------------------------------------------------------------
def test_windows_cut_with_hop_across_pushes_and_layouts():
    samples, ts = stream(10)
    w = Windower("s", pre(window=4, hop=2))
    out = windows(w.push(samples[:3], ts[:3]), w.push(samples[3:7], ts[3:7]), w.push(samples[7:], ts[7:]))
    assert [x[0] for x in out] == [0, 1, 2, 3] and [x[1] for x in out] == [0, 2, 4, 6]
    assert out[1][2] == 5
    np.testing.assert_array_equal(out[1][3], samples[2:6].T)  # channels first: [C, T]
    last = Windower("s", pre(channels_first=False)).push(samples, ts)
    np.testing.assert_array_equal(last.data[1], samples[2:6])  # channels last: [T, C]
    assert last.data.flags.c_contiguous and last.data.shape == (4, 4, 2)


def test_hop_larger_than_window_skips_samples_between_pushes():
    samples, ts = stream(20)
    w = Windower("s", pre(window=3, hop=5))
    out = []
    for i in range(0, 20, 4):
        out += windows(w.push(samples[i:i + 4], ts[i:i + 4]))
    assert [x[1] for x in out] == [0, 5, 10, 15]


def test_normalization_and_channel_order_by_name():
    p = pre(window=2, hop=2, names=("ax", "ay"), mean=[1.0, 2.0], std=[2.0, 4.0])
    index = channel_map("s", ["ay", "temp", "ax"], None, p)
    assert index == [2, 0]
    w = Windower("s", p, index=index)
    block = w.push(np.array([[10.0, 99, 3.0], [6.0, 99, 5.0]], np.float32), np.arange(2.0))
    assert len(block) == 1
    np.testing.assert_allclose(block.data[0], [[1.0, 2.0], [2.0, 1.0]])  # (x - mean) / std, [C, T]


def test_channel_mismatch_is_named():
    p = pre(names=("ax", "ay"))
    with pytest.raises(UserInputError, match="missing ay"):
        channel_map("imu", ["ax", "az"], None, p)
    with pytest.raises(UserInputError, match="sends 3 channels, the model takes 2"):
        channel_map("imu", None, 3, pre())


@pytest.mark.parametrize("policy,expected_seqs,nan_windows", [("drop", [0, 3], 2), ("zero", [0, 1, 2, 3], 0),
                                                              ("hold", [0, 1, 2, 3], 0)])
def test_nan_policies(policy, expected_seqs, nan_windows):
    samples, ts = stream(10)
    samples[4, 1] = np.nan  # in windows 1 (2..5) and 2 (4..7)
    w = Windower("s", pre(), nan_policy=policy)
    out = w.push(samples, ts)
    assert out.seq.tolist() == expected_seqs and w.nan_windows == nan_windows
    assert np.isfinite(out.data).all()
    if policy == "hold":
        assert out.data[1, 1, 2] == samples[3, 1]


# -- batching -----------------------------------------------------------------------------------------
def win(seq, source="s", n=1):
    """A block of ``n`` windows numbered from ``seq``."""
    return WindowBlock(source, np.arange(seq, seq + n), np.zeros(n), np.zeros(n), np.zeros((n, 1), np.float32))


def seqs(batch):
    return [int(s) for b in batch.blocks for s in b.seq]


def test_drop_oldest_counts_every_dropped_window():
    q = WindowQueue(3, "drop-oldest")
    for i in range(5):
        q.put(win(i))
    assert q.dropped == 2 and q.dropped_by_source["s"] == 2
    assert seqs(q.get_batch(10, 0.0)) == [2, 3, 4]


def test_block_waits_for_room_and_keeps_order():
    q = WindowQueue(2, "block")
    done = threading.Event()

    def producer():
        for i in range(6):
            q.put(win(i))
        done.set()

    threading.Thread(target=producer, daemon=True).start()
    got = []
    while len(got) < 6:
        got += seqs(q.get_batch(2, 0.0, idle_timeout_s=1.0))
    assert got == list(range(6)) and q.dropped == 0 and done.wait(1)


def test_batch_fills_up_to_max_or_returns_after_max_wait():
    q = WindowQueue(100)
    for i in range(5):
        q.put(win(i))
    assert seqs(q.get_batch(3, 10.0)) == [0, 1, 2]  # full at once: no waiting
    t0 = time.monotonic()
    assert len(q.get_batch(8, 0.05)) == 2
    assert time.monotonic() - t0 >= 0.05  # waited for more, then gave what it had


def test_close_returns_the_partial_batch_at_once_and_refuses_puts():
    q = WindowQueue(100)
    q.put(win(0))
    threading.Timer(0.1, q.close).start()
    assert seqs(q.get_batch(32, 600.0)) == [0]
    with pytest.raises(QueueClosed):
        q.put(win(1))


# -- outbox -------------------------------------------------------------------------------------------
def test_outbox_sends_in_order_and_resends_unacknowledged_after_a_restart(tmp_path):
    box = Outbox(tmp_path, max_bytes=1 << 20, segment_bytes=4096, fsync_interval_s=0)
    for i in range(50):
        box.append("t", f"m{i}".encode())
    first = box.next_unsent(10)
    assert [e.seq for e in first] == list(range(10)) and first[3].payload == b"m3"
    for e in first[:6]:
        box.ack(e.seq)
    assert box.pending == 44 and box.inflight == 4
    box.close()
    again = Outbox(tmp_path, max_bytes=1 << 20, segment_bytes=4096)
    resent = again.next_unsent(100)
    assert [e.seq for e in resent] == list(range(6, 50))  # the 4 in flight are sent again, then the rest
    again.append("t", b"new")
    assert [e.payload for e in again.next_unsent(5)] == [b"new"]


def test_outbox_cap_drops_the_oldest_unsent_and_counts_them(tmp_path):
    box = Outbox(tmp_path, max_bytes=8192, segment_bytes=1024, fsync_interval_s=10)
    for i in range(1000):
        box.append("t", b"%04d" % i + b"x" * 40)
    sent = box.next_unsent(2000)
    assert box.size_bytes <= 8192
    assert box.dropped + len(sent) == 1000  # every entry is either sent or counted as dropped
    seqs = [e.seq for e in sent]
    assert seqs == list(range(1000 - len(sent), 1000))  # the newest survive, in order


def test_outbox_truncates_a_torn_record(tmp_path):
    box = Outbox(tmp_path, fsync_interval_s=0)
    for i in range(3):
        box.append("t", b"payload-%d" % i)
    box.close()
    seg = next(tmp_path.glob("seg-*.log"))
    seg.write_bytes(seg.read_bytes()[:-4])  # power loss in the middle of the last record
    again = Outbox(tmp_path)
    assert [e.payload for e in again.next_unsent(10)] == [b"payload-0", b"payload-1"]


# -- reconnect backoff ----------------------------------------------------------------------------------
def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    rng = random.Random(1)
    for attempt, full in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (10, 30.0), (50, 30.0)):
        delays = [backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(200)]
        assert full / 2 <= min(delays) and max(delays) <= full
        assert max(delays) - min(delays) > full / 4  # jittered, not lock-step
    assert len({round(backoff_delay(3, 0.5, 30, random.Random(s)), 6) for s in range(20)}) == 20


# -- sd_notify ----------------------------------------------------------------------------------------
def test_notifier_sends_datagrams_and_paces_the_watchdog(tmp_path):
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(1)
    n = Notifier(environ={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"})
    assert n.watchdog_interval_s == 1.0
    n.ready("running")
    assert sock.recv(100).decode().startswith("READY=1\nSTATUS=running\nMAINPID=")
    n.watchdog(now=100.0)
    n.watchdog(now=100.5)  # too early: no second ping
    n.watchdog(now=101.1)
    sock.settimeout(0.2)
    assert [sock.recv(100), sock.recv(100)] == [b"WATCHDOG=1", b"WATCHDOG=1"]
    with pytest.raises(TimeoutError):
        sock.recv(100)
    assert Notifier(environ={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}
                    ).watchdog_interval_s is None  # the watchdog is meant for another process
    assert not Notifier(environ={}).notify("READY=1")  # outside systemd: a no-op


# -- config -------------------------------------------------------------------------------------------
def test_config_errors_name_the_key():
    src = [{"type": "stdin"}]
    with pytest.raises(UserInputError, match=r"\[mqtt\]: 'port' must be an integer, got '1883'"):
        parse_config({"mqtt": {"port": "1883"}, "source": src})
    with pytest.raises(UserInputError, match=r"'overflow' must be one of drop-oldest, block.*did you mean 'block'"):
        parse_config({"batching": {"overflow": "blok"}, "source": src})
    with pytest.raises(UserInputError, match="needs a broker: set \\[mqtt\\] host"):
        parse_config({"source": src, "sink": [{"type": "mqtt"}]})
    with pytest.raises(UserInputError, match="no \\[\\[source\\]\\]"):
        parse_config({})
    with pytest.raises(UserInputError, match="two sources are named 'a'"):
        parse_config({"source": [{"type": "stdin", "name": "a"}, {"type": "stdin", "name": "a"}]})
    cfg = parse_config({"source": src})
    assert cfg.sinks[0].type == "stdout" and cfg.sources[0].name == "stdin-1"


def test_default_config_parses():
    import tomllib

    cfg = parse_config(tomllib.loads(default_config_text("pi", "broker.local")))
    assert cfg.mqtt.host == "broker.local" and cfg.sinks[0].type == "mqtt" and cfg.device_id == "pi"


def test_docs_embed_the_generated_key_reference():
    page = (ROOT / "docs" / "agent.md").read_text()
    begin, end = "<!-- config-reference:begin -->\n", "<!-- config-reference:end -->"
    assert begin in page and end in page
    embedded = page.split(begin, 1)[1].split(end, 1)[0]
    assert embedded == reference_markdown(), ("docs/agent.md is out of date: regenerate it with "
                                              "python -m edgeopt.agent.config > the reference section")


def test_interrupt_returns_the_partial_batch_and_keeps_the_queue_open():
    q = WindowQueue(100)
    q.put(win(0))
    threading.Timer(0.1, q.interrupt).start()
    assert seqs(q.get_batch(32, 600.0)) == [0]
    q.put(win(1))  # still open
    assert seqs(q.get_batch(32, 0.0)) == [1]


def test_the_agent_extra_pulls_in_no_heavy_toolchain():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = " ".join(project["dependencies"] + project["optional-dependencies"]["agent"]).lower()
    for heavy in ("torch", "tvm", "coremltools", "tensorflow", "ai-edge-litert"):
        assert heavy not in deps, heavy
    assert project["scripts"]["edgeopt-agent"] == "edgeopt.cli.agent:main"


def test_the_window_queue_is_bounded_in_bytes_too():
    from types import SimpleNamespace

    from edgeopt.agent.pipeline import queue_capacity

    def config(**batching):
        return parse_config({"batching": batching, "source": [{"type": "synthetic"}]})

    model = SimpleNamespace(pre=SimpleNamespace(window_shape=(3, 64)))  # 768 bytes a window
    assert queue_capacity(config(), model) == 1024
    assert queue_capacity(config(queue_bytes=76800), model) == 100
    assert queue_capacity(config(queue_bytes=1000, max_batch=8), model) == 8  # never less than one batch
    big = SimpleNamespace(pre=SimpleNamespace(window_shape=(1, 16000)))  # a second of 16 kHz audio: 64 KB
    assert queue_capacity(config(), big) == 262
