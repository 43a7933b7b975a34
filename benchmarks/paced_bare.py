"""Bare predict back to back against bare predict with the idle gap a daemon below its rate has, in one process.

    python benchmarks/paced_bare.py --model M --images syn5120/test --rounds 6 --pause-ms 90 [--wakeup held off]

The daemon's overhead (``frame_path.py --daemon``) compares its frames, which arrive at 70 % of the
sustainable rate and so leave the process idle for ~30 % of the time, with bare predict run back
to back. This measures what the idle gap alone costs: per round a fresh ``served.py`` daemon (no
frame is sent to it) times bare predict on the same frames in blocks of ``--frames``, back to back
and with ``--pause-ms`` of idle (untimed) before each frame, alternately, three blocks each. Per
round: each kind's block medians, their median, the stage medians, and the ratio paced / back to
back; then the median ratio over rounds. ``--wakeup held off``: each round twice, a fresh daemon
each, holding its CPU wake-up latency request (``daemon/cpu_latency.py``; held throughout, though no
frame comes) and not (``INSPECTD_CPU_WAKEUP_LATENCY_US=-1``), in alternating order; the summary per
state.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemon_latency import Daemon
from frame_path import REPO, _environment, pick_images

KINDS = (("back to back", 0.0), ("paced", None))
# The daemon's environment per state. It gets no frames here, so "held" must not let the request go after
# cpu_wakeup_hold_s without one.
WAKEUP_ENV = {
    "held": {"INSPECTD_CPU_WAKEUP_LATENCY_US": "0", "INSPECTD_CPU_WAKEUP_HOLD_S": "0"},
    "off": {"INSPECTD_CPU_WAKEUP_LATENCY_US": "-1"},
}


def start_daemon(args: argparse.Namespace, paths: list[Path], log: Path, wakeup: str) -> Daemon:
    """A fresh served.py daemon (it inherits the environment) with the wake-up request held or not."""
    launcher = [sys.executable, str(REPO / "benchmarks" / "served.py"), "--image-list", *map(str, paths), "--"]
    with _environment(WAKEUP_ENV[wakeup]):
        return Daemon(args.model, "onnxruntime", 5000.0, 4, log, launcher=launcher)


def one_round(
    args: argparse.Namespace, paths: list[Path], index: int, wakeup: str
) -> dict[str, tuple[float, dict[str, float]]]:
    daemon = start_daemon(args, paths, args.workdir / f"paced-{index}-{wakeup}.log", wakeup)
    blocks: dict[str, list[tuple[float, dict[str, float]]]] = {name: [] for name, _ in KINDS}
    order = KINDS if index % 2 == 0 else KINDS[::-1]  # which kind goes first alternates by round
    try:
        for _ in range(args.blocks):
            for name, pause in order:
                reply = daemon.ask(op="bare", count=args.frames, pause_ms=args.pause_ms if pause is None else pause)
                blocks[name].append((statistics.median(reply["ms"]), reply["stages"]))
    finally:
        daemon.stop()
    out = {}
    for name, got in blocks.items():
        stages = {k: statistics.median(s[k] for _, s in got) for k in got[0][1]}
        out[name] = (statistics.median(ms for ms, _ in got), stages)
        cells = " / ".join(f"{ms:.0f}" for ms, _ in got)
        print(
            f"round {index + 1} {wakeup:<4} {name:<13} blocks {cells} ms, median {out[name][0]:.1f}; stages "
            + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()),
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help="folder of frames (searched recursively)")
    parser.add_argument("--frames", type=int, default=10, help="frames per block")
    parser.add_argument("--blocks", type=int, default=3, help="blocks of each kind per round")
    parser.add_argument("--rounds", type=int, default=6, help="fresh daemons")
    parser.add_argument("--pause-ms", type=float, default=90.0, help="idle before each paced frame (default 90)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/paced"), help="the daemons' logs")
    parser.add_argument(
        "--wakeup", nargs="+", choices=sorted(WAKEUP_ENV), default=["held"], help="the CPU wake-up request's states"
    )
    args = parser.parse_args(argv)
    args.model, args.images = args.model.resolve(), args.images.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = pick_images(args.images, args.frames)
    ratios: dict[str, list[float]] = {w: [] for w in args.wakeup}
    stage_ratios: dict[str, dict[str, list[float]]] = {w: {} for w in args.wakeup}
    fast_ms: dict[str, list[float]] = {w: [] for w in args.wakeup}
    for index in range(args.rounds):
        for wakeup in args.wakeup if index % 2 == 0 else args.wakeup[::-1]:
            got = one_round(args, paths, index, wakeup)
            (fast, fast_stages), (paced, paced_stages) = got["back to back"], got["paced"]
            ratios[wakeup].append(paced / fast)
            fast_ms[wakeup].append(fast)
            for k in fast_stages:
                stage_ratios[wakeup].setdefault(k, []).append(paced_stages[k] / fast_stages[k])
            print(f"round {index + 1} {wakeup}: paced / back to back {paced / fast:.3f}", flush=True)
    print()
    for wakeup in args.wakeup:
        got = ratios[wakeup]
        print(
            f"wake-up request {wakeup}: median over {args.rounds} rounds, paced / back to back: frame "
            f"{statistics.median(got):.3f} ({min(got):.3f}-{max(got):.3f}); "
            + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in stage_ratios[wakeup].items())
            + f"; back to back {statistics.median(fast_ms[wakeup]):.1f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
