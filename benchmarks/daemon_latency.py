"""Daemon latency and overload soak, against a real fitted bundle and a real `inspectd serve` process.

    python benchmarks/daemon_latency.py                      # 5120x5120 mono, the target geometry
    python benchmarks/daemon_latency.py --size 512 --soak 500  # a quick check
    python benchmarks/daemon_latency.py --width 2448 --height 2048  # another sensor size

1. Bare predict: ``Inspector.inspect`` on the test images in this process (p50/p99/max),
   the reference the daemon's overhead is measured against.
2. Latency: the daemon runs as a subprocess; frames are sent (native protocol, raw, over
   loopback TCP) at ``--load`` times the rate bare predict sustains; latency is frame sent
   to decision received, measured in this process.
3. Overload soak: ``--soak`` frames at twice that rate with deadlines of ``--cycle`` bare
   predict times: every frame must get exactly one decision, none may miss its deadline by
   more than 20 ms, and the daemon's resident memory is reported at start and end.

The bundle is synthesised and fitted in ``--workdir`` (reused on later runs) unless
``--model`` names one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from daemon.sender import Report, send_frames  # noqa: E402
from engines.decode import read_image  # noqa: E402
from engines.inspector import Inspector  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_bundle(width: int, height: int, workdir: Path, core: int) -> tuple[Path, Path]:
    """A synthetic line of ``width`` x ``height`` px and a template bundle fitted on it (cached in ``workdir``)."""
    from calibration.datasets import load_dataset
    from calibration.synth import SynthConfig, write_dataset
    from calibration.template_fit import FitConfig, fit_template

    size = f"{width}x{height}"
    data, bundle = workdir / f"line-{size}", workdir / f"bundle-{size}"
    if not data.exists():
        print(f"synthesising a {size} px line in {data} ...", flush=True)
        synth = SynthConfig(width=width, height=height, train=8, test_good=4, per_kind=1, workers=1)
        write_dataset(data, replace(synth, kinds=("dot", "scratch")))
    if not bundle.exists():
        print(f"fitting {bundle} ...", flush=True)
        # the fit brings a core larger than the image down to it (a multiple of 32)
        fit_template(load_dataset(data).train_good, bundle, config=FitConfig(core=core, folds=4))
    return data, bundle


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, float)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "max": float(a.max()), "n": len(a)}


def bare_predict(bundle: Path, images: list[np.ndarray], backend: str, repeats: int) -> dict[str, float]:
    """Inspector.inspect wall time per frame, after one warm-up frame."""
    times = []
    with Inspector.load(bundle, backend=backend) as inspector:
        inspector.inspect(images[0])
        for i in range(repeats):
            start = time.perf_counter()
            inspector.inspect(images[i % len(images)])
            times.append((time.perf_counter() - start) * 1000)
    return percentiles(times)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Daemon:
    """`inspectd serve` of checkout ``repo`` as a subprocess on loopback ports."""

    def __init__(
        self,
        bundle: Path,
        backend: str,
        cycle_ms: float,
        queue_depth: int,
        log: Path,
        repo: Path = REPO,
        launcher: list[str] | None = None,
        transport: str = "tcp",
    ) -> None:
        """``launcher``: what runs ``serve`` with the arguments after it (default ``python -m daemon.cli serve``);
        given, the daemon's stdin and stdout are pipes (``served.py`` answers commands on them). ``transport``:
        ``tcp`` (loopback ports), ``ipc`` (Unix sockets in a directory removed at ``stop``) or ``shm`` (ipc, and
        the frames in the daemon's shared-memory slots: ``frames_shm``, a checkout that has them)."""
        self._sockets_dir = tempfile.mkdtemp(prefix="inspectd-ipc-") if transport in ("ipc", "shm") else None
        self.shm = f"{self._sockets_dir}/slots" if transport == "shm" else None
        if self._sockets_dir is not None:
            self.frames = f"ipc://{self._sockets_dir}/frames"
            self.decisions = f"ipc://{self._sockets_dir}/decisions"
        else:
            self.frames = f"tcp://127.0.0.1:{free_port()}"
            self.decisions = f"tcp://127.0.0.1:{free_port()}"
        self.http = f"127.0.0.1:{free_port()}"
        argv = launcher or [sys.executable, "-m", "daemon.cli", "serve"]
        argv += ["--model", str(bundle), "--backend", backend]
        argv += ["--frames", self.frames, "--decisions", self.decisions, "--http", self.http]
        argv += ["--cycle-ms", f"{cycle_ms:.0f}", "--queue-depth", str(queue_depth), "--log-format", "json"]
        self._log = log.open("w")
        env = {**os.environ, "PYTHONPATH": str(repo)}  # another checkout (frame_path.py's baseline) runs its own code
        if self.shm:
            env["INSPECTD_FRAMES_SHM"] = self.shm
        if launcher:  # served.py: commands on stdin, answers on stdout, the daemon's log on stderr
            pipe = subprocess.PIPE
            self.proc = subprocess.Popen(argv, cwd=repo, env=env, stdin=pipe, stdout=pipe, stderr=self._log, text=True)
        else:
            self.proc = subprocess.Popen(argv, cwd=repo, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 600) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"daemon exited with {self.proc.returncode}; see {self._log.name}")
            try:
                with urllib.request.urlopen(f"http://{self.http}/readyz", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit("daemon did not become ready")

    def ask(self, **cmd: object) -> dict:
        """One command to a ``served.py`` daemon, its one-line JSON answer."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"daemon exited with {self.proc.wait()}; see {self._log.name}")
        return json.loads(line)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self._log.close()
        if self._sockets_dir is not None:
            shutil.rmtree(self._sockets_dir, ignore_errors=True)
        return code


def _sample_rss(pid: int, samples: list[float], done: threading.Event, every_s: float = 1.0) -> None:
    """Resident memory once a second while the soak runs: flat means no growth per frame."""
    while not done.wait(every_s):
        samples.append(rss_mb(pid))


def _quarters(samples: list[float]) -> list[float]:
    """Median RSS in each quarter of the soak."""
    if len(samples) < 4:
        return samples
    n = len(samples)
    return [float(np.median(samples[i * n // 4 : (i + 1) * n // 4])) for i in range(4)]


def run(
    daemon: Daemon, images: list[tuple[str, np.ndarray]], count: int, rate: float, deadline_ms: float | None
) -> Report:
    extra = None
    if deadline_ms is not None:
        extra = lambda i: {"deadline_ns": time.time_ns() + int(deadline_ms * 1e6)}  # noqa: E731
    return send_frames(
        images,
        endpoint=daemon.frames,
        decisions=daemon.decisions,
        rate_hz=rate,
        count=count,
        camera_id="bench",
        timeout_s=max(30.0, 3 * (deadline_ms or 0) / 1000),
        header_extra=extra,
        shm=daemon.shm,
    )


def latencies(report: Report) -> list[float]:
    return [(report.received_ns[k] - report.sent_ns[k]) / 1e6 for k in report.decisions if k in report.sent_ns]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=5120, help="square image side in px (default 5120)")
    parser.add_argument("--width", type=int, help="image width in px (default --size)")
    parser.add_argument("--height", type=int, help="image height in px (default --size)")
    parser.add_argument("--model", type=Path, help="an existing bundle (default: synthesise and fit one)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench"), help="where data and bundles are cached")
    parser.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt"))
    parser.add_argument("--core", type=int, default=1024, help="tile core for a fitted bundle")
    parser.add_argument("--bare", type=int, default=10, help="bare predict repetitions")
    parser.add_argument("--frames", type=int, default=30, help="frames in the latency run")
    parser.add_argument("--load", type=float, default=0.7, help="latency run rate as a fraction of bare throughput")
    parser.add_argument("--soak", type=int, default=500, help="frames in the overload soak (0 = skip)")
    parser.add_argument("--cycle", type=float, default=3.0, help="soak deadline in bare-predict p50s")
    parser.add_argument("--queue-depth", type=int, default=4)
    args = parser.parse_args(argv)
    width, height = args.width or args.size, args.height or args.size

    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.model:
        bundle, data = args.model, None
    else:
        data, bundle = prepare_bundle(width, height, args.workdir, args.core)
    paths = sorted((data / "test").rglob("*.png")) if data else []
    images = [(str(p.relative_to(data / "test")), read_image(p)) for p in paths]
    if not images:
        raise SystemExit("no test images (give a synthesised line, not --model alone)")
    first = images[0][1]
    geometry = f"{first.shape[1]}x{first.shape[0]}" + (f"x{first.shape[2]}" if first.ndim == 3 else "")

    print(f"bare predict ({args.bare} frames, {geometry}, backend {args.backend}) ...", flush=True)
    bare = bare_predict(bundle, [img for _, img in images], args.backend, args.bare)
    rate = args.load * 1000 / bare["p50"]
    deadline_ms = args.cycle * bare["p50"]
    rows: list[tuple[str, str]] = [
        ("image", f"{geometry} {first.dtype}"),
        ("cpu cores", str(os.cpu_count())),
        ("bare predict p50 / p99 / max (ms)", f"{bare['p50']:.1f} / {bare['p99']:.1f} / {bare['max']:.1f}"),
    ]

    log = args.workdir / f"daemon-{width}x{height}.log"
    daemon = Daemon(bundle, args.backend, cycle_ms=max(1000.0, 5 * bare["p50"]), queue_depth=args.queue_depth, log=log)
    try:
        if args.frames:
            print(f"latency run: {args.frames} frames at {rate:.2f} Hz ...", flush=True)
            report = run(daemon, images, args.frames, rate, None)
            lat = percentiles(latencies(report))
            reasons = Counter(d["reason"] for d in report.decisions.values())
            overhead = 100 * (lat["p50"] / bare["p50"] - 1)
            rows += [
                ("latency run rate (Hz)", f"{rate:.2f} ({args.load:.0%} of bare throughput)"),
                ("end-to-end p50 / p99 / max (ms)", f"{lat['p50']:.1f} / {lat['p99']:.1f} / {lat['max']:.1f}"),
                ("daemon overhead at p50", f"{overhead:+.1f} %"),
                ("latency run decisions", f"{len(report.decisions)}/{report.sent} {dict(reasons)}"),
            ]
        if args.soak:
            soak_rate = 2 * 1000 / bare["p50"]
            print(f"soak: {args.soak} frames at {soak_rate:.2f} Hz, deadline {deadline_ms:.0f} ms ...", flush=True)
            rss_start = rss_mb(daemon.proc.pid)
            samples: list[float] = []
            done = threading.Event()
            sampler = threading.Thread(target=_sample_rss, args=(daemon.proc.pid, samples, done), daemon=True)
            sampler.start()
            report = run(daemon, images, args.soak, soak_rate, deadline_ms)
            done.set()
            sampler.join()
            rss_end = rss_mb(daemon.proc.pid)
            decided = report.decisions.values()
            late = [(d["t_decided_ns"] - d["deadline_ns"]) / 1e6 for d in decided]
            reasons = Counter(d["reason"] for d in decided)
            worst: dict[str, float] = {}
            for d, lateness in zip(decided, late, strict=True):
                worst[d["reason"]] = max(worst.get(d["reason"], -1e9), lateness)
            rows += [
                ("soak rate (Hz) / deadline (ms)", f"{soak_rate:.2f} / {deadline_ms:.0f}"),
                (
                    "soak frames sent / decided / duplicates",
                    f"{report.sent} / {len(report.decisions)} / {report.duplicates}",
                ),
                ("soak reasons", str(dict(reasons))),
                ("soak worst lateness by reason (ms)", ", ".join(f"{k} {v:+.1f}" for k, v in worst.items())),
                ("soak worst lateness vs deadline (ms)", f"{max(late):+.1f} (must be <= +20)"),
                ("soak deadline_met false", str(sum(not d["deadline_met"] for d in decided))),
                ("daemon RSS start / end (MB)", f"{rss_start:.0f} / {rss_end:.0f}"),
                ("daemon RSS by soak quarter (MB)", " / ".join(f"{v:.0f}" for v in _quarters(samples))),
            ]
            ok = report.sent == len(report.decisions) and report.duplicates == 0 and max(late) <= 20
            rows.append(("soak verdict", "PASS" if ok else "FAIL"))
    finally:
        code = daemon.stop()
    rows.append(("daemon exit code", str(code)))
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
