"""The fleet demo (the end of `make demo`): publish the converted model as v1 and v2 and a deliberately
broken v3, start the fleet service on its own local broker (the system Mosquitto when installed,
else iotcore: docs/fleet.md), bring up simulated devices, roll v2 out
in waves, then roll v3 out and watch it abort and roll back by itself.

    python examples/fleet_demo.py --v1 build/demo/imu-v1 --v2 build/demo/imu-v2 \\
        --out build/demo/fleet [--devices 50] [--agents 3]

Every simulated device keeps its own MQTT connection, runs its own python-tuf client against the
pinned root (``--verify full``), downloads the artifact through the repository server and runs its
golden vectors with ONNX Runtime before committing (``--self-test golden``) — which is what catches
v3: its weights were changed after conversion, so it no longer reproduces its golden outputs.
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


def break_artifact(good: Path, dest: Path) -> Path:
    """A copy of ``good`` whose model weights are scrambled after conversion. Its manifest hashes are
    recomputed, so it is a well-formed artifact that signs and publishes fine; only running it on a
    device (the golden self-test) shows that it is wrong."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from edgeopt.artifact import GOLDEN, MANIFEST, REPORT, file_hashes

    shutil.copytree(good, dest)
    manifest = json.loads((dest / MANIFEST).read_text())
    model_file = dest / manifest["model"]["file"]
    model = onnx.load(model_file)
    rng = np.random.default_rng(3)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.size >= 64:  # the weight tensors, not scales or shapes
            init.CopyFrom(numpy_helper.from_array(rng.permutation(w.ravel()).reshape(w.shape), init.name))
    onnx.save(model, model_file)
    manifest["files"] = file_hashes(dest, [manifest["model"]["file"], GOLDEN, REPORT])
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return dest


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
    args = ap.parse_args()

    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    repo = out / "repo"
    edgeopt("keys", "init", repo)
    edgeopt("fleet", "publish", args.v1, "--repo", repo, "--name", NAME, "--version", "1")
    edgeopt("fleet", "publish", args.v2, "--repo", repo, "--name", NAME, "--version", "2")
    broken = break_artifact(args.v2, out / "broken-v3")
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

        edgeopt("fleet", "rollout", "create", "--model", f"{NAME}@3", "--repo", repo, "--selector", "fleet=demo",
                "--waves", "10%,50%,100%", "--bake", "3s", "--failure-threshold", "20%", "--device-timeout", "60s",
                "--id", "demo-v3", "--start")
        code = edgeopt("fleet", "rollout", "status", "demo-v3", "--repo", repo, "--watch", check=False).returncode
        if code != 1:
            raise SystemExit("fleet demo: the broken v3 rollout was expected to abort")
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
