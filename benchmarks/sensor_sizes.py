"""Fit time, peak memory and predict time of the template detector at real sensor sizes.

    python benchmarks/sensor_sizes.py --workdir DIR        # 1440x1080, 2448x2048, 4096x3000, 5472x3648
    python benchmarks/sensor_sizes.py --workdir DIR --sizes 477x333,1000x750 --train 10

Per size (WIDTHxHEIGHT): a synthetic line (``inspectd synth``: ``--train`` good images to fit,
``--test-good`` good and one image per defect kind to predict), then ``inspectd fit`` and
``inspectd predict`` each in a fresh process, so each one's wall time and peak resident
memory are its own (``os.wait4``). Predict time is the median per image of the stages the
records report (decode, registration, anomaly map, regions). The table gives the figures per
megapixel and as ratios to the first size, measured in the same run. Data, bundles and
predictions stay in ``--workdir`` and are reused: delete a size's folder to measure it again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = "1440x1080,2448x2048,4096x3000,5472x3648"


@dataclass
class Measured:
    """What one size cost: fit wall time and peak memory, predict time per image and peak memory."""

    width: int
    height: int
    fit_s: float
    fit_peak_mb: float
    predict_ms: float  # median over the test images
    predict_p90_ms: float
    predict_peak_mb: float
    images: int
    verdicts: dict[str, int]

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """Parse "1440x1080,2448x2048" into [(1440, 1080), (2448, 2048)]: (width, height) pairs."""
    sizes = []
    for item in text.split(","):
        width, _, height = item.strip().lower().partition("x")
        if not (width.isdigit() and height.isdigit()):
            raise SystemExit(f"--sizes: {item!r} is not WIDTHxHEIGHT")
        sizes.append((int(width), int(height)))
    return sizes


def run_measured(argv: list[str], log: Path) -> tuple[float, float]:
    """Run ``inspectd argv`` in a fresh process; (wall seconds, its peak resident memory in MB)."""
    command = [sys.executable, "-m", "daemon.cli", *argv]
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"inspectd {' '.join(argv)} failed ({proc.returncode}); see {log}")
    return seconds, usage.ru_maxrss / 1024


def measure_size(width: int, height: int, workdir: Path, train: int, test_good: int, seed: int) -> Measured:
    """Synthesise (once), fit and predict one size; every step's output stays in ``workdir``."""
    root = workdir / f"{width}x{height}"
    root.mkdir(parents=True, exist_ok=True)
    data, model, preds = root / "data", root / "model", root / "predictions.jsonl"
    if not data.exists():
        print(f"{width}x{height}: synthesising {train} + {test_good + 2} images ...", flush=True)
        synth = ["synth", str(data), "--width", str(width), "--height", str(height), "--seed", str(seed)]
        synth += ["--train", str(train), "--test-good", str(test_good), "--per-kind", "1", "--kinds", "dot,stain"]
        run_measured([*synth, "--workers", "2"], root / "synth.log")
    timing = root / "fit.json"
    if not timing.exists():
        print(f"{width}x{height}: fitting ...", flush=True)
        fit_s, fit_mb = run_measured(["fit", str(data), "--out", str(model)], root / "fit.log")
        timing.write_text(json.dumps({"fit_s": fit_s, "fit_peak_mb": fit_mb}))
    fit = json.loads(timing.read_text())
    print(f"{width}x{height}: predicting ...", flush=True)
    argv = ["predict", str(model), str(data / "test"), "--out", str(preds), "--backend", "onnxruntime"]
    _, predict_mb = run_measured(argv, root / "predict.log")
    records = [json.loads(line) for line in preds.read_text().splitlines()]
    totals = sorted(sum(r["timings_ms"].values()) for r in records)
    verdicts: dict[str, int] = {}
    for r in records:
        key = f"{Path(r['image']).parent.name}:{r['verdict']}"
        verdicts[key] = verdicts.get(key, 0) + 1
    return Measured(
        width,
        height,
        fit["fit_s"],
        fit["fit_peak_mb"],
        statistics.median(totals),
        totals[min(len(totals) - 1, int(0.9 * len(totals)))],
        predict_mb,
        len(records),
        verdicts,
    )


def print_table(rows: list[Measured], train: int) -> None:
    first = rows[0]
    print(f"\ntemplate detector, {train} good images to fit, ONNX Runtime on {os.cpu_count()} CPU cores")
    head = (
        f"{'size':>10} {'MP':>5} {'fit s':>7} {'fit peak MB':>12} {'predict ms':>11} {'p90 ms':>7} "
        f"{'predict peak MB':>16} {'fit s/MP':>9} {'predict ms/MP':>14} {'fit x':>6} {'predict x':>10}"
    )
    print(head)
    for m in rows:
        print(
            f"{f'{m.width}x{m.height}':>10} {m.megapixels:>5.1f} {m.fit_s:>7.1f} {m.fit_peak_mb:>12.0f} "
            f"{m.predict_ms:>11.0f} {m.predict_p90_ms:>7.0f} {m.predict_peak_mb:>16.0f} "
            f"{m.fit_s / m.megapixels:>9.1f} {m.predict_ms / m.megapixels:>14.0f} "
            f"{m.fit_s / first.fit_s:>6.2f} {m.predict_ms / first.predict_ms:>10.2f}"
        )
    print("\nverdicts (folder:verdict):")
    for m in rows:
        print(f"  {m.width}x{m.height}: {', '.join(f'{k} {v}' for k, v in sorted(m.verdicts.items()))}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="data, bundles and logs (reused between runs)")
    parser.add_argument("--sizes", default=SIZES, help=f"comma list of WIDTHxHEIGHT (default {SIZES})")
    parser.add_argument("--train", type=int, default=30, help="good images to fit (default 30)")
    parser.add_argument("--test-good", type=int, default=4, help="good test images to predict (default 4)")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args(argv)
    rows = [measure_size(w, h, args.workdir, args.train, args.test_good, args.seed) for w, h in parse_sizes(args.sizes)]
    print_table(rows, args.train)
    return 0


if __name__ == "__main__":
    sys.exit(main())
