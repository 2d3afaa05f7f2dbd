"""Signed updates end to end on a real agent over loopback Mosquitto: time from `desired` to
COMMITTED for ~1 MB and ~10 MB artifacts (with the time spent in each state), rollback times,
windows lost across the switch, and bytes over the wire against the artifact size; then a head-only
retrain of the running version, then a fine-tune of the whole network, as delta updates (wire bytes
against the full artifact, the time to pack, fetch and apply it on the agent, and the apply alone on
this host).

    python benchmarks/update.py --out DIR   # two tables; update.json in DIR

The agent infers on a live synthetic IMU stream throughout (1,600 samples/s → 50 windows/s). Probation
and the pre-switch baseline are configured short (1 s and 0.5 s); those waits are policy, not cost,
and are shown separately from the transfer and checks.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common import ROOT, cli, print_table, write_json

sys.path.insert(0, str(ROOT / "tests"))


def sensor_mlp(path: Path, hidden: int, seed: int) -> Path:
    """A [N, 3, 64] → 4-class MLP whose weights set the artifact size (random init: timing only)."""
    import torch

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, 4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 64),), str(path), dynamo=False, input_names=["imu"],
                          output_names=["activity"], dynamic_axes={"imu": {0: "batch"}, "activity": {0: "batch"}})
    return path


def history_seconds(record: dict) -> dict[str, float]:
    """Seconds spent in each state of the last update, from the persisted record's history."""
    hist = record["history"]
    start = max(i for i, h in enumerate(hist) if h["from"] == "IDLE")
    out: dict[str, float] = {}
    for a, b in zip(hist[start:], hist[start + 1:], strict=False):
        out[a["to"]] = out.get(a["to"], 0.0) + b["at"] - a["at"]
    return out


