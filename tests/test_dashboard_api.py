"""The dashboard's JSON API and its guard, through Starlette's TestClient (the real app, handlers and
database; no network): devices paged, filtered and sorted; rollouts created and commanded through the
same operations as the CLI; who may call what (localhost, token, session, CSRF, origin)."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("starlette", reason="the dashboard needs the fleet extra (pip install 'edgeopt[fleet]')")
pytest.importorskip("httpx2", reason="Starlette's TestClient needs httpx2 (the dev extra)")

from starlette.testclient import TestClient  # noqa: E402
from web_servers import self_signed  # noqa: E402

from edgeopt.fleet.dashboard.openapi import openapi  # noqa: E402
from edgeopt.fleet.dashboard.server import Api, DashboardConfig, build_app  # noqa: E402
from edgeopt.fleet.db import open_database  # noqa: E402
from edgeopt.fleet.repository import Repository  # noqa: E402
from edgeopt.fleet.rollout import DeviceRecord  # noqa: E402
from edgeopt.fleet.store import FleetStore  # noqa: E402
from edgeopt.protocol import ModelRef, UpdateStatus  # noqa: E402

from repo_helpers import fake_artifact  # noqa: E402

TOKEN = "s3cret-token-for-tests-0123"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dash")
    repo = Repository.init(tmp / "repo")
    for v in ("1", "2"):
        repo.publish(fake_artifact(tmp / f"art-{v}", "kws", v, 2000, seed=int(v)), "kws", v)
    db, conn = open_database(f"sqlite:///{tmp / 'fleet.db'}")
    now = time.time()
    records = [DeviceRecord(f"dev-{i:04d}", online=i % 3 != 0, labels={"site": "lab" if i % 2 else "field",
                                                                           "ring": "canary" if i < 10 else "main"},
                            profile="raspberry-pi-4", agent_version="0.1.0", model=ModelRef("kws", "1"),
                            update=UpdateStatus("IDLE" if i % 5 else "ROLLED_BACK", None, None, None, now),
                            last_seen=now - i)
               for i in range(250)]
    FleetStore(conn).save_devices(records)
    conn.close()
    return tmp, db, repo


def client(fleet, host="127.0.0.1", token=None):
    tmp, db, repo = fleet
    api = Api(db, repo, DashboardConfig("127.0.0.1:0", token=token))
    return TestClient(build_app(api), client=(host, 50000)), api


def csrf(c: TestClient) -> str:
    html = c.get("/").text
    return html.split('name="csrf-token" content="')[1].split('"')[0]


def test_devices_are_paged_filtered_and_sorted(fleet):
    c, _ = client(fleet)
    page = c.get("/api/devices", params={"limit": 20}).json()
    assert page["total"] == 250 and len(page["devices"]) == 20 and page["devices"][0]["device_id"] == "dev-0000"
    second = c.get("/api/devices", params={"limit": 20, "offset": 20}).json()
    assert second["devices"][0]["device_id"] == "dev-0020"
    lab = c.get("/api/devices", params={"label": "site=lab,ring=canary", "limit": 500}).json()
    assert lab["total"] == 5 and all(d["labels"] == {"site": "lab", "ring": "canary"} for d in lab["devices"])
    offline = c.get("/api/devices", params={"online": "false", "limit": 500}).json()
    assert offline["total"] == 84 and not any(d["online"] for d in offline["devices"])
    rolled = c.get("/api/devices", params={"state": "ROLLED_BACK", "limit": 500}).json()
    assert rolled["total"] == 50
    newest_first = c.get("/api/devices", params={"sort": "last_seen", "order": "desc", "limit": 3}).json()
    assert [d["device_id"] for d in newest_first["devices"]] == ["dev-0000", "dev-0001", "dev-0002"]
    assert c.get("/api/devices", params={"q": "dev-024"}).json()["total"] == 10
    assert c.get("/api/devices", params={"model": "kws@2"}).json()["total"] == 0
    summary = c.get("/api/summary").json()
    assert summary["devices"] == 250 and summary["online"] == 166 and summary["models"] == {"kws@1": 250}


@pytest.mark.parametrize("params, needle", [
    ({"sort": "secret"}, "sort='secret'"), ({"limit": "100000"}, "limit in 1..500"), ({"online": "maybe"}, "online="),
    ({"label": "site"}, "LABEL=VALUE"), ({"model": "kws@"}, "model="), ({"offset": "-1"}, "offset must be"),
])
def test_a_wrong_filter_is_a_400_naming_it(fleet, params, needle):
    c, _ = client(fleet)
    r = c.get("/api/devices", params=params)
    assert r.status_code == 400 and needle in r.json()["error"], r.text


def test_rollouts_are_created_and_commanded_through_the_cli_checks(fleet):
    c, _ = client(fleet)
    token = csrf(c)
    headers = {"X-CSRF-Token": token}
    bad = c.post("/api/rollouts", json={"model": "kws@2", "options": {"bake": "soon"}}, headers=headers)
    assert bad.status_code == 400 and bad.json()["error"] == "--bake 'soon': expected a duration such as 90s, 10m, 1h"
    unpublished = c.post("/api/rollouts", json={"model": "kws@9"}, headers=headers)
    assert unpublished.status_code == 400 and "kws@9 is not in the repository" in unpublished.json()["error"]
    none = c.post("/api/rollouts", json={"model": "kws@2", "selectors": ["site=moon"]}, headers=headers)
    assert none.status_code == 400 and "matches no device" in none.json()["error"]
    made = c.post("/api/rollouts", json={"model": "kws@2", "selectors": ["ring=canary"], "id": "web-1",
                                         "options": {"waves": "50%,100%", "bake": "1s", "max_error_rate": "0.1"}},
                  headers=headers)
    assert made.status_code == 201, made.text
    assert made.json() == {"rollout_id": "web-1", "devices": 10, "waves": [5, 5], "started": False}
    again = c.post("/api/rollouts", json={"model": "kws@2", "id": "web-1"}, headers=headers)
    assert again.status_code == 400 and "exists" in again.json()["error"]
    info = c.get("/api/rollouts/web-1").json()
    assert info["state"] == "CREATED" and info["spec"]["gates"]["max_error_rate"] == 0.1
    assert c.post("/api/rollouts/web-1/pause", headers=headers).status_code == 400  # not running yet
    assert c.post("/api/rollouts/web-1/start", headers=headers).json()["state"] == "RUNNING"
    aborted = c.post("/api/rollouts/web-1/abort", json={"reason": "seen enough"}, headers=headers).json()
    assert aborted["state"] == "ABORTED"
    info = c.get("/api/rollouts/web-1").json()
    assert info["reason"] == "aborted by the operator: seen enough" and info["events"][-1]["kind"] == "aborted"
    assert [r["rollout_id"] for r in c.get("/api/rollouts").json()] == ["web-1"]
    assert c.get("/api/rollouts/nope").status_code == 404
    assert c.post("/api/rollouts/web-1/explode", headers=headers).status_code == 400
    assert c.get("/api/rollouts/web-1/abort").status_code == 405  # actions are POST only
    detail = c.get("/api/devices/dev-0001").json()
    assert detail["rollouts"][0]["rollout_id"] == "web-1" and detail["rollouts"][0]["wave"] in (1, 2)
    assert c.get("/api/devices/nobody").status_code == 404


def test_models_carry_their_report_summary(fleet):
    c, _ = client(fleet)
    models = c.get("/api/models").json()
    assert [f"{m['name']}@{m['version']}" for m in models] == ["kws@1", "kws@2"]
    assert all(len(m["sha256"]) == 64 and "report" in m for m in models)


def test_state_changes_need_the_csrf_token_and_the_same_origin(fleet):
    c, _ = client(fleet)
    assert c.post("/api/rollouts", json={"model": "kws@2"}).status_code == 403
    assert "X-CSRF-Token" in c.post("/api/rollouts", json={}).json()["error"]
    wrong = c.post("/api/rollouts", json={"model": "kws@2"}, headers={"X-CSRF-Token": "0" * 64})
    assert wrong.status_code == 403
    foreign = c.post("/api/rollouts", json={"model": "kws@2"},
                     headers={"X-CSRF-Token": csrf(c), "Origin": "http://evil.example"})
    assert foreign.status_code == 403 and "cross-origin" in foreign.json()["error"]


def test_other_machines_need_the_token(fleet):
    c, _ = client(fleet, host="10.1.2.3")  # no token configured: only the fleet host itself
    r = c.get("/api/devices")
    assert r.status_code == 403 and "--http-token-file" in r.json()["error"]
    assert c.get("/").status_code == 403
    c, _ = client(fleet, host="10.1.2.3", token=TOKEN)
    assert c.get("/api/devices").status_code == 401
    page = c.get("/", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login"
    assert c.get("/api/devices", headers={"Authorization": "Bearer wrong-token-0000000"}).status_code == 401
    assert c.get("/api/devices", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    # scripts with the bearer token act without a CSRF token (the header is no ambient credential)
    r = c.post("/api/rollouts/nope/abort", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 404
    # a browser logs in (with the login page's CSRF token) and gets a session cookie
    login_csrf = c.get("/login").text.split('name="csrf-token" content="')[1].split('"')[0]
    assert c.post("/login", json={"token": "nope"}, headers={"X-CSRF-Token": login_csrf}).status_code == 401
    assert c.post("/login", json={"token": TOKEN}).status_code == 403  # without the page's CSRF token
    ok = c.post("/login", json={"token": TOKEN}, headers={"X-CSRF-Token": login_csrf})
    assert ok.status_code == 200 and "httponly" in ok.headers["set-cookie"].lower()
    assert "samesite=strict" in ok.headers["set-cookie"].lower()
    assert c.get("/api/devices").status_code == 200
    session_csrf = csrf(c)
    assert session_csrf != login_csrf  # bound to the session
    assert c.post("/api/rollouts/nope/abort", headers={"X-CSRF-Token": login_csrf}).status_code == 403
    assert c.post("/api/rollouts/nope/abort", headers={"X-CSRF-Token": session_csrf}).status_code == 404


def test_the_openapi_document_names_every_route_and_method(fleet):
    c, _ = client(fleet)
    app = build_app(client(fleet)[1])
    served = {}
    for r in app.routes:
        if r.path.startswith("/api/") and r.path != "/api/openapi.json":
            served.setdefault(r.path.replace("{command:str}", "{command}"), set()).update(
                m.lower() for m in r.methods - {"HEAD"})
    described = {p: set(ops) for p, ops in openapi()["paths"].items()}
    assert described == served
    assert c.get("/api/openapi.json").json()["paths"].keys() == described.keys()


def test_the_live_stream_sends_the_change_stamp(fleet):
    tmp, db, repo = fleet
    api = Api(db, repo, DashboardConfig("127.0.0.1:0", poll_s=0.05))
    c = TestClient(build_app(api), client=("127.0.0.1", 50000))
    with c.stream("GET", "/api/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        event = next(line for line in lines if line.startswith("event:"))
        data = json.loads(next(lines).removeprefix("data: "))
    assert event == "event: change" and data["devices_updated_at"] > 0 and isinstance(data["rollouts"], dict)


def test_telemetry_is_sampled_into_the_charts_columns(tmp_path):
    from edgeopt.fleet.registry import Registry
    from edgeopt.protocol import encode_telemetry

    tmp, repo = tmp_path, Repository.init(tmp_path / "repo")
    db, conn = open_database(f"sqlite:///{tmp / 'fleet.db'}")
    base = float(int(time.time()) - 2 * 86400)  # two days ago: outside the default 6 hours
    now = [base]
    registry = Registry(FleetStore(conn), clock=lambda: now[0], sample_s=60.0)
    profile = {"inference": {"windows": 10, "seconds": 0.1, "us_per_window": {"inference": 800.0, "handoff": None}}}
    for i in range(5):  # every 30 s: one sample a minute is kept
        now[0] = base + 30 * i
        registry.on_message("edgeopt/devices/d1/telemetry", encode_telemetry("d1", {
            "model": {"name": "kws", "version": "1"}, "windows_per_s": 50.0 + i, "error_rate": 0.0,
            "latency_ms": {"p50_ms": 1.0, "p95_ms": 2.0 + i}, "dropped": {"inference_errors": i}, "profile": profile}))
        registry.flush()
    samples = FleetStore(conn).samples("d1", 0)
    assert [at for at, _ in samples] == [base, base + 60, base + 120]
    assert samples[-1][1] == {"windows_per_s": 54.0, "latency_p50_ms": 1.0, "latency_p95_ms": 6.0, "error_rate": 0.0,
                              "inference_errors": 4, "agreement": None}
    record = FleetStore(conn).load_devices(["d1"])["d1"]
    assert record.telemetry.profile == {"inference": {"inference": 800.0, "handoff": None}}
    conn.close()
    api = Api(db, repo, DashboardConfig("127.0.0.1:0"))
    c = TestClient(build_app(api), client=("127.0.0.1", 50000))
    assert c.get("/api/devices/d1/telemetry").json()["at"] == []  # samples older than 6 hours
    columns = c.get("/api/devices/d1/telemetry", params={"hours": 24 * 31}).json()
    assert columns["at"] == [base, base + 60, base + 120] and columns["windows_per_s"] == [50.0, 52.0, 54.0]
    assert c.get("/api/devices/d1").json()["telemetry"]["profile"]["inference"]["inference"] == 800.0
    assert c.get("/api/devices/d1/telemetry", params={"hours": "x"}).status_code == 400
    assert c.get("/api/devices/nobody/telemetry").status_code == 404


def test_gate_values_are_the_worst_readings_of_the_told_devices_on_the_target():
    from dataclasses import replace

    from edgeopt.fleet.dashboard.queries import gate_values
    from edgeopt.fleet.rollout import new_rollout
    from edgeopt.fleet.rollout_spec import rollout_spec
    from edgeopt.protocol import Health, Telemetry

    v1, v2 = ModelRef("kws", "1"), ModelRef("kws", "2")
    spec = rollout_spec(v2, [], max_error_rate=0.1, min_agreement=0.9)
    status, assignments = new_rollout("r", spec, ["a", "b", "c", "d"], 0.0)
    assignments = {d: replace(a, assigned_at=1.0 if d != "d" else None) for d, a in assignments.items()}
    devices = {
        "a": DeviceRecord("a", model=v2, health=Health(error_rate=0.05, agreement=0.97)),
        # trying the target; its telemetry about the target reports worse than its health
        "b": DeviceRecord("b", model=v1, update=UpdateStatus("PROBATION", v2, "r", None, 0.0),
                          health=Health(error_rate=0.0, agreement=0.85), telemetry=Telemetry("b", v2, None, 0.3)),
        "c": DeviceRecord("c", model=v1, health=Health(error_rate=0.9, agreement=0.1)),  # not on the target yet
        "d": DeviceRecord("d", model=v2, health=Health(error_rate=0.9, agreement=0.1)),  # not told
    }
    rows = {g["gate"]: g for g in gate_values(status, assignments, devices)}
    assert rows.keys() == {"max_error_rate", "min_agreement"}
    assert rows["max_error_rate"] == {"gate": "max_error_rate", "bound": 0.1, "reading": "error_rate", "worst": 0.3,
                                      "devices": 2, "breaking": 1}
    assert rows["min_agreement"]["worst"] == 0.85 and rows["min_agreement"]["breaking"] == 1


def test_a_model_is_revoked_from_the_models_page(tmp_path):
    repo = Repository.init(tmp_path / "repo")
    for v in ("1", "2"):
        repo.publish(fake_artifact(tmp_path / f"art-{v}", "kws", v, 2000, seed=int(v)), "kws", v)
    db, conn = open_database(f"sqlite:///{tmp_path / 'fleet.db'}")
    conn.close()
    c = TestClient(build_app(Api(db, repo, DashboardConfig("127.0.0.1:0"))), client=("127.0.0.1", 50000))
    headers = {"X-CSRF-Token": csrf(c)}
    assert c.post("/api/models/kws@2/revoke").status_code == 403  # no CSRF token
    assert c.post("/api/models/kws@2/revoke", headers=headers).json() == {"revoked": "kws@2"}
    assert [m["version"] for m in Repository(tmp_path / "repo").list_models()] == ["1"]
    again = c.post("/api/models/kws@2/revoke", headers=headers)
    assert again.status_code == 400 and "not in the repository" in again.json()["error"]
    assert c.post("/api/models/kws/revoke", headers=headers).status_code == 400


def test_the_real_server_speaks_tls_and_stops_with_a_live_stream_open(fleet, tmp_path):
    import http.client
    import ssl
    import urllib.request

    from edgeopt.fleet.dashboard.server import Dashboard

    _, db, repo = fleet
    cert, key = self_signed(tmp_path)
    dash = Dashboard(DashboardConfig("127.0.0.1:0", certfile=cert, keyfile=key), db, repo).start()
    try:
        assert dash.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(dash.url + "api/summary", context=context, timeout=10) as r:
            assert json.loads(r.read())["devices"] == 250
        host, port = dash.address
        plain = http.client.HTTPConnection(host, port, timeout=5)  # http on the https port: no answer
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            plain.request("GET", "/api/summary")
            plain.getresponse().read()
        stream = urllib.request.urlopen(dash.url + "api/events", context=context, timeout=10)
        assert stream.readline().startswith(b"retry:")
    finally:
        dash.stop()
    assert not dash.http._thread.is_alive()  # a client holding the live stream does not hold the service up
    stream.close()


def test_a_label_filter_matches_whole_labels_only(tmp_path):
    repo = Repository.init(tmp_path / "repo")
    db, conn = open_database(f"sqlite:///{tmp_path / 'fleet.db'}")
    labels = {"a": {"site": "lab"}, "b": {"site": "lab2"}, "c": {"site": "lab_1"}, "d": {"site": "labx1"},
              "e": {"ring": "site", "x": "lab"}, "f": {"site": "lab", "ring": "canary"}}
    FleetStore(conn).save_devices([DeviceRecord(d, labels=v) for d, v in labels.items()])
    conn.close()
    c = TestClient(build_app(Api(db, repo, DashboardConfig("127.0.0.1:0"))), client=("127.0.0.1", 50000))

    def ids(label):
        return [d["device_id"] for d in c.get("/api/devices", params={"label": label}).json()["devices"]]

    assert ids("site=lab") == ["a", "f"]
    assert ids("site=lab_1") == ["c"]  # '_' is no wildcard
    assert ids("site=la") == []
    assert ids("site=lab,ring=canary") == ["f"]
    assert ids("x=lab") == ["e"] and ids("ring=site") == ["e"]


def test_a_certificate_that_does_not_load_is_one_line_and_a_huge_body_is_refused(fleet, tmp_path):
    from edgeopt.errors import UserInputError
    from edgeopt.fleet.dashboard.server import Dashboard

    _, db, repo = fleet
    (tmp_path / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n")
    (tmp_path / "key.pem").write_text("nope")
    with pytest.raises(UserInputError, match="cannot use them for TLS"):
        Dashboard(DashboardConfig("127.0.0.1:0", certfile=tmp_path / "cert.pem", keyfile=tmp_path / "key.pem"),
                  db, repo).start()
    c, _ = client(fleet)
    r = c.post("/api/rollouts", content=b"{" + b" " * 200_000 + b"}", headers={"X-CSRF-Token": csrf(c)})
    assert r.status_code == 400 and "over 64 KiB" in r.json()["error"]
    r = c.post("/api/rollouts", content=b"[1]", headers={"X-CSRF-Token": csrf(c)})
    assert r.status_code == 400 and "JSON object" in r.json()["error"]


def test_a_devices_state_history_records_each_change_once(tmp_path):
    from edgeopt.fleet.registry import Registry
    from edgeopt.protocol import offline_will, state_message

    repo = Repository.init(tmp_path / "repo")
    db, conn = open_database(f"sqlite:///{tmp_path / 'fleet.db'}")
    now = [time.time() - 100]
    registry = Registry(FleetStore(conn), clock=lambda: now[0])
    v1, v2 = ModelRef("kws", "1"), ModelRef("kws", "2")
    steps = [state_message("d1", model=v1, update=UpdateStatus("IDLE")),
             state_message("d1", model=v1, update=UpdateStatus("IDLE")),  # a repeated report: no entry
             state_message("d1", model=v1, update=UpdateStatus("DOWNLOADING", v2, "r-1")),
             state_message("d1", model=v2, update=UpdateStatus("PROBATION", v2, "r-1")),
             state_message("d1", model=v1, update=UpdateStatus("ROLLED_BACK", v2, "r-1", "golden vectors differ")),
             offline_will("d1")]
    for payload in steps:
        now[0] += 1
        registry.on_message("edgeopt/devices/d1/state", payload)
        registry.flush()
    conn.close()
    c = TestClient(build_app(Api(db, repo, DashboardConfig("127.0.0.1:0"))), client=("127.0.0.1", 50000))
    history = c.get("/api/devices/d1").json()["history"]
    assert [(e["online"], e["model"], e["state"], e["target"]) for e in history] == [
        (False, "kws@1", "ROLLED_BACK", "kws@2"), (True, "kws@1", "ROLLED_BACK", "kws@2"),
        (True, "kws@2", "PROBATION", "kws@2"), (True, "kws@1", "DOWNLOADING", "kws@2"), (True, "kws@1", "IDLE", None)]
    assert history[1]["reason"] == "golden vectors differ" and history[1]["rollout"] == "r-1"
    assert history[0]["at"] > history[-1]["at"]  # newest first


@pytest.mark.parametrize("online_only, planned", [("false", 10), ("true", 6), (False, 10), (True, 6)])
def test_online_only_as_text_or_a_boolean_plans_the_same_devices(fleet, online_only, planned):
    c, _ = client(fleet)
    rollout_id = f"oo-{str(online_only).lower()}-{type(online_only).__name__}"
    r = c.post("/api/rollouts", json={"model": "kws@2", "selectors": ["ring=canary"], "id": rollout_id,
                                      "options": {"online_only": online_only}}, headers={"X-CSRF-Token": csrf(c)})
    assert r.status_code == 201 and r.json()["devices"] == planned, r.text  # 4 of the 10 canaries are offline
    assert c.post(f"/api/rollouts/{rollout_id}/abort", headers={"X-CSRF-Token": csrf(c)}).status_code == 200
