"""The dashboard's JSON API as an OpenAPI 3.1 document (served at ``/api/openapi.json``). Starlette
generates none, so it is written here; tests/test_dashboard_api.py checks that it names exactly the
routes the server has, with their methods."""

from __future__ import annotations

from typing import Any


def _q(name: str, text: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": text, "schema": schema or {"type": "string"}}


def _p(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _ok(text: str) -> dict[str, Any]:
    return {"200": {"description": text, "content": {"application/json": {}}},
            "400": {"description": "a wrong parameter: {error: one line}"}}


ACTION = {"description": "State-changing: POST with the page's X-CSRF-Token header (or a bearer token).",
          "requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}}}


def openapi() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "edgeopt fleet dashboard API", "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                           "session": {"type": "apiKey", "in": "cookie", "name": "edgeopt_session"}}},
        "security": [{}, {"bearer": []}, {"session": []}],
        "paths": {
            "/api/summary": {"get": {"summary": "Device counts: online, by update state, by model; the service's "
                                                "status", "responses": _ok("counts")}},
            "/api/devices": {"get": {
                "summary": "A page of devices, filtered and sorted",
                "parameters": [_q("label", "K=V[,K=V]: every label must match"),
                               _q("model", "NAME@VERSION, or NAME for any version"),
                               _q("state", "update state (IDLE, DOWNLOADING, ...; 'none' for never reported)"),
                               _q("online", "true or false"), _q("q", "text in the device id"),
                               _q("sort", "device, online, model, state, last_seen, profile"),
                               _q("order", "asc or desc"), _q("offset", "first row", {"type": "integer"}),
                               _q("limit", "rows, 1..500 (default 50)", {"type": "integer"})],
                "responses": _ok("{total, offset, limit, devices: [...]}")}},
            "/api/devices/{device_id}": {"get": {"summary": "One device with its state history and the rollouts it took part in",
                                                 "parameters": [_p("device_id")], "responses": _ok("the device")}},
            "/api/devices/{device_id}/telemetry": {"get": {
                "summary": "A device's telemetry samples as columns: at, windows_per_s, latency_p50_ms, latency_p95_ms, "
                           "error_rate, inference_errors, agreement",
                "parameters": [_p("device_id"), _q("hours", "how far back (default 6)", {"type": "number"})],
                "responses": _ok("{at: [...], SERIES: [...]}")}},
            "/api/models": {"get": {"summary": "Published versions with their report summaries",
                                    "responses": _ok("models")}},
            "/api/models/{model}/revoke": {"post": {
                "summary": "Revoke NAME@VERSION: remove it from the signed targets (devices refuse it from then on)",
                **ACTION, "parameters": [_p("model")],
                "responses": {"200": {"description": "revoked"}, "400": {"description": "not published"}}}},
            "/api/rollouts": {
                "get": {"summary": "Every rollout, newest first, with wave progress", "responses": _ok("rollouts")},
                "post": {"summary": "Create a rollout: {model, selectors: [K=V], options: {waves, bake, ...}, id, "
                                    "start}", **ACTION, "responses": {"201": {"description": "created"},
                                                                       "400": {"description": "a wrong field"}}}},
            "/api/rollout-options": {"get": {"summary": "The rollout options the create form offers (name, type, "
                                                        "default, help)", "responses": _ok("options")}},
            "/api/rollouts/{rollout_id}": {"get": {"summary": "One rollout: waves, failures, recent events",
                                                   "parameters": [_p("rollout_id")], "responses": _ok("the rollout")}},
            "/api/rollouts/{rollout_id}/{command}": {"post": {
                "summary": "start, pause, resume or abort ({reason} for abort)", **ACTION,
                "parameters": [_p("rollout_id"), _p("command")],
                "responses": {"200": {"description": "the new state"}, "400": {"description": "not allowed now"}}}},
            "/api/events": {"get": {"summary": "Server-Sent Events: 'change' with the database's change stamp",
                                    "responses": {"200": {"description": "text/event-stream"}}}},
        },
    }
