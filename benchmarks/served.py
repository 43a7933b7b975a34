"""``inspectd serve`` with bare predict on request, in the daemon's own process.

    python benchmarks/served.py --image-list A.png B.png ... -- SERVE_ARGS...

Runs the daemon exactly as ``inspectd serve SERVE_ARGS`` does (``daemon.server.Server`` in the
main thread), and answers one JSON command per stdin line with one JSON line on stdout:

    {"op": "bare", "count": N}   Inspector.inspect on the listed frames, on the daemon's own engine
                                 (its ONNX Runtime session and tile threads), while no frame is in
                                 flight: wall ms per frame, CPU ms per frame, stage times
                                 ("pause_ms": P idles P ms before each frame, untimed)
    {"op": "threads"}            CPU seconds (user, system) and minor page faults of every thread so far
    {"op": "frames"}             the stage times of each decision published since the last call

Bare predict measured here and the daemon's latency measured around it share the process, its
memory layout, its loaded libraries and its threads, so their ratio carries none of the
process-to-process spread (``process_spread.py``) that a bare figure from another process does.
``frame_path.py --daemon`` starts one of these per checkout and run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

# As `inspectd serve` does before numpy loads (a checkout without it has nothing to prepare).
getattr(importlib.import_module("daemon.cli"), "prepare_environment", lambda command: None)("serve")

from frame_path import _raw, bare_inspect  # noqa: E402 (this script's folder: the bare worker's own loop)


def thread_table() -> dict[str, dict[str, float]]:
    """CPU seconds and minor faults per thread of this process, keyed by Python thread name (or comm)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, dict[str, float]] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:  # the thread ended while we looked
            continue
        comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat.rsplit(")", 1)[1].split()
        name = f"{names.get(int(tid), comm)}#{tid}"
        user, system = int(rest[11]) / tick, int(rest[12]) / tick
        out[name] = {"cpu_s": user + system, "sys_s": system, "minflt": int(rest[7])}
    return out


def record_decisions(outputs_cls: Any) -> list[dict[str, Any]]:
    """Wrap ``Outputs.publish`` so every published decision's stage times and latency are kept (they are not
    in the published JSON); returns the list they go to."""
    kept: list[dict[str, Any]] = []
    publish = outputs_cls.publish

    def recording(self: Any, decision: Any) -> None:
        kept.append({"frame_id": decision.frame_id, "latency_ms": decision.latency_ms, **decision.timings_ms})
        publish(self, decision)

    outputs_cls.publish = recording
    return kept


def apply_knobs(scheduler_mod: Any, status_mod: Any) -> None:
    """Experiment knobs from the environment (``frame_path.py --daemon-env``), applied before the daemon starts.

    SERVED_NICE=COMPUTE/PREPARE  the scheduler's nice increments
    SERVED_RENDER=off            the status page never renders a reject's thumbnail
    SERVED_SWITCH=SECONDS        the interpreter's switch interval instead of the daemon's
    SERVED_GC=freeze             gc.freeze() once warm (before the first bare predict)
    """
    if "SERVED_NICE" in os.environ:
        compute, prepare = (int(v) for v in os.environ["SERVED_NICE"].split("/"))
        scheduler_mod.COMPUTE_NICE, scheduler_mod.PREPARE_NICE = compute, prepare
        scheduler_mod.lower_priority.__defaults__ = (compute,)  # its default was bound at import
    if os.environ.get("SERVED_RENDER") == "off":
        status_mod.render_reject = lambda *args, **kwargs: None
    if "SERVED_SWITCH" in os.environ:
        sys.setswitchinterval(float(os.environ["SERVED_SWITCH"]))
        sys.setswitchinterval = lambda interval: None  # the daemon's own call at startup is ignored


def _wait_idle(server: Any) -> None:
    """Until the daemon is serving with no frame in flight (bare predict must not overlap a frame)."""
    while not server.ready.is_set() or server.scheduler is None or server.scheduler.in_flight:
        time.sleep(0.01)


def serve_commands(server: Any, frames: list[Any], decisions: list[dict[str, Any]]) -> None:
    """The stdin loop (a thread of its own, at the nice of the main thread, like the bare worker's loop)."""
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "bare":
            _wait_idle(server)
            if os.environ.get("SERVED_GC") == "freeze":  # what gc.freeze after warm-up would do
                gc.collect()
                gc.freeze()
            timed = bare_inspect(server.engine, frames, cmd["count"], cmd.get("pause_ms", 0.0))
            reply: dict[str, Any] = timed
        elif cmd["op"] == "threads":
            reply = {"threads": thread_table()}
        elif cmd["op"] == "frames":
            reply = {"frames": decisions[:]}
            del decisions[: len(reply["frames"])]
        else:
            reply = {"error": f"unknown op {cmd['op']}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def main() -> int:
    split = sys.argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-list", nargs="+", type=Path, required=True)
    args = parser.parse_args(sys.argv[1:split])
    from daemon import logging as daemon_logging
    from daemon import outputs as outputs_mod
    from daemon import scheduler as scheduler_mod
    from daemon import server as server_mod
    from daemon import status as status_mod
    from engines.decode import read_image

    frames = [_raw(read_image(p)) for p in args.image_list]
    serve = argparse.ArgumentParser(prog="inspectd serve")
    server_mod.add_arguments(serve)
    cfg = server_mod.config_from_args(serve.parse_args(sys.argv[split + 1 :]))
    daemon_logging.configure(cfg.log_format, cfg.log_level)
    with contextlib.suppress(ImportError):  # as server.main does (a checkout without it: nothing to set)
        importlib.import_module("daemon.heap").keep_frame_blocks()
    apply_knobs(scheduler_mod, status_mod)
    decisions = record_decisions(outputs_mod.Outputs)
    server = server_mod.Server(cfg)
    commands = threading.Thread(target=serve_commands, args=(server, frames, decisions), name="bench-commands")
    commands.daemon = True
    commands.start()
    return server.run()


if __name__ == "__main__":
    sys.exit(main())
