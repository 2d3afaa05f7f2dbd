"""Rollout of a 1 MB model to thousands of simulated devices on one local Mosquitto.

Per run: a fresh Mosquitto (the generated tuning, plain TCP on loopback), a repository with kws@1
and kws@2 (1 MB model each), `edgeopt fleet serve` (repository server + registry + controller,
SQLite), and `edgeopt fleet simulate` processes holding one MQTT connection per device. Devices
start on kws@1; the rollout sends kws@2 in waves 1%,10%,50%,100% (bake 2 s). Every device
downloads the artifact through the repository server in chunks and checks it against the signed
length and sha256 (TUF metadata verified once per simulator process: --verify shared).

Measured: time from `rollout create --start` to COMPLETED, publish messages and bytes through the
broker ($SYS counters), what the repository server sent as a share of devices x artifact, CPU and
peak RSS of the fleet service ("controller"), of the broker and of the simulators. Over MQTT the
server casts each chunk (fleet/repo_server.py); `--transport mqtt,mqtt-unicast` runs it side by side
with the server answering each device alone.

    python benchmarks/fleet_scale.py                      # 1,000 and 10,000 devices, 64 and 256 KiB chunks
    python benchmarks/fleet_scale.py --runs 1000:262144 --sim-processes 1
    python benchmarks/fleet_scale.py --runs 10000:65536 --db postgresql --transport mqtt,mqtt-unicast,http
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import ROOT, add_out_option, print_table, write_json

EDGEOPT = str(Path(sys.executable).parent / "edgeopt")
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the broker and the simulators
    return hard


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_artifact(root: Path, version: str, size: int) -> Path:
    """A structurally valid artifact whose model file is ``size`` random bytes (the devices move and
    verify the bytes; they do not run them in this benchmark)."""
    from edgeopt.artifact import GOLDEN, MANIFEST_SCHEMA, REPORT, file_hashes

    root.mkdir(parents=True)
    (root / "model.onnx").write_bytes(os.urandom(size))
    (root / GOLDEN).write_bytes(b"golden")
    (root / REPORT).write_text("{}")
    manifest = {"schema": MANIFEST_SCHEMA, "name": "kws", "version": version,
                "model": {"file": "model.onnx", "format": "onnx", "runtime": "onnxruntime", "quantize": "none"},
                "inputs": [], "outputs": [], "target_profile": None,
                "files": file_hashes(root, ["model.onnx", GOLDEN, REPORT])}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def wait_for_port(port: int) -> None:
    """Until something listens on 127.0.0.1:PORT (a broker just started), at most ~25 s."""
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)


def sum_counters(readings) -> dict[str, int]:
    """$SYS counters of several brokers added up (bridged brokers: what all of them moved)."""
    total: Counter[str] = Counter()
    for r in readings:
        total.update(r)
    return dict(total)


class SysCounters:
    """Mosquitto's $SYS counters (published every second with sys_interval 1)."""

    TOPICS = {"$SYS/broker/publish/messages/received": "pub_in", "$SYS/broker/publish/messages/sent": "pub_out",
              "$SYS/broker/bytes/received": "bytes_in", "$SYS/broker/bytes/sent": "bytes_out",
              "$SYS/broker/clients/connected": "clients"}

    def __init__(self, url: str):
        from edgeopt.mqtt import connect, make_client

        self.values: dict[str, int] = {}
        self.client = make_client(f"bench-sys-{os.getpid()}", url)
        self.client.on_message = self._on_message
        connect(self.client)
        self.client.subscribe([(t, 0) for t in self.TOPICS])

    def _on_message(self, client, userdata, msg) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.values[self.TOPICS[msg.topic]] = int(msg.payload)

    def read(self) -> dict[str, int]:
        time.sleep(1.5)  # one $SYS interval
        return dict(self.values)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run(devices: int, chunk: int, model_bytes: int, sim_processes: int, workdir: Path, db_kind: str = "sqlite",
        transport: str = "mqtt", replicas: int = 1, brokers: int = 1) -> dict:
    from edgeopt.fleet.db import open_database
    from edgeopt.fleet.repository import Repository
    from edgeopt.fleet.rollout import Phase
    from edgeopt.fleet.security import BROKER_TUNING, bridge_stanza
    from edgeopt.fleet.store import FleetStore

    sys.path.insert(0, str(ROOT / "tests"))
    from web_servers import Nginx  # nginx serving the repository's metadata/ and targets/

    from fleet_helpers import throwaway_postgres  # a database of its own on the local PostgreSQL

    procs: list[subprocess.Popen] = []
    web = None
    postgres = throwaway_postgres() if db_kind == "postgresql" else iter(())
    # broker 0 has the fleet service; each other one is a site broker bridged to it (fleet broker-bridge's
    # stanza, without TLS on loopback); the simulator processes are spread over all of them
    ports = [free_port() for _ in range(brokers)]
    broker_procs = []
    for b, port in enumerate(ports):
        bridge = bridge_stanza(f"site{b}", f"127.0.0.1:{ports[0]}") if b else ""
        (workdir / f"mosquitto{b}.conf").write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nsys_interval 1\n"
            f"max_connections -1\nlog_dest file {workdir / f'mosquitto{b}.log'}\nlog_type error\nlog_type warning\n"
            f"user root\n{BROKER_TUNING}{bridge}")
        broker_procs.append(subprocess.Popen([MOSQUITTO, "-c", str(workdir / f"mosquitto{b}.conf")],
                                             stderr=subprocess.DEVNULL))
    procs.extend(broker_procs)
    urls = [f"mqtt://127.0.0.1:{port}" for port in ports]
    url = urls[0]
    try:
        for port in ports:
            wait_for_port(port)
        repo_dir = workdir / "repo"
        repo = Repository.init(repo_dir)
        for v in ("1", "2"):
            entry = repo.publish(make_artifact(workdir / f"art{v}", v, model_bytes), "kws", v)
        db = f"sqlite:///{repo_dir / 'fleet.db'}" if db_kind == "sqlite" else next(postgres)
        services = []
        for r in range(replicas):  # the first one started leads the controller
            log = open(workdir / f"service{r}.log", "w")  # noqa: SIM115 (closed with the process)
            services.append(subprocess.Popen(
                [EDGEOPT, "fleet", "serve", "--repo", repo_dir, "--db", db, "--broker", url, "--chunk-size", str(chunk),
                 "--tick", "1", "--log-level", "info" if replicas > 1 else "warning",
                 *(["--replicas"] if replicas > 1 else []), *(["--unicast"] if transport == "mqtt-unicast" else [])],
                stderr=log))
            if r == 0:
                time.sleep(2.0)
        procs.extend(services)
        service = services[0]
        repo_url = []
        if transport == "http":
            web = Nginx(repo_dir, workdir / "nginx")
            repo_url = ["--repo-url", web.url]
        per = -(-devices // sim_processes)
        sims = []
        for i in range(sim_processes):
            n = min(per, devices - i * per)
            sims.append(subprocess.Popen(
                [EDGEOPT, "fleet", "simulate", "--broker", urls[i % brokers], "--devices", str(n), "--first-index", str(i * per),
                 "--initial-model", "kws@1", "--repo", repo_dir, "--chunk-size", str(chunk), "--workers", "48",
                 *repo_url], stderr=open(workdir / f"sim{i}.log", "w")))  # noqa: SIM115
        procs.extend(sims)
        _, conn = open_database(db)
        store = FleetStore(conn)
        deadline = time.monotonic() + 600
        while store.count_devices() < devices or sum(d.online for d in store.list_devices()) < devices:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"only {store.count_devices()} of {devices} devices registered "
                                   f"(see {workdir})")
            time.sleep(0.5)
        counters = [SysCounters(u) for u in urls]
        before = sum_counters(c.read() for c in counters)
        cpu0 = {"service": cpu_seconds(service.pid), "broker": sum(cpu_seconds(b.pid) for b in broker_procs),
                "sims": sum(cpu_seconds(p.pid) for p in sims)}
        load_before = os.getloadavg()[0]
        t0 = time.monotonic()
        subprocess.run([EDGEOPT, "fleet", "rollout", "create", "--model", "kws@2", "--repo", repo_dir, "--db", db,
                        "--id", "bench", "--waves", "1%,10%,50%,100%", "--bake", "2s", "--device-timeout", "120s",
                        "--start"], check=True, capture_output=True)
        state = None
        while True:
            rows = conn.query("SELECT state FROM rollouts WHERE rollout_id = 'bench'")
            state = rows[0]["state"]
            if state in (Phase.COMPLETED, Phase.ABORTED) or time.monotonic() - t0 > 900:
                break
            time.sleep(0.25)
        elapsed = time.monotonic() - t0
        load = round(max(load_before, os.getloadavg()[0]), 1)  # the machine is shared: how busy it was
        cpu = {"service": cpu_seconds(service.pid) - cpu0["service"],
               "broker": sum(cpu_seconds(b.pid) for b in broker_procs) - cpu0["broker"],
               "sims": sum(cpu_seconds(p.pid) for p in sims) - cpu0["sims"]}
        service_rss = round(peak_rss_mb(service.pid), 1)
        after = sum_counters(c.read() for c in counters)
        for c in counters:
            c.close()
        for svc in services:
            svc.terminate()
            svc.wait(60)
        summaries = [service_summary(workdir / f"service{r}.log") for r in range(replicas)]
        summary = summaries[0]
        repo_bytes = sum((x.get("repo_server") or {}).get("payload_bytes", 0) for x in summaries)
        on_v2 = sum(1 for d in store.list_devices() if d.model and d.model.version == "2")
        waves = [round(w["ended_at"] - w["started_at"], 1) if w["ended_at"] else None
                 for w in conn.query("SELECT * FROM rollout_waves WHERE rollout_id = 'bench' ORDER BY wave")]
        conn.close()
        return {"devices": devices, "chunk_bytes": chunk, "db": db_kind, "transport": transport, "replicas": replicas,
                "brokers": brokers,
                "repo_server_bytes": repo_bytes,
                "repo_server_share": round(repo_bytes / (devices * entry["length"]), 4),
                "artifact_bytes": entry["length"], "state": str(state),
                "on_target": on_v2, "wave_seconds": waves, "seconds": round(elapsed, 2),
                "publish_messages": after.get("pub_in", 0) - before.get("pub_in", 0)
                + after.get("pub_out", 0) - before.get("pub_out", 0),
                "broker_bytes": after.get("bytes_in", 0) - before.get("bytes_in", 0)
                + after.get("bytes_out", 0) - before.get("bytes_out", 0),
                "controller_cpu_s": round(cpu["service"], 2), "controller_peak_rss_mb": service_rss,
                "broker_cpu_s": round(cpu["broker"], 2),
                "broker_peak_rss_mb": round(max(peak_rss_mb(b.pid) for b in broker_procs), 1),
                "simulator_cpu_s": round(cpu["sims"], 2), "sim_processes": sim_processes, "load_average": load,
                "registry": summary.get("registry"), "repo_server": summary.get("repo_server")}
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        if web is not None:
            web.stop()
        next(postgres, None)  # drops the throwaway database


