"""What another floor on the threshold (``(1 + margin)`` times the worst held-out good score) would have decided.

    python benchmarks/threshold_margin.py --workdir DIR [DIR...] --margins 0.1 0.3 0.5
    python benchmarks/threshold_margin.py --workdir DIR [DIR...] --margins 0.5 --exclude-outliers

Reads the runs ``benchmarks/detector_comparison.py`` left in each ``--workdir``: every report
(``report_RUN_DETECTOR``) and the bundle it evaluated (``model_FIT_DETECTOR``, the run's name without
its ``_goodN`` test-set suffix). Each bundle's calibration keeps its held-out good scores (one per
training image) and target false-reject rate, each report every test image's score, so the
threshold ``calibration.thresholds.good_threshold`` gives at another margin, and the decisions at
it, follow without fitting or inspecting again: an image is rejected when its score is above the
threshold (the bundles' regions count from 1 px, so the image score decides). The bundle's own
margin reproduces the report's verdicts; the script checks that it does and says where not.

Prints per run the worst held-out good score and, per margin, the threshold, the good parts
rejected, the defects missed and F1; then how many runs miss each target (FRR <= 1 %, F1 >= 0.97).
``--exclude-outliers``: the threshold from the held-out goods that are not outlying
(``calibration.thresholds.outlier_scores`` from ``OUTLIER_MIN_RATIO`` times the median) only, as if
the fit had left those images out; runs without an outlying good are read as the bundle's rule reads
them. ``--only-outlying``: list only the runs with an outlying held-out good.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import numpy as np

from calibration.metrics import confusion
from calibration.thresholds import OUTLIER_MIN_RATIO, good_threshold, outlier_scores

FRR_TARGET, F1_TARGET = 0.01, 0.97
TEST_SET = re.compile(r"_good\d+$")  # another test set of the same line shares its bundle


def runs(workdir: Path) -> list[tuple[str, Path, Path]]:
    """(run name, bundle, report) of every evaluated run in ``workdir`` that has its bundle."""
    found = []
    for report in sorted(workdir.glob("report_*")):
        if not (report / "per_image.csv").exists():
            continue
        name, detector = report.name.removeprefix("report_").rsplit("_", 1)
        model = workdir / f"model_{TEST_SET.sub('', name)}_{detector}"
        if (model / "calibration.json").exists():
            found.append((f"{name} ({detector})", model, report))
    return found


def decisions(scores: np.ndarray, defective: np.ndarray, threshold: float) -> dict:
    """Good parts rejected, goods tested, defects missed and F1 at ``threshold`` (``calibration.metrics``'s counts)."""
    c = confusion(defective, scores > threshold)
    return {"frr": c["fp"], "goods": c["fp"] + c["tn"], "missed": c["fn"], "f1": c["f1"]}


def outlying(held: np.ndarray) -> np.ndarray:
    """Which held-out good scores the threshold counts as outlying."""
    return outlier_scores(held, OUTLIER_MIN_RATIO)[2]


def calibration_of(model: Path) -> dict:
    """The bundle's calibration record."""
    return json.loads((model / "calibration.json").read_text())


def held_scores(calibration: dict) -> np.ndarray:
    """The held-out good scores of a calibration record (one per training image)."""
    return np.asarray(calibration["good_scores"], np.float64)


def one_run(
    model: Path, report: Path, margins: list[float], exclude_outliers: bool = False
) -> tuple[float, list[tuple[float, dict]], int]:
    """Worst held-out good score; threshold and decisions per margin (from the goods that are not outlying only,
    with ``exclude_outliers``); images whose verdict the bundle's own threshold does not reproduce."""
    calibration = calibration_of(model)
    held = held_scores(calibration)
    basis = held[~outlying(held)] if exclude_outliers else held
    rows = list(csv.DictReader((report / "per_image.csv").open()))
    scores = np.array([float(r["score"]) for r in rows])
    defective = np.array([r["kind"] != "good" for r in rows])
    own = float(calibration["threshold"])
    mismatched = int(sum((s > own) != (r["verdict"] == "reject") for s, r in zip(scores, rows, strict=True)))
    out = []
    for margin in margins:
        threshold = good_threshold(basis, float(calibration["target_frr"]), margin)["threshold"]
        out.append((threshold, decisions(scores, defective, threshold)))
    return float(held.max()), out, mismatched


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, nargs="+", required=True, help="detector_comparison.py work folders")
    parser.add_argument("--margins", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    parser.add_argument("--exclude-outliers", action="store_true", help="threshold from the non-outlying goods only")
    parser.add_argument("--only-outlying", action="store_true", help="only the runs with an outlying held-out good")
    args = parser.parse_args(argv)
    found = [run for workdir in args.workdir for run in runs(workdir)]
    if not found:
        raise SystemExit(f"{args.workdir[0]}: no evaluated runs (report_*/per_image.csv beside model_*) found")
    if args.only_outlying:
        found = [run for run in found if outlying(held_scores(calibration_of(run[1]))).any()]
    heads = [f"+{m:.0%}: threshold, good rejected, missed, F1" for m in args.margins]
    print("| run | worst held-out | " + " | ".join(heads) + " |")
    print("|---" * (2 + len(heads)) + "|")
    misses = {m: [0, 0, 0, 0] for m in args.margins}  # runs over FRR, runs under F1, good rejected, missed
    for name, model, report in found:
        worst, results, mismatched = one_run(model, report, args.margins, args.exclude_outliers)
        cells = []
        for margin, (threshold, d) in zip(args.margins, results, strict=True):
            frr_miss, f1_miss = d["frr"] > FRR_TARGET * d["goods"], d["f1"] < F1_TARGET
            misses[margin][0] += frr_miss
            misses[margin][1] += f1_miss
            misses[margin][2] += d["frr"]
            misses[margin][3] += d["missed"]
            mark = " *" if frr_miss or f1_miss else ""
            cells.append(f"{threshold:.2f}, {d['frr']}/{d['goods']}, {d['missed']}, {d['f1']:.3f}{mark}")
        note = f" ({mismatched} verdicts not reproduced)" if mismatched else ""
        print(f"| {name}{note} | {worst:.2f} | " + " | ".join(cells) + " |")
    print(f"| runs over {FRR_TARGET:.0%} FRR | | " + " | ".join(str(misses[m][0]) for m in args.margins) + " |")
    print(f"| runs under F1 {F1_TARGET} | | " + " | ".join(str(misses[m][1]) for m in args.margins) + " |")
    print("| good parts rejected, all runs | | " + " | ".join(str(misses[m][2]) for m in args.margins) + " |")
    print("| defects missed, all runs | | " + " | ".join(str(misses[m][3]) for m in args.margins) + " |")
    print("\n* misses a target (FRR <= 1 % of the good test images, F1 >= 0.97)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
