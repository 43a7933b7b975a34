"""``inspectd demo``: the whole online path in one command, with no arguments.

Synthesises a small line of aligned parts (512 px), fits a template model on its good
images, starts the daemon in this process on free loopback ports, streams the test
frames (good and defective) through the camera simulator, prints every decision, says
where everything is, and stops the daemon cleanly.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from daemon import logging as daemon_logging
from daemon.config import Config
from daemon.sender import format_decision, send_frames
from daemon.server import Server, load_engine
from engines.decode import read_image
from engines.errors import UserError

SIZE = 512
LOOPBACK = "tcp://127.0.0.1:*"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, help="where to write the line, model and log (default: a new temp dir)")
    parser.add_argument("--rate", type=float, default=5.0, help="frames per second streamed (default 5)")


def build_line(work: Path) -> tuple[Path, Path]:
    """Write the synthetic dataset and fit a model on its good images; returns (dataset, bundle)."""
    from calibration.datasets import load_dataset
    from calibration.synth import SynthConfig, write_dataset
    from calibration.template_fit import FitConfig, fit_template

    data, bundle = work / "line", work / "model"
    print(f"1/4 synthesising a {SIZE} px line of parts in {data} ...", flush=True)
    kinds = ("dot", "scratch", "missing", "stain")
    synth = SynthConfig(size=SIZE, train=12, test_good=6, per_kind=1, kinds=kinds, workers=1)
    write_dataset(data, synth, progress=False)
    print(f"2/4 fitting a template model on {data / 'train' / 'good'} ...", flush=True)
    fit_template(load_dataset(data).train_good, bundle, config=FitConfig(core=256, folds=4), progress=False)
    return data, bundle


def start_daemon(bundle: Path, log_path: Path) -> tuple[Server, threading.Thread]:
    """The daemon on free loopback ports, logging JSON lines to ``log_path``."""
    daemon_logging.configure("json", "info", stream=log_path.open("a"))
    config = replace(
        Config(model=str(bundle)),
        backend="onnxruntime",
        frames_endpoint=LOOPBACK,
        decisions_endpoint=LOOPBACK,
        http_listen="127.0.0.1:0",
        cycle_ms=2000,
        cpu_wakeup_latency_us=-1,  # a demo on someone's workstation leaves its idle policy alone
    ).validate()
    server = Server(config, loader=load_engine)
    thread = threading.Thread(target=lambda: server.run(install_signals=False), name="inspectd-demo", daemon=True)
    thread.start()
    for _ in range(600):
        if server.ready.wait(0.1) or not thread.is_alive():
            break
    if not server.ready.is_set():
        raise UserError(f"the daemon did not start; see {log_path}")
    return server, thread


def main(args: argparse.Namespace) -> int:
    """Run the demo end to end; 0 when every streamed frame got its decision."""
    work = getattr(args, "workdir", None) or Path(tempfile.mkdtemp(prefix="inspectd-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    data, bundle = build_line(work)
    log_path = work / "daemon.log"
    print("3/4 starting the daemon ...", flush=True)
    server, thread = start_daemon(bundle, log_path)
    try:
        frames = sorted((data / "test").rglob("*.png"))
        images = [(str(p.relative_to(data / "test")), read_image(p)) for p in frames]
        print(
            f"4/4 streaming {len(images)} frames to {server.endpoints['frames']} "
            f"(decisions on {server.endpoints['decisions']}); part = test/<kind>/<file>\n",
            flush=True,
        )
        started = time.monotonic()
        report = send_frames(
            images,
            endpoint=server.endpoints["frames"],
            decisions=server.endpoints["decisions"],
            rate_hz=getattr(args, "rate", 5.0),
            camera_id="demo",
            on_decision=lambda d: print("  " + format_decision(d), flush=True),
        )
        elapsed = time.monotonic() - started
    finally:
        server.request_stop()
        thread.join(30)
    decided = list(report.decisions.values())
    missed = [d for d in decided if "good" not in str(d.get("part_id")) and d["verdict"] == "pass"]
    false_rejects = [d for d in decided if "good" in str(d.get("part_id")) and d["verdict"] == "reject"]
    print(
        f"\n{report.sent} frames sent, {len(decided)} decisions in {elapsed:.1f} s: "
        f"{sum(d['verdict'] == 'reject' for d in decided)} rejected "
        f"({len(missed)} defective parts passed, {len(false_rejects)} good parts rejected)\n"
        f"where to look:\n"
        f"  synthetic line   {data}  (test/<kind>/ images, ground_truth/ masks)\n"
        f"  model bundle     {bundle}\n"
        f"  daemon log       {log_path}  (one 'reject' event per reject, 'summary' events)\n"
        f"  run it yourself  inspectd serve --model {bundle}\n"
        f"                   inspectd send {data / 'test'} --rate 5"
    )
    return 0 if report.complete else 1
