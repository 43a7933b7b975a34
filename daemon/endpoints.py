"""Binding ZeroMQ endpoints, ipc:// included, without libzmq's two surprises with socket files.

A grabber on the same host may hand frames over an ``ipc://`` endpoint (a Unix socket: a 26 MB
frame crossed in 4-7 ms where loopback TCP took 8-11, the floors of ``benchmarks/frame_path.py``).
libzmq 4.3, though, binds an ipc path
by unlinking whatever file is there first, so a second daemon started on the same path silently
takes the endpoint from a running one (TCP refuses a port in use), and it leaves its socket file
behind when the socket closes. ``bind`` refuses a path that a live socket answers on and returns
the file it made, which ``SocketFile.remove`` deletes at shutdown if it is still that file.

Connecting to a Unix socket takes write permission on its file, which the service's umask (0027)
withholds from the group: the file is made readable and writable by owner and group (``SOCKET_MODE``),
so that a grabber in the daemon's group can connect; who reaches it is set by the directory's mode
(the systemd unit's RuntimeDirectory, 0750).
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

IPC = "ipc://"
SOCKET_MODE = 0o660


@dataclass(frozen=True)
class SocketFile:
    """The file an ipc:// bind made, known by its inode so that another's file is never removed."""

    path: Path
    inode: int

    def remove(self) -> None:
        try:
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except OSError:  # gone already, or replaced and not ours: nothing to do
            pass


def bind(sock: zmq.Socket[Any], endpoint: str) -> SocketFile | None:
    """``sock.bind(endpoint)``; for an ipc:// path a live socket already answers on, the ZMQError that
    TCP gives for a port in use. Returns the socket file made by an ipc:// bind (None otherwise)."""
    path = socket_path(endpoint)
    if path is not None and in_use(path):
        raise zmq.ZMQError(errno.EADDRINUSE)
    sock.bind(endpoint)
    if path is None:
        return None
    try:
        os.chmod(path, SOCKET_MODE)
        return SocketFile(path, os.stat(path).st_ino)
    except OSError:
        return None


def socket_path(endpoint: str) -> Path | None:
    """The file behind an ipc:// endpoint; None for other transports, wildcards and abstract names
    (which the kernel itself refuses twice)."""
    if not endpoint.startswith(IPC):
        return None
    rest = endpoint[len(IPC) :]
    if not rest or rest == "*" or rest.startswith("@"):
        return None
    return Path(rest)


def in_use(path: Path) -> bool:
    """Whether a live socket accepts connections at ``path`` (a stale file refuses them)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
        except OSError:  # no file, a stale one, not a socket, no permission: bind decides
            return False
    return True
