"""Template, learned and ensemble detectors side by side on synthetic lines, as generated and with harder nuisances.

    python benchmarks/detector_comparison.py --workdir DIR                  # 2048 px, seeds 2026 and 7
    python benchmarks/detector_comparison.py --workdir DIR --seeds 2026 --lines hard
    python benchmarks/detector_comparison.py --workdir DIR --detectors template    # no torch needed
    python benchmarks/detector_comparison.py --workdir DIR --lines fixture fixture-hard --seeds 11 12
    python benchmarks/detector_comparison.py --workdir DIR --lines fixture-hard --size 5120 --seeds 11
    python benchmarks/detector_comparison.py --workdir DIR --fit-args=--alignment=nonrigid --tag nonrigid
    python benchmarks/detector_comparison.py --workdir DIR --lines fixture fixture-hard --seeds S --test-good 200
    python benchmarks/detector_comparison.py --workdir DIR --lines benign --seeds 21 22 --audit 2 --train 15 30 60

Lines: ``easy`` (synth's defaults), ``hard`` (±1.5 deg, ±24 px, a 6x6-grid warp of 1.5 px,
stronger light), ``fixture`` (one dark fixture bar per image on a random side, 25-55 % of the
border band deep, band vignetting 12-30 %, extra band blur 1.2-2.2 px, and small defects inside
the band: the ``chip`` kind), ``fixture-hard`` (the fixture line with ±1.5 deg, ±24 px, a
9x9-grid bend of 0.8 px and stronger light) and ``benign`` (``synth --benign``: good parts carry
short thin marks and a grain that differ from part to part). No line uses an ROI: ``fit``'s
defaults.

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

``--test-good N`` / ``--per-kind N`` size the test set (e.g. 200 good test images to measure a
false-reject rate near 1 %). ``--train N...`` fits on each number of good images (the test set
is the same: the training images are the first N of one line of the largest count).
``--augment K`` fits with ``--augment K`` (K pose and lighting variants of each good image).
``--audit K`` also fits each detector on a companion line whose K training images carry a real
defect (``synth --plant K``) and reports which good images the fit's audit names.
"""

from __future__ import annotations

import argparse
import json
import os
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
    "benign": ["--benign"],
}
DETECTORS = ("template", "learned", "ensemble")
DEFAULT_TEST_GOOD = 40
SIZES = ("<10", "10-50", "50-200", ">200")


def inspectd(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "daemon.cli", *args], check=True)


def dataset(workdir: Path, line: str, seed: int, args: argparse.Namespace) -> tuple[Path, str]:
    """The line's dataset (synthesised once) and the name its bundles go by.

    The dataset's name carries every count that differs from the defaults; the bundles' leaves out
    the number of good test images: another ``--test-good`` is another test set of the same line,
    with the same training images, so it shares the bundles.
    """
    train = max(args.train)
    name = f"{line}_{seed}" + ("" if args.size == 2048 else f"_{args.size}")
    name += (f"_t{train}" if train != 30 else "") + (f"_k{args.per_kind}" if args.per_kind != 10 else "")
    good_tag = "" if args.test_good == DEFAULT_TEST_GOOD else f"_good{args.test_good}"
    data = workdir / f"{name}{good_tag}"
    if not (data / "meta.json").exists():
        counts = ["--train", str(train), "--test-good", str(args.test_good), "--per-kind", str(args.per_kind)]
        inspectd("synth", str(data), "--size", str(args.size), "--seed", str(seed), *counts, *LINES[line])
    made = json.loads((data / "meta.json").read_text())["config"]
    for option, key, wanted in (("--test-good", "test_good", args.test_good), ("--train", "train", train)):
        if made[key] != wanted:
            raise SystemExit(f"{data}: has {made[key]} {key} images, expected {wanted} ({option}); move it away")
    return data, name


def first_images(data: Path, n: int) -> Path:
    """A view of ``data`` whose training set is its first ``n`` good images (links; the same test set)."""
    view = data.with_name(f"{data.name}_first{n}")
    good = view / "train" / "good"
    if not good.is_dir():
        good.mkdir(parents=True)
        for image in sorted((data / "train" / "good").iterdir())[:n]:
            os.symlink(image.resolve(), good / image.name)
        for sub in ("test", "ground_truth"):
            os.symlink((data / sub).resolve(), view / sub)
    return view


