"""Template, learned and ensemble detectors side by side on synthetic lines, as generated and with harder nuisances.

    python benchmarks/detector_comparison.py --workdir DIR                  # 2048 px, seeds 2026 and 7
    python benchmarks/detector_comparison.py --workdir DIR --seeds 2026 --lines hard
    python benchmarks/detector_comparison.py --workdir DIR --detectors template    # no torch needed

Per (line, seed) it runs the real commands: ``inspectd synth``, ``inspectd fit`` with each
detector (the ensemble resumes the learned fit's finished checkpoints, so both use the same
networks), and ``inspectd evaluate``. Existing datasets, bundles and reports in ``--workdir``
are reused, so an interrupted run continues. Prints a table: image F1, precision, recall,
false-reject rate, AUROC and recall per defect size, and the fit time of each detector.
The learned and ensemble detectors need the 'learned' extra (torch).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

LINES = {
    "easy": [],
    "hard": ["--max-rotation", "1.5", "--max-shift", "24", "--warp", "1.5", "--light", "2.5"],
}
DETECTORS = ("template", "learned", "ensemble")
SIZES = ("<10", "10-50", "50-200", ">200")


def inspectd(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "daemon.cli", *args], check=True)


def run_line(workdir: Path, line: str, seed: int, size: int, steps: int, detectors: list[str]) -> list[dict]:
    data = workdir / f"{line}_{seed}"
    if not (data / "meta.json").exists():
        inspectd("synth", str(data), "--size", str(size), "--seed", str(seed), *LINES[line])
    rows = []
    for detector in detectors:
        model = workdir / f"model_{line}_{seed}_{detector}"
        report = workdir / f"report_{line}_{seed}_{detector}"
        if not (model / "manifest.json").exists():
            argv = ["fit", str(data), "--out", str(model), "--detector", detector, "--steps", str(steps)]
            if detector == "ensemble":  # the learned fit's finished networks
                argv += ["--checkpoint", str(workdir / f"model_{line}_{seed}_learned.ckpt")]
            inspectd(*argv)
        if not (report / "summary.json").exists():
            inspectd("evaluate", str(model), str(data), "--report", str(report), "--backend", "onnxruntime")
        summary = json.loads((report / "summary.json").read_text())
        manifest = json.loads((model / "manifest.json").read_text())
        rows.append(_row(line, seed, detector, summary, manifest))
    return rows


def _row(line: str, seed: int, detector: str, summary: dict, manifest: dict) -> dict:
    image = summary["image"]
    return {
        "line": line,
        "seed": seed,
        "detector": detector,
        "f1": image["f1"],
        "precision": image["precision"],
        "recall": image["recall"],
        "frr": image["false_reject_rate"],
        "auroc": image["auroc"],
        "recall_by_size": {k: summary["per_size"].get(k, {}).get("recall") for k in SIZES},
        "n_by_size": {k: summary["per_size"].get(k, {}).get("n", 0) for k in SIZES},
        "fit_s": manifest.get("fit_seconds"),
    }


def table(rows: list[dict]) -> str:
    head = "| line | seed | detector | F1 | P | R | FRR | AUROC | " + " | ".join(f"R {s}" for s in SIZES) + " | fit s |"
    lines = [head, "|" + "---|" * (9 + len(SIZES))]
    for r in rows:
        sizes = " | ".join("-" if r["recall_by_size"][s] is None else f"{r['recall_by_size'][s]:.2f}" for s in SIZES)
        lines.append(
            f"| {r['line']} | {r['seed']} | {r['detector']} | {r['f1']:.3f} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} | {r['frr']:.3f} | {r['auroc']:.3f} | {sizes} | {r['fit_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="datasets, bundles and reports go here")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--seeds", type=int, nargs="+", default=[2026, 7])
    parser.add_argument("--lines", nargs="+", choices=sorted(LINES), default=["easy", "hard"])
    parser.add_argument("--steps", type=int, default=2000, help="training steps per network")
    parser.add_argument("--detectors", nargs="+", choices=DETECTORS, default=list(DETECTORS))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = [
        row
        for seed in args.seeds
        for line in args.lines
        for row in run_line(args.workdir, line, seed, args.size, args.steps, args.detectors)
    ]
    (args.workdir / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))
    print(f"\n{len(rows)} fits evaluated in {time.time() - started:.0f} s; rows in {args.workdir / 'comparison.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
