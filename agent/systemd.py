"""sd_notify over $NOTIFY_SOCKET, by hand: one datagram per message, no dependency.

systemd (``Type=notify``) waits for ``READY=1``, shows ``STATUS=...`` in ``systemctl status``, and
with ``WatchdogSec=`` restarts the service when ``WATCHDOG=1`` stops arriving. The protocol is a
datagram of newline-separated ``KEY=VALUE`` lines to the AF_UNIX socket named by $NOTIFY_SOCKET (a
leading '@' means the abstract namespace). Outside systemd (no $NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("edgeopt.agent.systemd")


class Notifier:
    def __init__(self, enabled: bool = True, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "") if enabled else ""
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval_s = self._watchdog_interval(env) if self.address else None
        self._last_ping = 0.0
        self._sock: socket.socket | None = None

    @staticmethod
    def _watchdog_interval(env) -> float | None:
        """Half the watchdog timeout (systemd's advice), when the watchdog is meant for this process."""
        try:
            usec = int(env.get("WATCHDOG_USEC", "0"))
        except ValueError:
            return None
        pid = env.get("WATCHDOG_PID")
        if usec <= 0 or (pid and pid != str(os.getpid())):
            return None
        return usec / 2e6

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *lines: str) -> bool:
        if not self.address:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError as exc:  # systemd gone or socket not writable: keep running
            log.debug("sd_notify to %r failed: %s", self.address, exc)
            return False

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def reloading(self) -> None:
        self.notify("RELOADING=1", "STATUS=reloading the configuration")

    def watchdog(self, now: float | None = None) -> None:
        """Ping the watchdog when half its timeout has passed; called from the inference loop, so a
        stalled loop stops the pings and systemd restarts the agent."""
        if self.watchdog_interval_s is None:
            return
        now = time.monotonic() if now is None else now
        if now - self._last_ping >= self.watchdog_interval_s:
            self._last_ping = now
            self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
