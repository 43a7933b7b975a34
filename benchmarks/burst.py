"""Bursts on a busy machine: is any decision lost between the daemon and a real subscriber?

    python benchmarks/burst.py --workdir DIR                  # 20 bursts of 300 raw 512x512 uint8 frames
    python benchmarks/burst.py --workdir DIR --daemon-repo OLD  # the same against another checkout's daemon

A real ``inspectd serve`` (a 512 px template bundle, synthesised and fitted in ``--workdir``
unless ``--model`` names one) runs as a subprocess on loopback. Another process keeps every
core busy (threads hashing large buffers, which release the GIL). One sender, a PUSH socket,
sends each burst of ``--frames`` raw frames (the synthesised line's test images, cycled) as
fast as it can push; a subscriber in its own process, a SUB socket with the default
high-water mark (1000), counts the decisions. After each burst the script waits until every
frame of the burst is decided (or ``--wait`` seconds pass), then prints per burst: decided,
lost (frames without a decision at the subscriber), duplicated and the reasons; at the end,
the gaps the subscriber saw in the decisions' ``seq`` (the daemon's own numbering, when it
has one) and the daemon's own counts from /metrics. Exit status 0 when nothing was lost or
duplicated.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemon_latency import Daemon, prepare_bundle  # noqa: E402

CAMERA = "burst"


def burn(stop: Any, threads: int) -> None:
    """The other process: ``threads`` threads hashing 8 MB buffers (hashlib releases the GIL) until told to stop."""
    buffer = os.urandom(8 << 20)

    def spin() -> None:
        while not stop.is_set():
            hashlib.sha256(buffer).digest()

    workers = [threading.Thread(target=spin, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    stop.wait()


def subscribe(endpoint: str, out: Any, ready: Any, stop: Any) -> None:
    """The subscriber process: a SUB with the default high-water mark; (frame_id, seq, reason) per decision."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, CAMERA.encode())
    sub.connect(endpoint)
    ready.set()
    while not stop.is_set():
        if sub.poll(100):
            _topic, body = sub.recv_multipart()
            d = json.loads(body)
            out.put((d["frame_id"], d.get("seq"), d["reason"]))
    ctx.destroy(linger=0)


def test_frames(data: Path | None, size: int) -> list[np.ndarray]:
    """The synthesised line's test images (good parts and defects), or flat grey frames with ``--model``."""
    from engines.decode import read_image

    paths = sorted((data / "test").rglob("*.png")) if data else []
    frames = [read_image(p) for p in paths]
    frames = [f for f in frames if f.shape == (size, size) and f.dtype == np.uint8]
    return frames or [np.full((size, size), 100, np.uint8)]