def run_line(
    data: Path, workdir: Path, line: str, seed: int, tags: tuple[str, str], args: argparse.Namespace
) -> list[dict]:
    """Fit (bundles named by ``tags[0]``) and evaluate (reports named by ``tags[1]``) each detector on ``data``."""
    rows = []
    fitted, tag = tags
    for detector in args.detectors:
        model = workdir / f"model_{fitted}_{detector}"
        report = workdir / f"report_{tag}_{detector}"
        fit(data, model, detector, workdir / f"model_{fitted}_learned.ckpt", args)
        if not (report / "summary.json").exists():
            inspectd("evaluate", str(model), str(data), "--report", str(report), "--backend", "onnxruntime")
        summary = json.loads((report / "summary.json").read_text())
        manifest = json.loads((model / "manifest.json").read_text())
        rows.append(_row(line, seed, tag, detector, summary, manifest))
    template = next((r["predict_ms"] for r in rows if r["detector"] == "template"), None)
    for r in rows:
        r["predict_ratio"] = r["predict_ms"] / template if template else None
    return rows


def fit(data: Path, model: Path, detector: str, learned_checkpoint: Path, args: argparse.Namespace) -> None:
    if (model / "manifest.json").exists():
        return
    argv = ["fit", str(data), "--out", str(model), "--detector", detector, "--steps", str(args.steps)]
    if detector == "ensemble":  # the learned fit's finished networks
        argv += ["--checkpoint", str(learned_checkpoint)]
    inspectd(*argv, *args.fit_args.split())


def _row(line: str, seed: int, tag: str, detector: str, summary: dict, manifest: dict) -> dict:
    image = summary["image"]
    return {
        "line": line,
        "seed": seed,
        "run": tag,
        "detector": detector,
        "train": manifest["training"]["n_images"],
        "f1": image["f1"],
        "precision": image["precision"],
        "recall": image["recall"],
        "frr": image["false_reject_rate"],
        "n_good": summary["n_good"],
        "auroc": image["auroc"],
        "recall_by_size": {k: summary["per_size"].get(k, {}).get("recall") for k in SIZES},
        "n_by_size": {k: summary["per_size"].get(k, {}).get("n", 0) for k in SIZES},
        "recall_by_kind": {k: v["recall"] for k, v in summary["per_kind"].items()},
        "fit_s": manifest.get("fit_seconds"),
        "predict_ms": sum(summary.get("timings_ms_median", {}).values()),
        "alignment": manifest.get("fit_config", {}).get("alignment", "rigid"),
    }


def audit_line(workdir: Path, line: str, seed: int, args: argparse.Namespace) -> list[dict]:
    """Fit each detector on a companion line whose ``--audit`` training images carry a real defect; who is named?"""
    data = workdir / f"{line}_{seed}{'' if args.size == 2048 else f'_{args.size}'}_plant{args.audit}"
    if not (data / "meta.json").exists():
        argv = ["--test-good", "0", "--per-kind", "0", "--plant", str(args.audit), *LINES[line]]
        inspectd("synth", str(data), "--size", str(args.size), "--seed", str(seed), *argv)
    meta = json.loads((data / "meta.json").read_text())
    truth = {Path(i["path"]).name: i["planted"] for i in meta["images"] if i.get("planted")}
    rows = []
    tag = data.name + (f"_{args.tag}" if args.tag else "")
    for detector in args.detectors:
        model = workdir / f"model_{tag}_{detector}"
        fit(data, model, detector, workdir / f"model_{tag}_learned.ckpt", args)
        audit = json.loads((model / "calibration.json").read_text())["audit"]
        named = [Path(f["name"]).name for f in audit["flagged"]]
        rows.append(
            {
                "line": tag,
                "detector": detector,
                "planted": {k: truth[k] for k in sorted(truth)},
                "named": named,
                "found": sum(n in truth for n in named),
                "clean_named": [n for n in named if n not in truth],
                "threshold": audit["threshold"],
                "threshold_without": audit["threshold_without"],
            }
        )
    return rows


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(rows: list[dict]) -> str:
    sizes_head = " | ".join(f"R {s}" for s in SIZES)
    head = f"| run | detector | train | F1 | P | R | FRR (goods) | AUROC | {sizes_head} | fit s | predict ms | ratio |"
    lines = [head, "|" + "---|" * (12 + len(SIZES))]
    for r in rows:
        sizes = " | ".join(_fmt(r["recall_by_size"][s]) for s in SIZES)
        lines.append(
            f"| {r['run']} | {r['detector']} | {r['train']} | {r['f1']:.3f} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} | {r['frr']:.3f} ({round(r['frr'] * r['n_good'])}/{r['n_good']}) | {r['auroc']:.4f} | "
            f"{sizes} | {r['fit_s']:.0f} | "
            f"{r['predict_ms']:.0f} | {_fmt(r.get('predict_ratio'))} |"
        )
    return "\n".join(lines)


