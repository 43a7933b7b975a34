"""systemd notifications (Type=notify): READY=1, STATUS=..., WATCHDOG=1, STOPPING=1.

The protocol is one datagram per message to the AF_UNIX socket named by $NOTIFY_SOCKET
(a leading ``@`` means the abstract namespace). Without $NOTIFY_SOCKET every call is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping


class Notifier:
    """Sends sd_notify messages; silent when not started by systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        # Ping at half the watchdog period, as sd_watchdog_enabled(3) recommends.
        self.watchdog_s = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else 0.0

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, *lines: str) -> None:
        if not self._address:
            return
        # systemd gone or socket unreachable: nothing useful to do
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
            sock.sendto("\n".join(lines).encode(), self._address)
