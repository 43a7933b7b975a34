"""Template, learned and ensemble detectors side by side on synthetic lines, as generated and with harder nuisances.

    python benchmarks/detector_comparison.py --workdir DIR                  # 2048 px, seeds 2026 and 7
    python benchmarks/detector_comparison.py --workdir DIR --seeds 2026 --lines hard
    python benchmarks/detector_comparison.py --workdir DIR --detectors template    # no torch needed
    python benchmarks/detector_comparison.py --workdir DIR --lines fixture fixture-hard --seeds 11 12
    python benchmarks/detector_comparison.py --workdir DIR --lines fixture-hard --size 5120 --seeds 11
    python benchmarks/detector_comparison.py --workdir DIR --fit-args=--alignment=nonrigid --tag nonrigid
    python benchmarks/detector_comparison.py --workdir DIR --lines fixture fixture-hard --seeds S --test-good 200

Lines: ``easy`` (synth's defaults), ``hard`` (±1.5 deg, ±24 px, a 6x6-grid warp of 1.5 px,
stronger light), ``fixture`` (one dark fixture bar per image on a random side, 25-55 % of the
border band deep, band vignetting 12-30 %, extra band blur 1.2-2.2 px, and small defects inside
the band: the ``chip`` kind) and ``fixture-hard`` (the fixture line with ±1.5 deg, ±24 px, a
9x9-grid bend of 0.8 px and stronger light). No line uses an ROI: ``fit``'s defaults.

Per (line, seed) it runs the real commands: ``inspectd synth``, ``inspectd fit`` with each
detector (the ensemble resumes the learned fit's finished checkpoints, so both use the same
networks), and ``inspectd evaluate``. Existing datasets, bundles and reports in ``--workdir``
are reused, so an interrupted run continues (``--tag`` keeps the bundles of fits with other
``--fit-args`` apart; another ``--test-good`` count makes its own test set, ``LINE_SEED_goodN``,
and report, and shares the bundles: the training images are the same). Prints two tables:
image F1, precision, recall, false-reject rate (with the good parts rejected of those tested),
AUROC, recall per defect size, fit time and the median predict time per image (registration,
anomaly map, regions; not the decode) with its ratio to the template's on the same line in the
same run; and recall per defect kind. The learned and ensemble detectors need the 'learned' extra
(torch). Timings on a shared machine are only indicative.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

FIXTURE = ["--fixture", "random", "--fixture-depth", "0.25,0.55", "--band-vignette", "0.12,0.30"]
FIXTURE += ["--band-blur", "1.2,2.2", "--kinds", "dot,scratch,stain,missing,extra,smear,chip"]
LINES = {
    "easy": [],
    "hard": ["--max-rotation", "1.5", "--max-shift", "24", "--warp", "1.5", "--light", "2.5"],
    "fixture": FIXTURE,
    "fixture-hard": [*FIXTURE, "--max-rotation", "1.5", "--max-shift", "24", "--bend", "0.8", "--light", "2.5"],
}
DETECTORS = ("template", "learned", "ensemble")
DEFAULT_TEST_GOOD = 40
SIZES = ("<10", "10-50", "50-200", ">200")


def inspectd(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "daemon.cli", *args], check=True)


def run_line(workdir: Path, line: str, seed: int, args: argparse.Namespace) -> list[dict]:
    size_tag = "" if args.size == 2048 else f"_{args.size}"
    # another number of good test images is another test set (same training images: the bundles are shared)
    good_tag = "" if args.test_good == DEFAULT_TEST_GOOD else f"_good{args.test_good}"
    data = workdir / f"{line}_{seed}{size_tag}{good_tag}"
    if not (data / "meta.json").exists():
        counts = ["--test-good", str(args.test_good)]
        inspectd("synth", str(data), "--size", str(args.size), "--seed", str(seed), *counts, *LINES[line])
    made = json.loads((data / "meta.json").read_text())["config"]["test_good"]
    if made != args.test_good:
        raise SystemExit(f"{data}: has {made} good test images, expected {args.test_good} (--test-good); move it away")
    rows = []
    tag = f"{size_tag}{'_' + args.tag if args.tag else ''}"
    for detector in args.detectors:
        model = workdir / f"model_{line}_{seed}{tag}_{detector}"
        report = workdir / f"report_{line}_{seed}{tag}{good_tag}_{detector}"
        if not (model / "manifest.json").exists():
            argv = ["fit", str(data), "--out", str(model), "--detector", detector, "--steps", str(args.steps)]
            if detector == "ensemble":  # the learned fit's finished networks
                argv += ["--checkpoint", str(workdir / f"model_{line}_{seed}{tag}_learned.ckpt")]
            inspectd(*argv, *args.fit_args.split())
        if not (report / "summary.json").exists():
            inspectd("evaluate", str(model), str(data), "--report", str(report), "--backend", "onnxruntime")
        summary = json.loads((report / "summary.json").read_text())
        manifest = json.loads((model / "manifest.json").read_text())
        rows.append(_row(line, seed, detector, summary, manifest))
    template = next((r["predict_ms"] for r in rows if r["detector"] == "template"), None)
    for r in rows:
        r["predict_ratio"] = r["predict_ms"] / template if template else None
    return rows


def _row(line: str, seed: int, detector: str, summary: dict, manifest: dict) -> dict:
    image = summary["image"]
    return {
        "line": line,
        "seed": seed,
        "detector": detector,
        "n_good": summary["n_good"],
        "f1": image["f1"],
        "precision": image["precision"],
        "recall": image["recall"],
        "frr": image["false_reject_rate"],
        "auroc": image["auroc"],
        "recall_by_size": {k: summary["per_size"].get(k, {}).get("recall") for k in SIZES},
        "n_by_size": {k: summary["per_size"].get(k, {}).get("n", 0) for k in SIZES},
        "recall_by_kind": {k: v["recall"] for k, v in summary["per_kind"].items()},
        "fit_s": manifest.get("fit_seconds"),
        "predict_ms": sum(summary.get("timings_ms_median", {}).values()),
        "alignment": manifest.get("fit_config", {}).get("alignment", "rigid"),
    }


def table(rows: list[dict]) -> str:
    sizes_head = " | ".join(f"R {s}" for s in SIZES)
    head = f"| line | seed | detector | F1 | P | R | FRR | AUROC | {sizes_head} | fit s | predict ms | ratio |"
    lines = [head, "|" + "---|" * (11 + len(SIZES))]
    for r in rows:
        sizes = " | ".join("-" if r["recall_by_size"][s] is None else f"{r['recall_by_size'][s]:.2f}" for s in SIZES)
        ratio = "-" if r.get("predict_ratio") is None else f"{r['predict_ratio']:.2f}"
        lines.append(
            f"| {r['line']} | {r['seed']} | {r['detector']} | {r['f1']:.3f} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} | {r['frr']:.3f} ({round(r['frr'] * r['n_good'])}/{r['n_good']}) | "
            f"{r['auroc']:.3f} | {sizes} | {r['fit_s']:.0f} | "
            f"{r['predict_ms']:.0f} | {ratio} |"
        )
    return "\n".join(lines)


def kind_table(rows: list[dict]) -> str:
    kinds = sorted({k for r in rows for k in r["recall_by_kind"]})
    lines = ["| line | seed | detector | " + " | ".join(kinds) + " |", "|" + "---|" * (3 + len(kinds))]
    for r in rows:
        recalls = " | ".join("-" if k not in r["recall_by_kind"] else f"{r['recall_by_kind'][k]:.2f}" for k in kinds)
        lines.append(f"| {r['line']} | {r['seed']} | {r['detector']} | {recalls} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="datasets, bundles and reports go here")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--seeds", type=int, nargs="+", default=[2026, 7])
    parser.add_argument("--lines", nargs="+", choices=sorted(LINES), default=["easy", "hard"])
    parser.add_argument("--steps", type=int, default=2000, help="training steps per network")
    parser.add_argument("--detectors", nargs="+", choices=DETECTORS, default=list(DETECTORS))
    parser.add_argument(
        "--test-good", type=int, default=DEFAULT_TEST_GOOD, help="good test images per line (synth --test-good)"
    )
    parser.add_argument("--fit-args", default="", help="extra arguments for every fit, e.g. --fit-args=--roi=M.png")
    parser.add_argument("--tag", default="", help="names the bundles and reports of fits with other --fit-args")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = [row for seed in args.seeds for line in args.lines for row in run_line(args.workdir, line, seed, args)]
    good_tag = "" if args.test_good == DEFAULT_TEST_GOOD else f"_good{args.test_good}"
    name = f"comparison{'_' + args.tag if args.tag else ''}{good_tag}.json"
    (args.workdir / name).write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))
    print()
    print(kind_table(rows))
    print(f"\n{len(rows)} fits evaluated in {time.time() - started:.0f} s; rows in {args.workdir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
