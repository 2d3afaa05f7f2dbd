"""The fleet dashboard over a large fleet: how fast /api/devices answers and how soon the devices page
shows its first table, with N devices registered (SQLite, as `edgeopt fleet serve` keeps them).

Per run: a fleet database with N devices (labels over 20 sites and 3 rings, three model versions,
update states and online flags mixed, last_seen spread over a day), a repository with two models, and
the dashboard's real server (uvicorn, on loopback). Then:

- ``/api/devices``: R requests of each kind a page makes (the first page; sorted by last seen; a label
  filter; a state filter; a model filter; a deep page; an id search), one keep-alive connection;
  p50 / p95 / max per kind and over all.
- first paint of the devices page in headless chromium: a fresh load of ``/#/devices`` (new browser tab
  state each time), the time from navigation start until the page has drawn the table of the first
  50 devices (``performance.mark("edgeopt:rendered")`` in app.js), and the browser's first contentful
  paint (the page frame), median and max over L loads.

    python benchmarks/dashboard.py                      # 10,000 devices
    python benchmarks/dashboard.py --devices 1000 --requests 50 --loads 3
"""

from __future__ import annotations

import argparse
import http.client
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, add_out_option, print_table, write_json

sys.path.insert(0, str(ROOT / "tests"))

KINDS = {
    "first page": "limit=50",
    "sort by last seen": "sort=last_seen&order=desc&limit=50",
    "label filter": "label=site=site-07,ring=main&limit=50",
    "state filter": "state=ROLLED_BACK&limit=50",
    "model filter": "model=kws@2&sort=model&limit=50",
    "deep page": "offset=9000&limit=50",
    "id search": "q=dev-0999&limit=50",
}


def make_fleet(tmp: Path, devices: int):
    from edgeopt.fleet.db import open_database
    from edgeopt.fleet.repository import Repository
    from edgeopt.fleet.rollout import DeviceRecord
    from edgeopt.fleet.store import FleetStore
    from edgeopt.protocol import Health, ModelRef, Telemetry, UpdateStatus

    from repo_helpers import fake_artifact

    repo = Repository.init(tmp / "repo")
    for v in ("1", "2"):
        repo.publish(fake_artifact(tmp / f"art-{v}", "kws", v, 4096, seed=int(v)), "kws", v)
    db, conn = open_database(f"sqlite:///{tmp / 'fleet.db'}")
    rng = random.Random(0)
    now = time.time()
    states = ["IDLE"] * 8 + ["DOWNLOADING", "PROBATION", "ROLLED_BACK"]
    records = []
    for i in range(devices):
        model = ModelRef("kws", rng.choice("112"))
        records.append(DeviceRecord(
            f"dev-{i:05d}", online=rng.random() < 0.9,
            labels={"site": f"site-{i % 20:02d}", "ring": "canary" if i % 50 == 0 else "main", "hw": "pi4"},
            profile="raspberry-pi-4", agent_version="0.1.0", model=model,
            update=UpdateStatus(rng.choice(states), None, None, None, now), health=Health(0.0, 2.0, 0.99, 0),
            telemetry=Telemetry(f"dev-{i:05d}", model, 2.0, 0.0, None, 100.0, 1.0, 0, None),
            last_seen=now - rng.random() * 86400))
    store = FleetStore(conn)
    for start in range(0, devices, 2000):
        store.save_devices(records[start:start + 2000])
    conn.close()
    return db, repo


def api_latencies(host: str, port: int, requests: int) -> dict[str, list[float]]:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    out: dict[str, list[float]] = {k: [] for k in KINDS}
    for _ in range(3):  # warm: the first requests import and fill caches
        conn.request("GET", "/api/devices?limit=50")
        conn.getresponse().read()
    for _ in range(requests):
        for kind, query in KINDS.items():
            started = time.perf_counter()
            conn.request("GET", f"/api/devices?{query}")
            response = conn.getresponse()
            body = response.read()
            out[kind].append((time.perf_counter() - started) * 1000)
            if response.status != 200:
                raise SystemExit(f"/api/devices?{query}: HTTP {response.status} {body[:200]!r}")
    conn.close()
    return out


def first_paints(url: str, loads: int) -> tuple[list[float], list[float]]:
    from selenium import webdriver
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    rendered, fcp = [], []
    try:
        for i in range(loads + 1):  # the first load warms the browser's own caches; not counted
            browser.get("about:blank")
            browser.get(url + "#/devices")
            mark = WebDriverWait(browser, 30, 0.02).until(lambda b: b.execute_script(
                "const m = performance.getEntriesByName('edgeopt:rendered'); return m.length ? m[0].startTime : null"))
            paint = browser.execute_script(
                "const p = performance.getEntriesByName('first-contentful-paint'); return p.length ? p[0].startTime : null")
            rows = browser.execute_script("return document.querySelectorAll('table[data-testid=devices] tbody tr').length")
            if rows != 50:
                raise SystemExit(f"the devices page drew {rows} rows, expected 50")
            if i:
                rendered.append(float(mark))
                fcp.append(float(paint) if paint is not None else float("nan"))
    finally:
        browser.quit()
    return rendered, fcp


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=100, help="requests of each kind")
    parser.add_argument("--loads", type=int, default=5, help="page loads in the browser")
    add_out_option(parser)
    args = parser.parse_args()

    from edgeopt.fleet.dashboard.server import Dashboard, DashboardConfig

    with tempfile.TemporaryDirectory(prefix="edgeopt-dash-bench-") as tmp:
        started = time.perf_counter()
        db, repo = make_fleet(Path(tmp), args.devices)
        print(f"{args.devices} devices registered in {time.perf_counter() - started:.1f} s")
        dash = Dashboard(DashboardConfig("127.0.0.1:0"), db, repo).start()
        try:
            host, port = dash.address
            latencies = api_latencies(host, port, args.requests)
            rendered, fcp = first_paints(dash.url, args.loads)
        finally:
            dash.stop()
    every = [v for values in latencies.values() for v in values]
    rows = [[kind, pct(v, 50), pct(v, 95), max(v)] for kind, v in latencies.items()]
    rows.append(["all", pct(every, 50), pct(every, 95), max(every)])
    print_table(f"/api/devices over {args.devices:,} devices, ms ({args.requests} requests of each kind)",
                ["request", "p50", "p95", "max"], rows)
    print_table(f"devices page, ms from navigation start ({args.loads} loads)", ["", "median", "max"],
                [["table of 50 drawn", statistics.median(rendered), max(rendered)],
                 ["first contentful paint", statistics.median(fcp), max(fcp)]])
    write_json("dashboard", {"devices": args.devices, "requests_per_kind": args.requests, "loads": args.loads,
                             "api_devices_ms": {k: {"p50": pct(v, 50), "p95": pct(v, 95), "max": max(v)}
                                                for k, v in latencies.items()},
                             "api_devices_all_ms": {"p50": pct(every, 50), "p95": pct(every, 95), "max": max(every)},
                             "page_rendered_ms": rendered, "first_contentful_paint_ms": fcp})


if __name__ == "__main__":
    main()