def kind_table(rows: list[dict]) -> str:
    kinds = sorted({k for r in rows for k in r["recall_by_kind"]})
    lines = ["| run | detector | " + " | ".join(kinds) + " |", "|" + "---|" * (2 + len(kinds))]
    for r in rows:
        recalls = " | ".join(_fmt(r["recall_by_kind"].get(k)) for k in kinds)
        lines.append(f"| {r['run']} | {r['detector']} | {recalls} |")
    return "\n".join(lines)


def audit_table(rows: list[dict]) -> str:
    lines = [
        "| line | detector | planted (kind) | named by the audit | planted named | clean named | threshold (without) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        planted = ", ".join(f"{k} ({v})" for k, v in r["planted"].items())
        lines.append(
            f"| {r['line']} | {r['detector']} | {planted} | {', '.join(r['named']) or '-'} | "
            f"{r['found']} of {len(r['planted'])} | {len(r['clean_named'])} | "
            f"{r['threshold']:.2f} / {r['threshold_without']:.2f} |"
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
    parser.add_argument("--train", type=int, nargs="+", default=[30], help="good images to fit on (one run each)")
    parser.add_argument(
        "--test-good", type=int, default=DEFAULT_TEST_GOOD, help="good test images per line (synth --test-good)"
    )
    parser.add_argument("--per-kind", type=int, default=10, help="test images per defect kind (synth --per-kind)")
    parser.add_argument("--audit", type=int, default=0, metavar="K", help="also audit a line with K planted defects")
    parser.add_argument("--fit-args", default="", help="extra arguments for every fit, e.g. --fit-args=--roi=M.png")
    parser.add_argument("--tag", default="", help="names the bundles and reports of fits with other --fit-args")
    parser.add_argument("--augment", type=int, default=0, metavar="K", help="fit with --augment K (tagged augK)")
    args = parser.parse_args()
    if args.augment:  # shorthand for --fit-args=--augment=K --tag augK
        args.fit_args = f"{args.fit_args} --augment {args.augment}".strip()
        args.tag = "_".join(t for t in (args.tag, f"aug{args.augment}") if t)
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows, audits = [], []
    suffix = f"_{args.tag}" if args.tag else ""
    for seed in args.seeds:
        for line in args.lines:
            data, name = dataset(args.workdir, line, seed, args)
            for n in sorted(args.train):
                view = data if n == max(args.train) else first_images(data, n)
                first = "" if n == max(args.train) else f"_first{n}"
                tags = (f"{name}{first}{suffix}", f"{view.name}{suffix}")
                rows += run_line(view, args.workdir, line, seed, tags, args)
            if args.audit:
                audits += audit_line(args.workdir, line, seed, args)
    good_tag = "" if args.test_good == DEFAULT_TEST_GOOD else f"_good{args.test_good}"
    name = f"comparison{suffix}{good_tag}.json"
    (args.workdir / name).write_text(json.dumps({"rows": rows, "audits": audits}, indent=2) + "\n")
    print(table(rows))
    print()
    print(kind_table(rows))
    if audits:
        print()
        print(audit_table(audits))
    print(f"\n{len(rows)} fits evaluated in {time.time() - started:.0f} s; rows in {args.workdir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