def head_retrained(src: Path, dest: Path) -> Path:
    """``src`` with its last layer's weights moved a little: a head-only retrain (what a delta is for)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(src)
    head = [i for i in model.graph.initializer if numpy_helper.to_array(i).ndim == 2][-1]
    weights = numpy_helper.to_array(head).copy()
    weights += np.random.default_rng(4).normal(0, 0.01, weights.shape).astype(weights.dtype)
    head.CopyFrom(numpy_helper.from_array(weights, head.name))
    onnx.save(model, dest)
    return dest


def fine_tuned(src: Path, dest: Path) -> Path:
    """``src`` with every float weight moved by about 0.1 % of itself: a fine-tune of the whole network
    (no byte run left in common with the base; the tensor XOR delta's case)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(src)
    rng = np.random.default_rng(5)
    for init in model.graph.initializer:
        weights = numpy_helper.to_array(init)
        if weights.dtype == np.float32:
            init.CopyFrom(numpy_helper.from_array((weights * (1 + rng.normal(0, 1e-3, weights.shape)))
                                                  .astype(np.float32), init.name))
    onnx.save(model, dest)
    return dest


def run_update(rig, agent, version: str, state_dir: Path) -> tuple[float, dict]:
    from update_harness import update_of, wait_outcome

    t0 = time.monotonic()
    rig.set_desired("dev1", version)
    status = wait_outcome(agent, version, timeout=300)
    elapsed = time.monotonic() - t0
    record = json.loads((state_dir / "update.json").read_text())
    return elapsed, {"outcome": update_of(status)["state"], "reason": update_of(status)["reason"],
                     "states_s": history_seconds(record)}


def host_apply_seconds(rig, base_version: str, full: dict, patch: dict) -> float:
    """Seconds to rebuild the artifact from its base and the delta, on this host (median of 5)."""
    import statistics

    from edgeopt.delta import apply_delta

    base = next(m for m in rig.repo.list_models() if m["version"] == base_version)
    base_bytes = rig.stored(base).read_bytes()
    patch_bytes = (rig.repo.targets_dir / f"{patch['sha256']}.{patch['target']}").read_bytes()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        apply_delta(base_bytes, patch_bytes, full["length"], patch["codec"])
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def delta_update(rig, agent, label: str, case: str, version: str, base: str, state_dir: Path) -> tuple[list, dict]:
    """Update the agent (running ``base``) to ``version``, which a signed delta from ``base`` makes:
    a table row and the JSON record."""
    before = rig.server.snapshot_stats()
    seconds, info = run_update(rig, agent, version, state_dir)
    after = rig.server.snapshot_stats()
    wire = sum(after.get(k, 0) - before.get(k, 0) for k in ("payload_bytes", "request_bytes"))
    full = next(m for m in rig.repo.list_models() if m["version"] == version)
    deltas = rig.repo.list_deltas()
    patch = next((d for d in deltas if d["version"] == version and d["base_version"] == base), None)
    if patch is None:
        raise SystemExit(f"{label}: no delta to v{version} from v{base} was published: {deltas}")
    apply_s = host_apply_seconds(rig, base, full, patch)
    from edgeopt.delta import make_delta

    base_entry = next(m for m in rig.repo.list_models() if m["version"] == base)
    binary = len(make_delta(rig.stored(base_entry).read_bytes(), rig.stored(full).read_bytes()))
    last = agent.status()["telemetry"]["update_downloads"]["last"]
    s = info["states_s"]
    row = [label, case, patch["codec"], full["length"], patch["length"], binary, round(wire / full["length"], 4),
           last["delta"], round(seconds - s.get("PROBATION", 0.0), 2), round(s.get("DOWNLOADING", 0), 3),
           round(apply_s * 1000, 2)]
    return row, {"case": case, "codec": patch["codec"], "artifact_bytes": full["length"],
                 "delta_bytes": patch["length"], "binary_delta_bytes": binary, "wire_bytes": wire, "wire_ratio": wire / full["length"],
                 "took_delta": last["delta"], "desired_to_committed_s": seconds, "states_s": s,
                 "host_apply_s": apply_s, "outcome": info["outcome"]}


def main() -> None:
    cli(__doc__)
    import imu
    from update_harness import Rig, convert, nan_on_golden, seq_gaps

    rows, results, delta_rows = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = imu.make(tmp / "imu", epochs=1, minutes=2)
        for label, hidden in (("1 MB", 1300), ("10 MB", 13000)):
            work = tmp / label.replace(" ", "")
            work.mkdir()
            arts = {v: convert(data, work / f"v{v}", v, sensor_mlp(work / f"m{v}.onnx", hidden, int(v)))
                    for v in ("1", "2")}
            arts["3"] = nan_on_golden(arts["2"], work / "v3", "3")
            arts["4"] = convert(data, work / "v4", "4", head_retrained(work / "m2.onnx", work / "m4.onnx"))
            arts["5"] = convert(data, work / "v5", "5", fine_tuned(work / "m4.onnx", work / "m5.onnx"))
            rig = Rig(work)
            try:
                for v, art in arts.items():
                    rig.publish(art, v)
                jsonl = work / "results.jsonl"
                cfg = rig.agent_config(work / "state", jsonl, probation_min_confidence_ratio=0.0,
                                       probation_windows=40, probation_s=1.0, baseline_s=0.5)
                agent = rig.start_agent(cfg)
                run_update(rig, agent, "1", work / "state")
                length = next(m["length"] for m in rig.repo.list_models() if m["version"] == "2")
                before = rig.server.snapshot_stats()
                seconds, info = run_update(rig, agent, "2", work / "state")
                after = rig.server.snapshot_stats()
                wire = after.get("payload_bytes", 0) - before.get("payload_bytes", 0)
                wire += after.get("request_bytes", 0) - before.get("request_bytes", 0)
                rb_seconds, rb = run_update(rig, agent, "3", work / "state")
                # back on v2: v4, its head retrained, comes as a delta from it; then v5, v4 fine-tuned whole
                delta_result = []
                for case, version, base in (("head-only retrain", "4", "2"), ("whole-network fine-tune", "5", "4")):
                    row, record = delta_update(rig, agent, label, case, version, base, work / "state")
                    delta_rows.append(row)
                    delta_result.append(record)
                time.sleep(1.0)
                agent.stop()
                missing, versions = seq_gaps(jsonl)
                s = info["states_s"]
                policy = s.get("PROBATION", 0.0)
                rows.append([label, length, round(seconds, 2), round(seconds - policy, 2),
                             round(s.get("DOWNLOADING", 0), 2), round(s.get("SELF_TEST", 0), 2),
                             round(policy, 2), round(rb_seconds, 2), len(missing), round(wire / length, 4)])
                results.append({"artifact": label, "artifact_bytes": length, "desired_to_committed_s": seconds,
                                "states_s": s, "outcome": info["outcome"], "rollback_desired_to_rolled_back_s":
                                rb_seconds, "rollback": rb, "windows_lost": len(missing),
                                "windows_seen": len(versions), "wire_bytes": wire, "wire_ratio": wire / length,
                                "delta_updates": delta_result})
            finally:
                rig.close()
    print_table("signed update over loopback MQTT (64 KiB chunks), agent inferring throughout",
                ["artifact", "bytes", "desired→COMMITTED s", "without probation s", "download s", "self-test s",
                 "probation s", "self-test rollback s", "windows lost", "wire / artifact"], rows)
    print_table("delta updates: v4 (v2's head retrained) from v2, then v5 (v4 fine-tuned whole) from v4",
                ["artifact", "change", "codec", "full bytes", "delta bytes", "binary kind bytes", "wire / full",
                 "delta taken",
                 "desired→COMMITTED s without probation", "download s (pack + fetch + apply)", "apply ms (host)"],
                delta_rows)
    write_json("update", {"results": results})


if __name__ == "__main__":
    main()
