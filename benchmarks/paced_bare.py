"""Bare predict back to back against bare predict with the idle gap a daemon below its rate has, in one process.

    python benchmarks/paced_bare.py --model M --images syn5120/test --rounds 6 --pause-ms 90

The daemon's overhead (``frame_path.py --daemon``) compares its frames, which arrive at 70 % of the
sustainable rate and so leave the process idle for ~30 % of the time, with bare predict run back
to back. This measures what the idle gap alone costs: per round a fresh ``served.py`` daemon (no
frame is sent to it) times bare predict on the same frames in blocks of ``--frames``, back to back
and with ``--pause-ms`` of idle (untimed) before each frame, alternately, three blocks each. Per
round: each kind's block medians, their median, the stage medians, and the ratio paced / back to
back; then the median ratio over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemon_latency import Daemon
from frame_path import REPO, pick_images

KINDS = (("back to back", 0.0), ("paced", None))


def one_round(args: argparse.Namespace, paths: list[Path], index: int) -> dict[str, tuple[float, dict[str, float]]]:
    launcher = [sys.executable, str(REPO / "benchmarks" / "served.py"), "--image-list", *map(str, paths), "--"]
    log = args.workdir / f"paced-{index}.log"
    daemon = Daemon(args.model, "onnxruntime", 5000.0, 4, log, launcher=launcher)
    blocks: dict[str, list[tuple[float, dict[str, float]]]] = {name: [] for name, _ in KINDS}
    try:
        for _ in range(args.blocks):
            order = KINDS if index % 2 == 0 else KINDS[::-1]  # which kind goes first alternates by round
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
            f"round {index + 1} {name:<13} blocks {cells} ms, median {out[name][0]:.1f}; stages "
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
    args = parser.parse_args(argv)
    args.model, args.images = args.model.resolve(), args.images.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = pick_images(args.images, args.frames)
    ratios, stage_ratios = [], {}
    for index in range(args.rounds):
        got = one_round(args, paths, index)
        (fast, fast_stages), (paced, paced_stages) = got["back to back"], got["paced"]
        ratios.append(paced / fast)
        for k in fast_stages:
            stage_ratios.setdefault(k, []).append(paced_stages[k] / fast_stages[k])
        print(f"round {index + 1} paced / back to back: {paced / fast:.3f}", flush=True)
    print(
        f"\nmedian over {args.rounds} rounds, paced / back to back: frame {statistics.median(ratios):.3f} "
        f"({min(ratios):.3f}-{max(ratios):.3f}); "
        + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in stage_ratios.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
