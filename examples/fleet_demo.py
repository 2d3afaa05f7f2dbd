"""The fleet demo (the end of `make demo`): publish the converted model as v1 and v2 and a deliberately
broken v3, start the fleet service on its own local broker (the system Mosquitto when installed,
else iotcore: docs/fleet.md), bring up simulated devices, roll v2 out
in waves, then roll v3 out and watch it abort and roll back by itself.

    python examples/fleet_demo.py --v1 build/demo/imu-v1 --v2 build/demo/imu-v2 \\
        --out build/demo/fleet [--devices 50] [--agents 3] [--source build/demo/imu]

v3 is a consistent artifact that computes the wrong thing: converted properly as imu@3 (from
``--source``, the examples/imu.py output v1 was converted from), then its weights are perturbed
and the manifest's hashes re-sealed — it publishes and signs fine, its report says it passed.
Every simulated device keeps its own MQTT connection, runs its own python-tuf client against the
pinned root (``--verify full``), downloads the artifact through the repository server and runs its
golden vectors with ONNX Runtime before committing (``--self-test golden``); the real agents do the
same in their SELF_TEST step. That is what catches v3: it no longer reproduces its golden outputs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

EDGEOPT = str(Path(sys.executable).parent / "edgeopt")
NAME = "imu"


def edgeopt(*args, check: bool = True) -> subprocess.CompletedProcess:
    print(f"$ edgeopt {' '.join(map(str, args))}", flush=True)
    return subprocess.run([EDGEOPT, *map(str, args)], check=check)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reseal(artifact: Path) -> Path:
    """Recompute the sha256 of every file the manifest lists (and the model's in the report), as
    if the changed model had come out of the converter that way."""
    from edgeopt.artifact import MANIFEST, REPORT, file_hashes
    from edgeopt.fsutil import sha256_file

    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["files"] = file_hashes(artifact, sorted(manifest["files"]))
    (artifact / MANIFEST).write_text(json.dumps(manifest, indent=2))
    report = json.loads((artifact / REPORT).read_text())
    report["artifact"]["sha256"] = sha256_file(artifact / manifest["model"]["file"])
    (artifact / REPORT).write_text(json.dumps(report, indent=2))
    manifest["files"][REPORT] = sha256_file(artifact / REPORT)
    (artifact / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return artifact


def perturb_weights(artifact: Path, seed: int = 3) -> Path:
    """Shuffle the values of every weight tensor of the artifact's ONNX model (scales and shapes
    stay): a model that loads and runs, but no longer gives its golden outputs."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model_file = artifact / json.loads((artifact / "manifest.json").read_text())["model"]["file"]
    model = onnx.load(model_file)
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.size >= 64:  # the weight tensors, not scales or shapes
            init.CopyFrom(numpy_helper.from_array(rng.permutation(w.ravel()).reshape(w.shape), init.name))
    onnx.save(model, model_file)
    return reseal(artifact)


def build_broken_v3(source: Path, dest: Path) -> Path:
    """imu@3: a proper conversion of the examples/imu.py model in ``source``, whose weights are then
    perturbed (see perturb_weights): name, version, hashes and report all consistent."""
    edgeopt("convert", source / "imu_cnn.onnx", "-o", dest, "--force", "-q", "--target", "onnx", "--name", NAME,
            "--version", "3", "--preprocessing", source / "preprocessing.json", "--validation",
            source / "validation.npz")
    return perturb_weights(dest)


def imu_source(v1: Path) -> Path:
    """The examples/imu.py output v1 was converted from (its report names the source model)."""
    report = json.loads((v1 / "report.json").read_text())
    return Path(report["source"]["path"]).parent


AGENT = str(Path(sys.executable).parent / "edgeopt-agent")


