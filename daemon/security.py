"""CurveZMQ on the daemon's bound sockets: encryption plus client authentication.

Keys are the files ``zmq.auth.create_certificates`` writes. The daemon loads its own secret
key file (``curve_secret_key``, which holds both its public and secret key) and allows the
clients whose public key files are in ``curve_clients``; pyzmq's ``ThreadAuthenticator``
(a ZAP handler on the daemon's context) refuses every other client during the handshake,
so a refused camera's frames never reach the intake and a refused subscriber gets nothing.
Cameras and subscribers set ``curve_serverkey`` (the daemon's public key) and their own key
pair before connecting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from engines.errors import UserError

log = structlog.get_logger("inspectd.security")


class Curve:
    """Server-side CurveZMQ for one context: ``apply(sock)`` before ``bind``; ``stop()`` at the end."""

    def __init__(self, ctx: zmq.Context[Any], secret_key_file: str, clients_dir: str) -> None:
        try:
            public, secret = zmq.auth.load_certificate(secret_key_file)
        except (OSError, ValueError) as exc:
            raise UserError(f"curve_secret_key: cannot read {secret_key_file}: {exc}") from None
        if not secret:
            raise UserError(f"curve_secret_key: {secret_key_file} holds no secret key (use the .key_secret file)")
        clients = Path(clients_dir)
        if not clients.is_dir() or not any(clients.glob("*.key")):
            raise UserError(f"curve_clients: {clients_dir} is not a directory of client public key files (*.key)")
        self.public_key = public
        self._secret = secret
        self._auth = ThreadAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(clients))
        log.info("curve_enabled", clients=len(list(clients.glob("*.key"))))

    @property
    def thread(self) -> Any:
        """The authenticator's thread (supervised by the server: without it no client gets in)."""
        return self._auth.thread

    def apply(self, sock: zmq.Socket[Any]) -> None:
        sock.curve_secretkey = self._secret
        sock.curve_publickey = self.public_key
        sock.curve_server = True

    def stop(self) -> None:
        self._auth.stop()
