"""``inspectd send``: a camera simulator speaking the native protocol, printing the decisions it gets.

It PUSHes the images of a folder (cycled when ``--count`` is larger) at ``--rate`` frames
per second to the daemon's frame endpoint, subscribes to the decision endpoint for its
own camera id, prints one line per decision as it arrives, and exits 0 once every frame
it sent has been decided (1 if some decision did not arrive within ``--timeout``).
With ``--shm PATH`` it writes each frame into one of the daemon's shared-memory slots
(``daemon/shm.py``) and sends the header alone, as a grabber on the daemon's host would;
a slot is written again only after its frame's decision has arrived.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zmq

from daemon.shm import SlotWriter
from engines.decode import IMAGE_SUFFIXES, read_image
from engines.errors import UserError

DEFAULT_FRAMES = "tcp://127.0.0.1:7700"
DEFAULT_DECISIONS = "tcp://127.0.0.1:7701"
ENCODE_EXT = {"png": ".png", "jpeg": ".jpg", "tiff": ".tiff"}


@dataclass
class Report:
    """What a send run saw: frames sent, decisions received (by frame id) and send times."""

    sent: int = 0
    decisions: dict[Any, dict[str, Any]] = field(default_factory=dict)
    sent_ns: dict[Any, int] = field(default_factory=dict)
    received_ns: dict[Any, int] = field(default_factory=dict)
    duplicates: int = 0

    @property
    def complete(self) -> bool:
        return self.sent == len(self.decisions)


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder of images")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return paths


def encode(image: np.ndarray, encoding: str) -> bytes:
    """The payload for ``image`` in ``encoding`` (raw = the C-order pixel bytes)."""
    if encoding == "raw":
        return np.ascontiguousarray(image).tobytes()
    ok, data = cv2.imencode(ENCODE_EXT[encoding], image)
    if not ok:
        raise UserError(f"cannot encode a {image.dtype} image as {encoding}")
    return data.tobytes()


def frame_header(image: np.ndarray, frame_id: Any, camera_id: str, encoding: str, **extra: Any) -> bytes:
    """The native protocol header (docs/protocol.md) for one frame."""
    header = {
        "v": 1,
        "frame_id": frame_id,
        "camera_id": camera_id,
        "width": image.shape[1],
        "height": image.shape[0],
        "channels": 1 if image.ndim == 2 else image.shape[2],
        "dtype": str(image.dtype),
        "encoding": encoding,
        "t_capture_ns": time.time_ns(),
        **extra,
    }
    return json.dumps(header).encode()


class Camera:
    """A PUSH socket for frames and a SUB socket for this camera's decisions."""

    def __init__(self, endpoint: str, decisions: str, camera_id: str) -> None:
        self.camera_id = camera_id
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.setsockopt(zmq.SNDHWM, 4)
        self.push.setsockopt(zmq.SNDTIMEO, 5000)  # no daemon listening: fail instead of hanging
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, camera_id.encode())
        try:
            self.push.connect(endpoint)
            self.sub.connect(decisions)
        except zmq.ZMQError as exc:
            self.close()
            raise UserError(f"cannot connect to {endpoint} / {decisions}: {exc}") from None
        self.endpoint = endpoint

    def send(self, header: bytes, payload: bytes | memoryview | None) -> None:
        """The header and payload; the header alone when the frame lies in a slot (payload None)."""
        try:
            self.push.send_multipart([header] if payload is None else [header, payload], copy=False)
        except zmq.Again:
            raise UserError(f"{self.endpoint}: no daemon took the frame within 5 s (is it running?)") from None

    def poll(self, report: Report, timeout_ms: int, on_decision: Callable[[dict[str, Any]], None]) -> None:
        """Collect this camera's decisions arriving within ``timeout_ms``."""
        end = time.monotonic() + timeout_ms / 1000
        while True:
            left = max(0, int((end - time.monotonic()) * 1000))
            if not self.sub.poll(left):
                return
            _topic, body = self.sub.recv_multipart()
            decision = json.loads(body)
            if decision.get("camera_id") != self.camera_id:
                continue  # a camera whose name only starts with ours
            if decision["frame_id"] in report.decisions:
                report.duplicates += 1
            report.decisions[decision["frame_id"]] = decision
            report.received_ns[decision["frame_id"]] = time.time_ns()
            on_decision(decision)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def send_frames(
    images: Sequence[tuple[str, np.ndarray]],
    endpoint: str = DEFAULT_FRAMES,
    decisions: str = DEFAULT_DECISIONS,
    rate_hz: float = 5.0,
    count: int | None = None,
    camera_id: str = "sim",
    encoding: str = "raw",
    timeout_s: float = 10.0,
    on_decision: Callable[[dict[str, Any]], None] = lambda d: None,
    header_extra: Callable[[int], dict[str, Any]] | None = None,
    shm: str | None = None,
) -> Report:
    """Send ``count`` frames cycling over ``images`` ((part_id, image) pairs) and gather decisions.

    ``shm``: the daemon's slot socket (``frames_shm``); frames then go through its shared-memory slots."""
    count = len(images) if count is None else count
    if shm and encoding != "raw":
        raise UserError(f"--shm: frames in shared memory are raw, not {encoding}")
    slots = Slots(SlotWriter.connect(shm)) if shm else None
    camera = Camera(endpoint, decisions, camera_id)
    report = Report()
    try:
        time.sleep(0.3)  # let the decision subscription reach the daemon's PUB first
        payloads = [(name, None if slots else encode(img, encoding), img) for name, img in images]
        period = 1.0 / rate_hz if rate_hz > 0 else 0.0
        start = time.monotonic()
        for i in range(count):
            name, payload, img = payloads[i % len(payloads)]
            wait = start + i * period - time.monotonic()
            if wait > 0:
                camera.poll(report, int(wait * 1000), on_decision)
            extra = header_extra(i) if header_extra else {}
            if slots is not None:
                slots.wait_free(camera, report, timeout_s, on_decision)
                report.sent_ns[i] = time.time_ns()  # the copy into the slot counts, as the send does
                extra.update(slots.write(i, img))
            else:
                report.sent_ns[i] = time.time_ns()
            header = frame_header(img, i, camera_id, encoding, part_id=name, **extra)
            camera.send(header, payload)
            report.sent += 1
        end = time.monotonic() + timeout_s
        while not report.complete and time.monotonic() < end:
            camera.poll(report, 100, on_decision)
    finally:
        camera.close()
        if slots is not None:
            slots.writer.close()
    return report