def start_real_agents(count: int, broker: str, repo: Path, out: Path, v1: Path) -> list[subprocess.Popen]:
    """Real ``edgeopt-agent`` processes next to the simulated devices: each has its own state
    directory with v1 installed, pins the repository's root, infers on a synthetic IMU stream (its
    results go to a JSON Lines file) and takes every update through download, TUF verification,
    self-test, probation and commit or rollback."""
    host, port = broker.removeprefix("mqtt://").split(":")
    procs = []
    for i in range(1, count + 1):
        device = f"agent-{i}"
        home = out / "agents" / device
        home.mkdir(parents=True)
        subprocess.run([EDGEOPT, "agent", "install-model", str(v1), "--state-dir", str(home / "state")],
                       check=True, capture_output=True)
        (home / "agent.toml").write_text(f"""[agent]
device_id = "{device}"
state_dir = "{home / 'state'}"
labels = ["fleet=demo", "kind=real-agent"]
log_level = "warning"

[mqtt]
host = "{host}"
port = {port}
reconnect_max_s = 2.0

[update]
root = "{repo / 'metadata' / '1.root.json'}"
probation_windows = 30
probation_s = 1.0
baseline_s = 0.5

[telemetry]
interval_s = 2.0

[[source]]
type = "synthetic"
rate_hz = 800.0
seed = {i}

[[sink]]
type = "jsonl"
path = "{home / 'results.jsonl'}"
""")
        with open(home / "agent.log", "w") as log:  # the child keeps its own copy of the descriptor
            procs.append(subprocess.Popen([AGENT, "--config", str(home / "agent.toml")], stderr=log))
    if count:
        print(f"started {count} real agent(s) (edgeopt-agent, logs in {out / 'agents'})", flush=True)
    return procs


