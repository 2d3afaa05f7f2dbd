"""The settings of ``edgeopt fleet serve`` as declarations (edgeopt.params): the command's flags, the
``[serve]`` table of a fleet config file (which fills the flags' defaults) and docs/fleet.md's table are
generated from them, and ``ServiceConfig`` takes its defaults from them. A module of its own, without
the service's imports, so ``edgeopt fleet --help`` stays light."""

from __future__ import annotations

from edgeopt.errors import UserInputError
from edgeopt.params import Param, reference_table


def parse_listen(text: str, flag: str = "--listen", example: str = "127.0.0.1:1884") -> tuple[str, int]:
    """'HOST:PORT' ('[::1]:8080' for IPv6; an empty host is 127.0.0.1) → (host, port)."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserInputError(f"{flag} {text!r}: expected HOST:PORT, e.g. {example}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


LOCAL_BROKERS = ("auto", "mosquitto", "iotcore", "amqtt")
SERVE_PARAMS: tuple[Param, ...] = (
    Param("broker", str, None,
          "broker URL, e.g. mqtt://localhost:1883 or mqtts://USER@host:8883?ca=ca.pem&password_file=PW; or "
          "$EDGEOPT_BROKER (default: start a local broker on --listen)"),
    Param("listen", str, "127.0.0.1:1884", "HOST:PORT of the local broker (only without --broker; port 0: a free one)"),
    Param("local_broker", str, "auto", "which local broker: auto = the system mosquitto if installed, else iotcore, "
                                      "else amqtt (a last resort that loses messages)", choices=LOCAL_BROKERS),
    Param("chunk_size", int, 64 * 1024, "largest artifact chunk per message (keep under the broker's payload limit)",
          check=_positive),
    Param("tick", float, 1.0, "seconds between rollout decisions", check=_positive),
    Param("timestamp_refresh", float, 3600.0, "seconds between re-signing the timestamp (must be well under its expiry)",
          check=_positive),
    Param("http", str, None, "HOST:PORT to serve the dashboard and its JSON API on (off unless given; a host other "
                             "than 127.0.0.1 / ::1 needs --http-token-file)"),
    Param("http_token_file", str, None, "file holding the token clients on other machines must give (bearer header "
                                        "or the login page)"),
    Param("http_cert", str, None, "TLS certificate (PEM) for the dashboard: https instead of http"),
    Param("http_key", str, None, "TLS private key (PEM) for --http-cert"),
    Param("http_repo", str, None, "HOST:PORT to serve the repository's metadata/ and targets/ on as static files "
                                  "(read-only, no token: devices with [update] repo_url fetch them with range "
                                  "requests; --http-cert / --http-key give it TLS too)"),
    Param("replicas", bool, False, "this service is one of several on the same database (PostgreSQL) and broker: "
                                   "repository requests come through a shared subscription ($share/edgeopt-fleet/...), "
                                   "so each is answered once (the broker must support them: Mosquitto, EMQX, HiveMQ). "
                                   "Whatever this says, one replica at a time runs the controller: the one holding "
                                   "the database's lease"),
    Param("unicast", bool, False, "answer each device's artifact chunks on its own response topic instead of casting "
                                  "them: by default a chunk goes out once, retained on a topic of its own that every "
                                  "device downloading it subscribes to, and leaves the broker 5 minutes after the last "
                                  "request (the broker then holds the artifacts being downloaded)"),
    Param("log_level", str, "info", "log level on stderr", choices=("debug", "info", "warning", "error")),
)
SERVE = {p.name: p for p in SERVE_PARAMS}


def reference_markdown() -> str:
    """The options of ``edgeopt fleet serve`` (docs/fleet.md embeds it; a test checks)."""
    return "\n".join(reference_table(SERVE_PARAMS, name=lambda p: f"`{p.flag}`", header="option")) + "\n"
