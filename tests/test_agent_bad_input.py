"""Bad input to the agent: each is counted or reported by name, and the agent keeps going."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from edgeopt.agent.statedir import StateDir

from agent_harness import AGENT, AgentProcess, base_config, results_from_jsonl
from conftest import run_cli

WINDOW, HOP = 64, 32


@pytest.fixture
def state(tmp_path, imu_model):
    StateDir(tmp_path / "state").install(imu_model["artifact"])
    return tmp_path / "state"


def replay(tmp_path, csv_text: str, run: str = "run", **sections):
    csv = tmp_path / f"{run}.csv"
    csv.write_text(csv_text)
    out = tmp_path / f"{run}.jsonl"
    cfg = base_config(tmp_path, agent={"exit_when_sources_end": True}, batching={"overflow": "block"},
                      source=[{"type": "csv", "name": "f", "path": str(csv), "replay": "fast"}],
                      sink=[{"type": "jsonl", "path": str(out)}], **sections)
    agent = AgentProcess(tmp_path, cfg, name=f"{run}.toml")
    code = agent.communicate()
    return code, agent, results_from_jsonl(out)


def rows(n: int, start: int = 0) -> list[str]:
    return [f"{np.sin(i / 5):.4f},{np.cos(i / 7):.4f},{1 + 0.1 * np.sin(i):.4f}" for i in range(start, start + n)]


def test_malformed_csv_rows_are_counted_and_skipped(tmp_path, state):
    good = rows(WINDOW + HOP)  # 2 windows
    bad = ["1.0,2.0", "x,y,z", "1,2,3,4", ""]
    lines = ["ax,ay,az"] + good[:40] + bad + good[40:]
    code, agent, results = replay(tmp_path, "\n".join(lines) + "\n")
    assert code == 0, agent.err
    t = agent.status()["telemetry"]
    assert t["dropped"]["malformed_rows"] == 3  # the blank line is not a row
    assert t["sources"]["f"]["malformed_rows"] == 3
    assert [r["id"] for r in results] == ["f:0", "f:1"]
    assert "run.csv:42: expected 3 columns, found 2" in agent.err


def test_wrong_channel_count_is_a_source_error_naming_it(tmp_path, state):
    code, agent, results = replay(tmp_path, "\n".join(["ax,ay"] + ["0.1,0.2"] * 100) + "\n")
    assert code == 1 and results == []
    src = agent.status()["state"]["sources"]["f"]
    assert src["status"] == "error" and "has channels ax, ay; the model needs ax, ay, az (missing az)" in src["error"]
    code, agent, _ = replay(tmp_path, "\n".join(["0.1,0.2,0.3,0.4"] * 100) + "\n")
    assert code == 1
    assert "sends 4 channels, the model takes 3" in agent.status()["state"]["sources"]["f"]["error"]


def test_csv_columns_are_matched_by_name(tmp_path, state, imu_model):
    """A CSV with the channels in another order and an extra column gives the same results."""
    data = np.loadtxt(imu_model["stream"], delimiter=",", skiprows=1, max_rows=WINDOW + 2 * HOP)
    straight = "\n".join(["ax,ay,az"] + [f"{a},{b},{c}" for a, b, c, _ in data]) + "\n"
    shuffled = "\n".join(["temp,az,ax,ay"] + [f"20.5,{c},{a},{b}" for a, b, c, _ in data]) + "\n"
    _, _, first = replay(tmp_path, straight, run="straight")
    _, _, second = replay(tmp_path, shuffled, run="shuffled")
    assert len(first) == 3 and [r["outputs"] for r in first] == [r["outputs"] for r in second]


def test_nan_samples_drop_their_windows_and_are_counted(tmp_path, state):
    data = rows(WINDOW + 3 * HOP)  # 4 windows: starts 0, 32, 64, 96
    data[70] = "nan,0.1,1.0"  # inside windows 1 (32..95) and 2 (64..127)
    code, agent, results = replay(tmp_path, "\n".join(["ax,ay,az"] + data) + "\n")
    assert code == 0
    assert [r["id"] for r in results] == ["f:0", "f:3"]  # the gap is counted, not silent
    assert agent.status()["telemetry"]["dropped"]["nan_windows"] == 2
    code, agent, results = replay(tmp_path, "\n".join(["ax,ay,az"] + data) + "\n", run="zero",
                                  preprocessing={"nan_policy": "zero"})
    assert [r["id"] for r in results] == [f"f:{i}" for i in range(4)]
    assert all(np.isfinite(r["outputs"]["activity"]).all() for r in results)


def test_config_typo_is_one_line_naming_the_key(tmp_path):
    (tmp_path / "agent.toml").write_text('[batching]\nmax_bach = 4\n[[source]]\ntype = "stdin"\n')
    proc = subprocess.run([AGENT, "--config", str(tmp_path / "agent.toml")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"edgeopt-agent: error: {tmp_path / 'agent.toml'}: [batching]: unknown key 'max_bach' (did you mean 'max_batch'?)"]
    (tmp_path / "agent.toml").write_text('[[source]]\ntype = "csv"\n')
    proc = subprocess.run([AGENT, "--config", str(tmp_path / "agent.toml")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "[[source]] #1 (csv): 'path' is required" in proc.stderr
    (tmp_path / "agent.toml").write_text("[agent\n")
    proc = subprocess.run([AGENT, "--config", str(tmp_path / "agent.toml")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "not valid TOML" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_model_waits_then_runs_the_installed_one(tmp_path, imu_model):
    sensor_rows = tmp_path / "in.csv"
    sensor_rows.write_text("\n".join(["ax,ay,az"] + rows(WINDOW)) + "\n")
    cfg = base_config(tmp_path, model={"poll_interval_s": 0.2},
                      source=[{"type": "csv", "name": "f", "path": str(sensor_rows), "replay": "fast"}],
                      sink=[{"type": "jsonl", "path": str(tmp_path / "out.jsonl")}])
    agent = AgentProcess(tmp_path, cfg)
    st = agent.wait_status(lambda s: s["state"]["status"] == "no model", what="no model")
    assert "no active slot" in st["state"]["error"] and st["state"]["model"] is None
    res = run_cli("agent", "install-model", imu_model["artifact"], "--config", agent.config_path)
    assert res.code == 0, res.err
    st = agent.wait_status(lambda s: s["telemetry"]["windows_out"] == 1, what="the installed model running")
    assert st["state"]["status"] == "running" and st["state"]["model"]["slot"] == "a"
    newer = fake_artifact(tmp_path, imu_model, "onnx", "onnxruntime", version="4")
    assert run_cli("agent", "install-model", newer, "--state-dir", tmp_path / "state").code == 0
    st = agent.wait_status(lambda s: (s["state"]["model"] or {}).get("version") == "4", what="switch to version 4")
    assert st["state"]["model"]["slot"] == "b" and st["state"]["status"] == "running"
    assert agent.stop() == 0
    assert (tmp_path / "state" / "active").read_text().strip() == "b"


def fake_artifact(tmp_path, imu_model, fmt: str, runtime: str, version: str = "3"):
    """The imu artifact relabelled (hashes still match: only the manifest changes)."""
    import shutil

    art = tmp_path / f"art-{fmt}-{version}"
    shutil.copytree(imu_model["artifact"], art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["model"].update(format=fmt, runtime=runtime)
    manifest["version"] = version
    (art / "manifest.json").write_text(json.dumps(manifest))
    return art


@pytest.mark.parametrize("how", ["unregistered", "package-missing", "tampered"])
def test_a_model_that_cannot_run_is_a_clear_error_in_the_state(tmp_path, imu_model, how):
    env = {}
    if how == "unregistered":
        # a format no registered runtime offers (tvm has a runtime now that the TVM target exists)
        art = fake_artifact(tmp_path, imu_model, "vendor-npu", "vendor-npu-runtime")
        expected = "runtime 'vendor-npu-runtime' (format vendor-npu) is not installed"
    elif how == "package-missing":  # onnxruntime made unimportable for the agent process only
        art = imu_model["artifact"]
        shadow = tmp_path / "shadow" / "onnxruntime"
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'onnxruntime'\", "
                                            "name='onnxruntime')\n")
        env["PYTHONPATH"] = str(tmp_path / "shadow")
        expected = "needs the Python package 'onnxruntime', which is not installed"
    else:
        art = tmp_path / "tampered"
        import shutil

        shutil.copytree(imu_model["artifact"], art)
        StateDir(tmp_path / "state").install(art)
        model = tmp_path / "state" / "slots" / "a" / "model.onnx"
        model.write_bytes(model.read_bytes()[:-1] + b"\0")
        expected = "model.onnx does not match its sha256"
    if how != "tampered":
        StateDir(tmp_path / "state").stage(art, "a")
        StateDir(tmp_path / "state").activate("a")
    cfg = base_config(tmp_path, source=[{"type": "stdin"}], sink=[{"type": "stdout"}])
    agent = AgentProcess(tmp_path, cfg, env=env)
    st = agent.wait_status(lambda s: s["state"]["status"] == "error", what="error state")
    assert expected in st["state"]["error"] and "slot a" in st["state"]["error"]
    # only a slot that cannot be read or fails its hashes is a slot error; a missing runtime is not
    assert set(st["state"]["slot_errors"] or ()) == ({"a"} if how == "tampered" else set())
    assert agent.proc.poll() is None  # still up, waiting for a model that runs
    assert agent.stop() == 0


def test_install_model_refuses_a_failed_conversion_unless_allowed(tmp_path, imu_model):
    import shutil

    from edgeopt.artifact import GOLDEN, REPORT, file_hashes

    art = tmp_path / "failed"
    shutil.copytree(imu_model["artifact"], art)
    report = json.loads((art / REPORT).read_text())
    report.update(status="failed", failures=["accuracy drop 4.20 (top1) exceeds --max-accuracy-drop 1.0"])
    (art / REPORT).write_text(json.dumps(report))
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"] = file_hashes(art, [manifest["model"]["file"], GOLDEN, REPORT])
    (art / "manifest.json").write_text(json.dumps(manifest))

    res = run_cli("agent", "install-model", art, "--state-dir", tmp_path / "state")
    assert res.code == 2 and len(res.err.strip().splitlines()) == 1, res.err
    assert "report.json" in res.err and "accuracy drop 4.20" in res.err and "--allow-failed" in res.err
    assert not (tmp_path / "state" / "active").exists() and not list((tmp_path / "state").rglob("manifest.json"))
    res = run_cli("agent", "install-model", art, "--state-dir", tmp_path / "state", "--allow-failed")
    assert res.code == 0, res.err
    assert (tmp_path / "state" / "active").read_text().strip() == "a"