def wait_for_devices(repo: Path, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = subprocess.run([EDGEOPT, "fleet", "devices", "--repo", repo, "--selector", "fleet=demo", "--json"],
                             capture_output=True, text=True)
        if res.returncode == 0 and sum(d["online"] for d in json.loads(res.stdout)) >= count:
            return
        time.sleep(0.5)
    raise SystemExit(f"fleet demo: the devices did not register within {timeout:.0f} s")


def device_ids(repo: Path) -> list[str]:
    res = subprocess.run([EDGEOPT, "fleet", "devices", "--repo", repo, "--selector", "fleet=demo", "--json"],
                         capture_output=True, text=True, check=True)
    return [d["device_id"] for d in json.loads(res.stdout)]


def rollout_id_with_an_agent_first(base: str, devices: list[str], waves: str) -> str:
    """Waves are a reproducible shuffle keyed by the rollout id (fleet/rollout_spec.py): take the first
    id (base, base-2, ...) whose first wave holds a real agent, so the demo can show what a real
    device says about the broken version before the rollout aborts."""
    from edgeopt.fleet.rollout_spec import parse_waves, plan_waves

    for n in range(1, 200):
        rollout_id = base if n == 1 else f"{base}-{n}"
        if any(d.startswith("agent-") for d in plan_waves(rollout_id, parse_waves(waves), devices)[0]):
            return rollout_id
    return base


def agent_refusals(out: Path, version: str, timeout: float = 60.0) -> dict[str, str]:
    """device → "refused at STATE: reason" for each real agent that was told ``version``, once its
    update has ended (the rollout may abort while a real agent is still testing the candidate)."""
    deadline = time.monotonic() + timeout
    told: dict[str, str] = {}
    while time.monotonic() < deadline:
        told, pending = {}, False
        for home in sorted((out / "agents").iterdir()):
            try:
                record = json.loads((home / "state" / "update.json").read_text())
            except (OSError, ValueError):
                continue
            if (record.get("target") or {}).get("version") != version:
                continue
            if record["state"] != "IDLE":
                pending = True
            elif record.get("outcome") == "ROLLED_BACK":
                told[home.name] = f"refused at {record.get('failed_in')}: {record.get('reason')}"
            else:
                told[home.name] = str(record.get("outcome"))
        if not pending:
            return told
        time.sleep(0.5)
    return told


def models_summary(repo: Path) -> str:
    res = subprocess.run([EDGEOPT, "fleet", "devices", "--repo", repo, "--selector", "fleet=demo", "--json"],
                         capture_output=True, text=True, check=True)
    counts: dict[str, int] = {}
    for d in json.loads(res.stdout):
        model = f"{d['model']['name']}@{d['model']['version']}" if d["model"] else "-"
        counts[model] = counts.get(model, 0) + 1
    return ", ".join(f"{n} on {m}" for m, n in sorted(counts.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--v1", type=Path, required=True, help="artifact published as version 1")
    ap.add_argument("--v2", type=Path, required=True, help="artifact published as version 2")
    ap.add_argument("--out", type=Path, default=Path("build/demo/fleet"))
    ap.add_argument("--devices", type=int, default=50, help="simulated devices")
    ap.add_argument("--agents", type=int, default=3, help="real edgeopt-agent processes")
    ap.add_argument("--source", type=Path, help="examples/imu.py output to convert v3 from (default: the "
                                                  "directory of the source model named in v1's report)")
    args = ap.parse_args()
    source = args.source or imu_source(args.v1)
    if not (source / "imu_cnn.onnx").is_file():
        raise SystemExit(f"fleet demo: no imu_cnn.onnx in {source}; pass --source (the examples/imu.py output)")

    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    repo = out / "repo"
    edgeopt("keys", "init", repo)
    edgeopt("fleet", "publish", args.v1, "--repo", repo, "--name", NAME, "--version", "1")
    edgeopt("fleet", "publish", args.v2, "--repo", repo, "--name", NAME, "--version", "2")
    broken = build_broken_v3(source, out / "broken-v3")
    print("(v3: converted as imu@3, then its weights perturbed and its hashes re-sealed)", flush=True)
    edgeopt("fleet", "publish", broken, "--repo", repo, "--name", NAME, "--version", "3")

    port = free_port()
    broker = f"mqtt://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    try:
        print(f"$ edgeopt fleet serve --repo {repo} --listen 127.0.0.1:{port}   (it starts a local broker)",
              flush=True)
        procs.append(subprocess.Popen([EDGEOPT, "fleet", "serve", "--repo", repo, "--listen", f"127.0.0.1:{port}",
                                       "--tick", "0.5", "--log-level", "warning"]))
        time.sleep(2.0)
        print(f"$ edgeopt fleet simulate --broker {broker} --devices {args.devices} --initial-model {NAME}@1 ...",
              flush=True)
        procs.append(subprocess.Popen(
            [EDGEOPT, "fleet", "simulate", "--broker", broker, "--devices", str(args.devices), "--initial-model",
             f"{NAME}@1", "--repo", repo, "--labels", "fleet=demo", "--verify", "full", "--self-test", "golden",
             "--step-delay", "0.1", "--probation", "1", "--workers", "8", "--telemetry-interval", "5"],
            stderr=subprocess.DEVNULL))
        procs += start_real_agents(args.agents, broker, repo, out, args.v1)
        total = args.devices + args.agents
        wait_for_devices(repo, total)
        print(f"\n{total} devices online: {models_summary(repo)}\n", flush=True)

        edgeopt("fleet", "rollout", "create", "--model", f"{NAME}@2", "--repo", repo, "--selector", "fleet=demo",
                "--waves", "10%,50%,100%", "--bake", "3s", "--device-timeout", "60s", "--id", "demo-v2", "--start")
        if edgeopt("fleet", "rollout", "status", "demo-v2", "--repo", repo, "--watch", check=False).returncode != 0:
            raise SystemExit("fleet demo: the v2 rollout did not complete")
        print(f"\nafter v2: {models_summary(repo)}\n", flush=True)

        waves = "10%,50%,100%"
        v3_id = rollout_id_with_an_agent_first("demo-v3", device_ids(repo), waves) if args.agents else "demo-v3"
        edgeopt("fleet", "rollout", "create", "--model", f"{NAME}@3", "--repo", repo, "--selector", "fleet=demo",
                "--waves", waves, "--bake", "3s", "--failure-threshold", "20%", "--device-timeout", "60s",
                "--id", v3_id, "--start")
        code = edgeopt("fleet", "rollout", "status", v3_id, "--repo", repo, "--watch", check=False).returncode
        if code != 1:
            raise SystemExit("fleet demo: the broken v3 rollout was expected to abort")
        if args.agents:
            refusals = agent_refusals(out, "3")
            print("\nwhat the real agents told v3 say:", flush=True)
            for device, what in refusals.items():
                print(f"  {device}: {NAME}@3 {what}", flush=True)
            if not any("refused at SELF_TEST" in what for what in refusals.values()):
                raise SystemExit("fleet demo: no real agent refused v3 at its self-test")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and models_summary(repo) != f"{total} on {NAME}@2":
            time.sleep(0.5)
        print(f"\nv3 aborted and rolled back by itself: {models_summary(repo)}", flush=True)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