def chunk_round_trip(workdir: Path, nodelay: bool, requests: int = 200, chunk: int = 64 * 1024) -> dict:
    """p50 / p90 ms of one 64 KiB repository request/response through a Mosquitto with or without
    ``set_tcp_nodelay`` (the clients always set TCP_NODELAY)."""

    from edgeopt.fleet.repo_server import RepoServer
    from edgeopt.fleet.repository import Repository
    from edgeopt.mqtt import PahoTopics, connect, make_client
    from edgeopt.repo_client import MqttRepoLink

    port = free_port()
    conf = workdir / f"rtt-{nodelay}.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n"
                    + ("set_tcp_nodelay true\n" if nodelay else ""))
    broker = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stderr=subprocess.DEVNULL)
    clients = []
    try:
        wait_for_port(port)
        repo_dir = workdir / f"rtt-repo-{nodelay}"
        repo = Repository.init(repo_dir)
        entry = repo.publish(make_artifact(workdir / f"rtt-art-{nodelay}", "1", 1_000_000), "kws", "1")
        url = f"mqtt://127.0.0.1:{port}"
        server_client, device_client = make_client("rtt-server", url), make_client("rtt-device", url)
        clients = [server_client, device_client]
        for c in clients:
            connect(c)
        RepoServer(repo, PahoTopics(server_client), max_chunk=chunk).start()
        link = MqttRepoLink(PahoTopics(device_client), "rtt-device")
        time.sleep(0.3)
        path = f"targets/{entry['sha256']}.kws-1.tar"
        times = []
        for i in range(requests):
            t = time.perf_counter()
            if link.request(path, (i * chunk) % 900_000, chunk, 5.0) is None:
                raise RuntimeError("no answer from the repository server")
            times.append(time.perf_counter() - t)
        times.sort()
        return {"p50_ms": round(times[len(times) // 2] * 1000, 2), "p90_ms": round(times[len(times) * 9 // 10] * 1000, 2)}
    finally:
        for c in clients:
            c.disconnect()
            c.loop_stop()
        broker.terminate()
        broker.wait(10)


def controller_tick_cost(workdir: Path, devices: int = 10_000, changed: int = 100) -> dict:
    """What one controller tick costs over ``devices`` devices in a running rollout: reading every
    device record back (a naive tick) vs reading only the ``changed`` rows written since the last
    tick (what the controller does), plus the decision itself."""
    from edgeopt.fleet.controller import Controller, DesiredPublisher
    from edgeopt.fleet.db import open_database
    from edgeopt.fleet.rollout import DeviceRecord, apply_command, decide, new_rollout
    from edgeopt.fleet.rollout_spec import RolloutSpec, parse_waves
    from edgeopt.fleet.store import FleetStore
    from edgeopt.protocol import Health, ModelRef, UpdateStatus

    _, conn = open_database(f"sqlite:///{workdir / 'tick.db'}")
    store = FleetStore(conn)
    v1, v2 = ModelRef("kws", "1"), ModelRef("kws", "2")

    def record(i: int, model: ModelRef) -> DeviceRecord:
        return DeviceRecord(f"sim-{i:05d}", True, {"fleet": "sim"}, "raspberry-pi-4", "sim-0.1", model,
                            UpdateStatus("IDLE", since=time.time() + i), time.time(), Health(0.0, 2.0, 1.0, 0),
                            last_seen=time.time())

    store.save_devices([record(i, v1) for i in range(devices)])
    spec = RolloutSpec(v2, {}, parse_waves("100%"), bake_s=600.0)
    status, assignments = new_rollout("tick", spec, [f"sim-{i:05d}" for i in range(devices)], time.time())
    store.create_rollout(status, assignments)
    status, assignments = store.load_rollout("tick")
    store.save_decision(apply_command(status, assignments, "start", time.time()), status.revision)
    controller = Controller(store, DesiredPublisher(store, lambda *a: None))
    controller.publisher.flush = lambda: 0
    controller.tick()  # starts the wave; reads every device once
    store.save_devices([record(i, v2) for i in range(changed)])
    t = time.perf_counter()
    controller.tick()
    incremental = time.perf_counter() - t
    status, assignments = store.load_rollout("tick")
    t = time.perf_counter()
    decide(status, assignments, store.load_devices(assignments), time.time())
    full = time.perf_counter() - t
    conn.close()
    return {"devices": devices, "changed": changed, "full_reload_ms": round(full * 1000, 1),
            "incremental_ms": round(incremental * 1000, 1)}


def service_summary(log: Path) -> dict:
    """The JSON status line `edgeopt fleet serve` prints when it stops."""
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="1000:65536,1000:262144,10000:65536,10000:262144", help="DEVICES:CHUNK_BYTES,...")
    ap.add_argument("--model-bytes", type=int, default=1_000_000)
    ap.add_argument("--sim-processes", type=int, default=2)
    ap.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite",
                    help="the fleet database (postgresql: a throwaway database on the local server)")
    ap.add_argument("--transport", default="mqtt",
                    help="how devices fetch the repository: the MQTT repository server casting chunks (each goes out "
                         "once, retained), the same answering each device alone (fleet serve --unicast), or HTTP "
                         "from nginx; a comma-separated list runs each")
    ap.add_argument("--replicas", type=int, default=1, help="fleet serve processes (more than one: --replicas)")
    ap.add_argument("--brokers", type=int, default=1,
                    help="Mosquittos: the fleet service on the first, each other one bridged to it (fleet "
                         "broker-bridge's stanza) with simulators of its own; broker bytes and CPU are their sums")
    ap.add_argument("--name", default="", help="the JSON file's name in --out (default fleet_scale)")
    add_out_option(ap)
    args = ap.parse_args()
    transports = args.transport.split(",")
    if not set(transports) <= {"mqtt", "mqtt-unicast", "http"}:
        ap.error(f"--transport {args.transport}: each must be mqtt, mqtt-unicast or http")
    hard = raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="edgeopt-fleet-rtt-") as tmp:
        rtt = {"set_tcp_nodelay": chunk_round_trip(Path(tmp), True), "default": chunk_round_trip(Path(tmp), False)}
    on, off = rtt["set_tcp_nodelay"], rtt["default"]
    print_table("one 64 KiB repository request/response through Mosquitto (200 requests)",
                ["broker", "p50 ms", "p90 ms", "p90 x"],
                [["set_tcp_nodelay true", on["p50_ms"], on["p90_ms"], 1.0],
                 ["default (Nagle on)", off["p50_ms"], off["p90_ms"], off["p90_ms"] / on["p90_ms"]]])
    with tempfile.TemporaryDirectory(prefix="edgeopt-fleet-tick-") as tmp:
        tick = controller_tick_cost(Path(tmp))
    print_table(f"one controller tick, {tick['devices']:,} devices in a running rollout, {tick['changed']} changed",
                ["tick", "ms"], [["read every device back + decide", tick["full_reload_ms"]],
                                 ["read the changed rows + decide (the controller)", tick["incremental_ms"]]])
    results = []
    for spec in args.runs.split(","):
        devices, chunk = (int(x) for x in spec.split(":"))
        if devices + 100 > hard:
            raise SystemExit(f"{devices} devices need more file descriptors than the hard limit {hard}")
        for transport in transports:
            with tempfile.TemporaryDirectory(prefix="edgeopt-fleet-bench-") as tmp:
                print(f"running {devices} devices, chunk {chunk}, {transport} ...", flush=True)
                r = run(devices, chunk, args.model_bytes, args.sim_processes, Path(tmp), args.db, transport,
                        args.replicas, args.brokers)
                print(json.dumps(r), flush=True)
                results.append(r)
    rows = [[r["devices"], r["chunk_bytes"] // 1024, r["db"], r["transport"], r["replicas"], r["brokers"], r["state"],
             r["seconds"],
             r["devices"] / r["seconds"], r["publish_messages"], r["broker_bytes"] / 1e9, r["repo_server_share"],
             r["controller_cpu_s"], r["controller_peak_rss_mb"], r["broker_cpu_s"], r["simulator_cpu_s"],
             r["load_average"]] for r in results]
    print_table("rollout of a 1 MB model (waves 1%,10%,50%,100%, bake 2 s)",
                ["devices", "chunk KiB", "db", "transport", "replicas", "brokers", "result", "seconds", "devices/s",
                 "publish msgs",
                 "broker GB", "repo server bytes / (devices x artifact)", "controller CPU s", "controller peak RSS MB",
                 "broker CPU s", "simulator CPU s", "load avg"], rows)
    write_json(args.name or "fleet_scale", {"model_bytes": args.model_bytes, "chunk_round_trip": rtt,
                                            "controller_tick": tick, "results": results})


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
