"""Frame slots in shared memory: a grabber on the same host hands a frame over without sending its pixels.

Over loopback TCP a 26 MB frame takes 9-13 ms to cross (4-6 % of a 5120 px frame's predict) and
the daemon's receiving thread a further ~7 ms of system time faulting in a fresh buffer for it;
over ipc 8 ms. With ``frames_shm`` set the daemon owns ``frames_shm_slots`` frame-sized slots of
shared memory and hands them out on a Unix socket at that path; a grabber connected there writes
each frame into a free slot and sends only the native header, naming the slot (docs/protocol.md,
"Frames in shared memory"). The daemon reads the frame where it lies.

Each slot is a sealed memfd: the daemon made it, sized it and sealed its size (``F_SEAL_SHRINK``,
``F_SEAL_GROW``, ``F_SEAL_SEAL``), so nothing a grabber does can shrink it under the daemon's
mapping, which would kill the daemon with SIGBUS on its next read. The grabber receives the file
descriptors over the socket (SCM_RIGHTS) and maps them writable; the daemon maps them read-only.

A slot's first 8 bytes are its sequence word (little-endian uint64), the pixels start at
``OFFSET``. The grabber makes the word odd before it writes a frame and even after, and sends the
even value as ``slot_seq``. It may write into the slot again once the frame's decision is out.
The daemon compares the word with ``slot_seq`` when the frame arrives, when its decision is made
and when the frame is copied for the status page or the audit trail: a grabber that writes too
early changes the word first, so the frame becomes a ``bad_frame`` reject instead of being judged
on pixels of two frames.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from daemon import endpoints
from engines.errors import UserError

log = structlog.get_logger("inspectd.shm")

OFFSET = 4096  # the pixels start one page in; the sequence word has the first page to itself
VERSION = 1
# Linux only (memfd, seals); elsewhere frames_shm is refused at start and nothing else changes.
SEALS = sum(getattr(fcntl, name, 0) for name in ("F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_SEAL"))
HELLO_MAX = 4096  # bytes of the JSON description sent with the descriptors
MAX_SLOTS = 64
ACCEPTS_PER_TURN = 8  # grabbers served per call of ``SlotSocket.serve``
# Page tables filled at mapping, so the first frame in each slot reads (and writes) as fast as the rest.
MAP_SHARED_POPULATED = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


@dataclass(frozen=True)
class SlotFrame:
    """Which slot a frame lies in and the sequence word it was written under."""

    slots: FrameSlots
    index: int
    seq: int

    def changed(self) -> str | None:
        """Why the slot no longer holds this frame (the grabber wrote into it again), or None."""
        return self.slots.check(self.index, self.seq)


class FrameSlots:
    """The daemon's side: ``count`` sealed memfds of ``OFFSET + capacity`` bytes, mapped read-only."""

    def __init__(self, count: int, capacity: int) -> None:
        self.count = count
        self.capacity = capacity
        self._fds: list[int] = []
        self._maps: list[mmap.mmap] = []
        self._words: list[np.ndarray] = []
        if not hasattr(os, "memfd_create") or not hasattr(fcntl, "F_ADD_SEALS"):
            raise UserError("frames_shm: shared-memory frame slots need Linux (memfd with seals)")
        try:
            for index in range(count):
                self._make(index)
        except OSError as exc:
            self.close()
            raise UserError(f"frames_shm: cannot make {count} frame slots of {capacity} bytes: {exc}") from None

    def _make(self, index: int) -> None:
        fd = os.memfd_create(f"inspectd-frame-slot-{index}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self._fds.append(fd)
        os.ftruncate(fd, OFFSET + self.capacity)
        # Its memory now, not at the grabber's first write (a fault per page then, and memory that may not
        # be there): a daemon that cannot have its slots fails at start.
        os.posix_fallocate(fd, 0, OFFSET + self.capacity)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        mapped = mmap.mmap(fd, OFFSET + self.capacity, flags=MAP_SHARED_POPULATED, prot=mmap.PROT_READ)
        self._maps.append(mapped)
        self._words.append(np.frombuffer(mapped, dtype="<u8", count=1))

    @property
    def fds(self) -> list[int]:
        return list(self._fds)

    def hello(self) -> bytes:
        """What a grabber is told with the descriptors: how many slots, where the pixels start, how many bytes fit."""
        return json.dumps({"v": VERSION, "slots": self.count, "offset": OFFSET, "capacity": self.capacity}).encode()

    def word(self, index: int) -> int:
        """The slot's sequence word; -1 (no sequence) once the slots are closed."""
        words = self._words
        return int(words[index][0]) if index < len(words) else -1

    def check(self, index: int, seq: int) -> str | None:
        """None while slot ``index`` still holds the frame written under ``seq``; otherwise why not."""
        now = self.word(index)
        if now == seq:
            return None
        return f"slot {index} holds sequence {now}, the frame was sent as {seq}: the grabber wrote into it too early"

    def take(self, index: Any, seq: Any, nbytes: int) -> tuple[memoryview | None, SlotFrame | None, str]:
        """A read-only view of the frame in slot ``index`` written under ``seq`` (header values, unchecked)."""
        if not _is_int(index) or not 0 <= index < self.count:
            return None, None, f"slot must be an integer in 0-{self.count - 1}, got {str(index)[:40]}"
        if not _is_int(seq) or not 0 <= seq < 2**64:
            return None, None, f"slot_seq must be an integer in 0-2^64-1, got {str(seq)[:40]}"
        if nbytes > self.capacity:
            return None, None, f"frame of {nbytes} bytes does not fit a slot of {self.capacity}"
        why = self.check(index, seq)
        if why:
            return None, None, why
        view = memoryview(self._maps[index])[OFFSET : OFFSET + nbytes]
        return view, SlotFrame(self, index, seq), ""

    def close(self) -> None:
        self._words.clear()
        _unmap(self._maps)
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


class SlotSocket:
    """The Unix socket at ``frames_shm`` that hands the slots' descriptors to each grabber that connects.

    It is polled by the intake thread (``fileno``, then ``serve``), so it needs no thread of its own.
    Like an ipc:// endpoint: a path a live process serves is refused, a stale socket file is taken
    over, the file is group-writable (a grabber in the daemon's group may connect) and removed at close.
    """

    def __init__(self, path: Path, slots: FrameSlots) -> None:
        self.slots = slots
        self.served = 0
        self.failed = 0
        _claim(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(os.fspath(path))
            os.chmod(path, endpoints.SOCKET_MODE)
            self.file = endpoints.SocketFile(path, os.stat(path).st_ino)
            self._sock.listen(8)
            self._sock.setblocking(False)
        except OSError as exc:
            self._sock.close()
            raise UserError(f"frames_shm: cannot listen on {path}: {exc.strerror or exc}") from None

    def fileno(self) -> int:
        return self._sock.fileno()

    def serve(self) -> None:
        """Hand the slots to every grabber waiting to connect (up to ``ACCEPTS_PER_TURN``)."""
        for _ in range(ACCEPTS_PER_TURN):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            with conn:
                try:
                    conn.settimeout(1.0)  # a few hundred bytes and the descriptors: the socket buffer takes them
                    socket.send_fds(conn, [self.slots.hello()], self.slots.fds)
                    self.served += 1
                    log.info("slots_handed_out", slots=self.slots.count, grabbers=self.served)
                except OSError as exc:
                    self.failed += 1
                    log.warning("slots_not_handed_out", error=str(exc))

    def close(self) -> None:
        self._sock.close()
        self.file.remove()


def _claim(path: Path) -> None:
    """Refuse ``path`` when a live process serves it or it is not a socket; remove a stale socket file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"frames_shm: {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise UserError(f"frames_shm: {path} exists and is not a socket; expected a free path for the slot socket")
    if endpoints.in_use(path):
        raise UserError(f"frames_shm: {path} is served by a running process (another daemon?)")
    os.unlink(path)


def _unmap(maps: list[mmap.mmap]) -> None:
    """Close and forget ``maps``; one a frame in flight still references is unmapped when that is collected."""
    for mapped in maps:
        with contextlib.suppress(BufferError):
            mapped.close()
    maps.clear()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SlotWriter:
    """The grabber's side (``inspectd send --shm``, or an integrator's grabber): the slots mapped writable.

    ``write(index, image)`` puts a frame in a slot under a new sequence value and returns the header
    fields that name it; the caller writes into that slot again only after the frame's decision.
    """

    def __init__(self, maps: list[mmap.mmap], offset: int, capacity: int) -> None:
        self._maps = maps
        self.offset = offset
        self.capacity = capacity
        self._words = [np.frombuffer(m, dtype="<u8", count=1) for m in maps]

    @classmethod
    def connect(cls, path: str | Path, timeout_s: float = 5.0) -> SlotWriter:
        """Fetch the slots from the daemon's ``frames_shm`` socket; UserError when that fails."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout_s)
                sock.connect(os.fspath(path))
                message, fds, _flags, _addr = socket.recv_fds(sock, HELLO_MAX, MAX_SLOTS)
        except OSError as exc:
            raise UserError(f"{path}: cannot fetch the daemon's frame slots: {exc.strerror or exc}") from None
        try:
            hello = json.loads(message)
            if hello.get("v") != VERSION or hello.get("slots") != len(fds) or not fds:
                raise ValueError(f"expected version {VERSION} and one descriptor per slot")
            maps = [mmap.mmap(fd, hello["offset"] + hello["capacity"], flags=MAP_SHARED_POPULATED) for fd in fds]
        except (ValueError, TypeError, KeyError, OSError) as exc:
            raise UserError(f"{path}: not an inspectd frame-slot socket ({exc})") from None
        finally:
            for fd in fds:
                os.close(fd)
        return cls(maps, hello["offset"], hello["capacity"])

    @property
    def count(self) -> int:
        return len(self._maps)

    def write(self, index: int, image: np.ndarray) -> dict[str, int]:
        """Copy ``image`` (C order) into slot ``index``; the ``slot`` and ``slot_seq`` header fields for it."""
        data = np.ascontiguousarray(image).reshape(-1).view(np.uint8)
        if data.size > self.capacity:
            raise ValueError(f"a frame of {data.size} bytes does not fit a slot of {self.capacity}")
        word = self._words[index]
        seq = (int(word[0]) // 2 + 1) * 2
        word[0] = seq - 1  # odd: being written (the daemon's checks fail from here on)
        np.frombuffer(self._maps[index], np.uint8, data.size, self.offset)[:] = data
        word[0] = seq
        return {"slot": index, "slot_seq": seq}

    def close(self) -> None:
        self._words.clear()
        _unmap(self._maps)