class Slots:
    """The grabber's book of the daemon's slots: which are free, which hold a frame awaiting its decision."""

    def __init__(self, writer: SlotWriter) -> None:
        self.writer = writer
        self.free: deque[int] = deque(range(writer.count))
        self.held: dict[Any, int] = {}  # frame id -> slot

    def write(self, frame_id: Any, image: np.ndarray) -> dict[str, int]:
        index = self.free.popleft()
        self.held[frame_id] = index
        return self.writer.write(index, image)

    def wait_free(
        self, camera: Camera, report: Report, timeout_s: float, on_decision: Callable[[dict[str, Any]], None]
    ) -> None:
        """Return once a slot is free: a frame in one has been decided (UserError after ``timeout_s``)."""
        end = time.monotonic() + timeout_s
        while True:
            for frame_id in [f for f in self.held if f in report.decisions]:
                self.free.append(self.held.pop(frame_id))
            if self.free:
                return
            if time.monotonic() >= end:
                raise UserError(f"no frame slot came free within {timeout_s:g} s (no decisions for the frames in them)")
            camera.poll(report, 100, on_decision)


def format_decision(d: dict[str, Any]) -> str:
    """One human line per decision."""
    score = "-" if d.get("score") is None else f"{d['score']:.2f}"
    extra = f" ({d['detail']})" if d.get("detail") else ""
    n = len(d.get("defects", [])) + d.get("defects_more", 0)
    defects = f", {n} defect{'s' * (n != 1)}" if n else ""
    return (
        f"frame {d['frame_id']:>4} {d.get('part_id') or ''!s:<28} {d['verdict']:<6} {d['reason']:<9} "
        f"score {score:>6} / {d['threshold']:.2f}{defects}  {d['latency_ms']:.1f} ms{extra}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, metavar="DIR", help="folder of images to send (searched recursively)")
    parser.add_argument("--endpoint", default=DEFAULT_FRAMES, help=f"daemon frame endpoint (default {DEFAULT_FRAMES})")
    parser.add_argument(
        "--decisions", default=DEFAULT_DECISIONS, help=f"daemon decision endpoint (default {DEFAULT_DECISIONS})"
    )
    parser.add_argument("--rate", type=float, default=5.0, help="frames per second (default 5; 0 = flat out)")
    parser.add_argument("--count", type=int, help="frames to send (default: each image once; cycles when larger)")
    parser.add_argument("--camera-id", default="sim", help="camera id in the headers (default sim)")
    parser.add_argument("--encoding", choices=("raw", "png", "jpeg", "tiff"), default="raw", help="payload encoding")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the last decisions")
    parser.add_argument(
        "--shm", metavar="PATH", help="the daemon's frames_shm socket: send frames through its shared-memory slots"
    )


def main(args: argparse.Namespace) -> int:
    """Send the folder's images and print each decision; 0 when every frame was decided."""
    if args.count is not None and args.count < 1:
        raise UserError(f"--count: expected at least 1, got {args.count}")
    paths = list_images(args.folder)
    images = [(str(p.relative_to(args.folder)), read_image(p)) for p in paths[: args.count or len(paths)]]
    report = send_frames(
        images,
        endpoint=args.endpoint,
        decisions=args.decisions,
        rate_hz=args.rate,
        count=args.count,
        camera_id=args.camera_id,
        encoding=args.encoding,
        timeout_s=args.timeout,
        on_decision=lambda d: print(format_decision(d), flush=True),
        shm=args.shm,
    )
    verdicts = [d["verdict"] for d in report.decisions.values()]
    print(
        f"sent {report.sent}, decided {len(report.decisions)}: "
        f"{verdicts.count('pass')} pass, {verdicts.count('reject')} reject"
    )
    if not report.complete:
        print(f"missing decisions for {report.sent - len(report.decisions)} frames (is --decisions right?)")
    return 0 if report.complete else 1