def metrics(http: str) -> dict[str, float]:
    """The daemon's line-output counters, from /metrics."""
    wanted = (
        "inspectd_sink_dropped_total",
        "inspectd_decision_subscriber_stalls_total",
        "inspectd_sink_sent_total",
        "inspectd_healthy",
    )
    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://{http}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(wanted) and ('sink="zmq-pub"' in line or "{" not in line):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench"), help="where data and bundles are cached")
    parser.add_argument("--model", type=Path, help="an existing 512x512 mono uint8 bundle")
    parser.add_argument("--bursts", type=int, default=20)
    parser.add_argument("--frames", type=int, default=300, help="frames per burst")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cycle-ms", type=float, default=200.0)
    parser.add_argument("--burn", type=int, default=os.cpu_count() or 2, help="busy threads in the other process")
    parser.add_argument("--wait", type=float, default=15.0, help="seconds to wait for a burst's last decisions")
    parser.add_argument("--daemon-repo", type=Path, default=REPO, help="run the daemon of this checkout")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    data, bundle = (None, args.model) if args.model else prepare_bundle(args.size, args.workdir, 1024)
    payloads = [frame.tobytes() for frame in test_frames(data, args.size)]

    import daemon_latency

    daemon_latency.REPO = args.daemon_repo.resolve()  # Daemon runs `python -m daemon.cli` in this checkout
    log = args.workdir / "burst-daemon.log"
    daemon = Daemon(bundle, "auto", cycle_ms=args.cycle_ms, queue_depth=4, log=log)
    spawn = mp.get_context("spawn")  # fresh interpreters: nothing of this process's sockets is inherited
    stop = spawn.Event()
    burner = spawn.Process(target=burn, args=(stop, args.burn), daemon=True)
    received: Any = spawn.Queue()
    ready = spawn.Event()
    subscriber = spawn.Process(target=subscribe, args=(daemon.decisions, received, ready, stop), daemon=True)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(daemon.frames)
    rows = []
    seqs: list[int] = []
    try:
        subscriber.start()
        ready.wait(10)
        burner.start()
        time.sleep(1.0)  # the subscription reaches the PUB; the burner is running
        for burst in range(args.bursts):
            ids = range(burst * args.frames, (burst + 1) * args.frames)
            start = time.monotonic()
            for frame_id in ids:
                header = {
                    "v": 1,
                    "frame_id": frame_id,
                    "camera_id": CAMERA,
                    "width": args.size,
                    "height": args.size,
                    "channels": 1,
                    "dtype": "uint8",
                    "encoding": "raw",
                }
                push.send_multipart([json.dumps(header).encode(), payloads[frame_id % len(payloads)]], copy=False)
            pushed_s = time.monotonic() - start
            got: Counter[int] = Counter()
            reasons: Counter[str] = Counter()
            end = time.monotonic() + args.wait
            while len(got) < args.frames and time.monotonic() < end:
                try:
                    frame_id, seq, reason = received.get(timeout=0.2)
                except Exception:
                    continue
                got[frame_id] += 1
                reasons[reason] += 1
                if seq is not None:
                    seqs.append(seq)
            time.sleep(0.2)  # late duplicates, if any
            while not received.empty():
                frame_id, seq, reason = received.get()
                got[frame_id] += 1
                if seq is not None:
                    seqs.append(seq)
            decided = sum(1 for i in ids if got[i])
            duplicated = sum(n - 1 for n in got.values() if n > 1)
            rows.append((burst + 1, args.frames, decided, args.frames - decided, duplicated, pushed_s, dict(reasons)))
            print(f"burst {burst + 1:2d}: decided {decided}/{args.frames} ...", flush=True)
        counts = metrics(daemon.http)
    finally:
        stop.set()
        ctx.destroy(linger=0)
        code = daemon.stop()
        burner.join(5)
        subscriber.join(5)
    seqs.sort()
    seq_gaps = sum(b - a - 1 for a, b in itertools.pairwise(seqs) if b > a + 1) if seqs else None

    print()
    print(
        f"daemon: {args.daemon_repo.resolve().name} checkout, cycle {args.cycle_ms:g} ms, queue_depth 4; "
        f"{args.burn} busy threads in another process on {os.cpu_count()} cores; {args.size}x{args.size} uint8 raw"
    )
    print("| burst | sent | decided | lost | duplicated | hand-off to the PUSH socket (s) | reasons |")
    print("|---|---|---|---|---|---|---|")
    for burst, sent, decided, lost, dup, pushed, reasons in rows:
        text = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
        print(f"| {burst} | {sent} | {decided} | {lost} | {dup} | {pushed:.2f} | {text} |")
    total_lost = sum(r[3] for r in rows)
    total_dup = sum(r[4] for r in rows)
    sent_total = sum(r[1] for r in rows)
    print(f"| all | {sent_total} | {sent_total - total_lost} | {total_lost} | {total_dup} | | |")
    print()
    print(f"gaps in seq seen by the subscriber: {seq_gaps if seq_gaps is not None else 'n/a (no seq)'}")
    print("daemon /metrics at the end: " + ", ".join(f"{k} {v:g}" for k, v in counts.items()))
    print(f"daemon exit code: {code}")
    return 0 if total_lost == 0 and total_dup == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
