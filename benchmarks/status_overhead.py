"""What the operator page and metrics scraping cost the frame path: end-to-end latency with and without them.

    python benchmarks/status_overhead.py                 # 256 px mono frames, 6 rounds of 120 frames at 10 Hz
    python benchmarks/status_overhead.py --size 512 --rounds 8

Two `inspectd serve` subprocesses on the same fitted bundle and loopback ports:
  bare:      --http ""  (no HTTP server, so no status board and no metrics sink)
  observed:  the status page open in headless Chromium (live SSE updates) and /metrics
             scraped every second, for the whole run.
Frames are paired: each frame goes to one daemon and, half a period later, the same frame
to the other (which goes first alternates), each daemon at ``--rate``; so the load of the
shared machine (other jobs, the browser itself) hits both alike. Latency is measured here:
frame sent to decision received (native protocol, raw frames, loopback TCP). The table
gives, per daemon, the median over rounds of the per-round p50 and p99 and their ratio.
What it isolates is the daemon-side cost (SSE streams, snapshots, thumbnail rendering,
metrics); the browser's own CPU, on the same machine here, loads both daemons.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engines.decode import read_image  # noqa: E402

BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_bundle(size: int, workdir: Path) -> tuple[Path, Path]:
    """A small synthetic line and a template bundle fitted on it (cached in ``workdir``)."""
    from calibration.datasets import load_dataset
    from calibration.synth import SynthConfig, write_dataset
    from calibration.template_fit import FitConfig, fit_template

    data, bundle = workdir / f"line-{size}", workdir / f"bundle-{size}"
    if not data.exists():
        print(f"synthesising a {size} px line in {data} ...", flush=True)
        synth = SynthConfig(size=size, train=8, test_good=4, per_kind=2, kinds=("dot", "scratch"), workers=1)
        write_dataset(data, synth, progress=False)
    if not bundle.exists():
        print(f"fitting {bundle} ...", flush=True)
        fit_template(
            load_dataset(data).train_good, bundle, config=FitConfig(core=min(256, size), folds=4), progress=False
        )
    return data, bundle


class Daemon:
    """`inspectd serve` on loopback; ``http`` None runs it without the HTTP server."""

    def __init__(self, bundle: Path, http: bool, log: Path) -> None:
        self.frames = f"tcp://127.0.0.1:{free_port()}"
        self.decisions = f"tcp://127.0.0.1:{free_port()}"
        self.http = f"127.0.0.1:{free_port()}" if http else ""
        argv = [sys.executable, "-m", "daemon.cli", "serve", "--model", str(bundle), "--backend", "onnxruntime"]
        argv += ["--frames", self.frames, "--decisions", self.decisions, "--http", self.http]
        argv += ["--cycle-ms", "1000", "--log-format", "json"]
        self._log = log.open("w")
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.connect(self.frames)
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.connect(self.decisions)

    def wait_ready(self, image: np.ndarray, timeout_s: float = 300) -> None:
        """Probe with frames until one is decided (works with and without HTTP)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"daemon exited with {self.proc.returncode}; see {self._log.name}")
            self.send(-1, image)
            if self.sub.poll(1000):
                while self.sub.poll(200):
                    self.sub.recv_multipart()
                return
        raise SystemExit("daemon did not become ready")

    def send(self, frame_id: int, image: np.ndarray) -> None:
        header = {
            "v": 1,
            "frame_id": frame_id,
            "camera_id": "bench",
            "width": image.shape[1],
            "height": image.shape[0],
            "channels": 1 if image.ndim == 2 else 3,
            "dtype": str(image.dtype),
            "encoding": "raw",
        }
        self.push.send_multipart([json.dumps(header).encode(), image.tobytes()])

    def _receive(self, got: dict[int, float], timeout_s: float) -> None:
        if self.sub.poll(int(timeout_s * 1000)):
            while True:
                try:
                    _, body = self.sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    return
                got[json.loads(body)["frame_id"]] = time.perf_counter()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.ctx.destroy(linger=0)
        self._log.close()


def paired_round(daemons: list[Daemon], images: list[np.ndarray], rate_hz: float, first_id: int) -> list[list[float]]:
    """Each frame to both daemons, half a period apart; returns each daemon's latencies (ms)."""
    sent: list[dict[int, float]] = [{} for _ in daemons]
    got: list[dict[int, float]] = [{} for _ in daemons]
    half = 0.5 / rate_hz
    start = time.perf_counter()
    for i, image in enumerate(images):
        order = [0, 1] if i % 2 == 0 else [1, 0]
        for slot, d in enumerate(order):
            due = start + (2 * i + slot) * half
            while (now := time.perf_counter()) < due:
                for k, daemon in enumerate(daemons):
                    daemon._receive(got[k], 0 if k else min(due - now, 0.005))
            sent[d][first_id + i] = time.perf_counter()
            daemons[d].send(first_id + i, image)
    end = time.monotonic() + 10
    while any(len(g) < len(s) for g, s in zip(got, sent, strict=True)) and time.monotonic() < end:
        for k, daemon in enumerate(daemons):
            daemon._receive(got[k], 0.01)
    return [[(g[f] - s[f]) * 1000 for f in s if f in g] for g, s in zip(got, sent, strict=True)]


class Observer:
    """Chromium on the status page plus a /metrics scraper at 1 Hz, for the whole run."""

    def __init__(self, http: str) -> None:
        from playwright.sync_api import sync_playwright

        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            raise SystemExit("needs the system Chromium (apt-get install chromium)")
        self._pw = sync_playwright().start()
        self._browser = self._pw.chromium.launch(executable_path=chromium, args=BROWSER_ARGS, headless=True)
        self.page = self._browser.new_page(viewport={"width": 1280, "height": 860})
        self.page.goto(f"http://{http}/")
        self.page.wait_for_function("document.getElementById('conn').textContent === 'live'", timeout=10_000)
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._scrape, args=(http,), daemon=True)
        self._thread.start()

    def _scrape(self, http: str) -> None:
        while not self._stop.wait(1.0):
            with urllib.request.urlopen(f"http://{http}/metrics", timeout=5) as response:
                response.read()
            self.scrapes += 1

    def counters(self) -> str:
        return f"pass {self.page.text_content('#t_pass')} reject {self.page.text_content('#t_reject')}"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._browser.close()
        self._pw.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="frame size in pixels (square, mono uint8)")
    parser.add_argument("--rounds", type=int, default=6, help="paired rounds")
    parser.add_argument("--frames", type=int, default=120, help="frames per round")
    parser.add_argument("--rate", type=float, default=10.0, help="frames per second")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "inspectd-bench")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    data, bundle = prepare_bundle(args.size, args.workdir)
    paths = sorted((data / "test").rglob("*.png"))
    images = [read_image(p) for p in paths]
    frames = [images[i % len(images)] for i in range(args.frames)]
    print(
        f"{len(images)} test images ({args.size}x{args.size} mono uint8), {args.frames} frames per round at "
        f"{args.rate:g} Hz to each daemon, {args.rounds} paired rounds",
        flush=True,
    )

    bare = Daemon(bundle, http=False, log=args.workdir / "bare.log")
    observed = Daemon(bundle, http=True, log=args.workdir / "observed.log")
    observer = None
    results: dict[str, list[tuple[float, float]]] = {"bare": [], "observed": []}
    try:
        bare.wait_ready(frames[0])
        observed.wait_ready(frames[0])
        observer = Observer(observed.http)
        next_id = 0
        for r in range(args.rounds):
            lats = paired_round([bare, observed], frames, args.rate, next_id)
            next_id += len(frames)
            for name, lat in zip(("bare", "observed"), lats, strict=True):
                if len(lat) < len(frames):
                    print(f"  {name}: {len(frames) - len(lat)} decisions missing", flush=True)
                p50, p99 = float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
                results[name].append((p50, p99))
                print(f"  round {r + 1} {name:8s} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms", flush=True)
        print(f"page counters at the end: {observer.counters()}; metrics scrapes: {observer.scrapes}")
    finally:
        if observer is not None:
            observer.stop()
        bare.stop()
        observed.stop()

    med = {name: np.median(np.array(v), axis=0) for name, v in results.items()}
    print()
    print("| daemon | median p50 (ms) | median p99 (ms) |")
    print("|---|---|---|")
    for name in ("bare", "observed"):
        print(f"| {name} | {med[name][0]:.2f} | {med[name][1]:.2f} |")
    ratio50 = med["observed"][0] / med["bare"][0]
    ratio99 = med["observed"][1] / med["bare"][1]
    print(f"| observed / bare | {ratio50:.3f} | {ratio99:.3f} |")
    print(f"\np99 overhead: {100 * (ratio99 - 1):+.1f} % (target: at most +5 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
