"""Offline commands: fit, calibrate, predict, evaluate. Each has ``*_arguments(parser)`` and ``*_main(args)``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from calibration.datasets import list_images, load_dataset, load_test_folder
from engines.bundle import Bundle, rewrite_calibration
from engines.decode import IMAGE_SUFFIXES
from engines.errors import UserError
from engines.inspector import Inspector
from engines.learned_graph import ARCHITECTURES, DEFAULT_ARCHITECTURE
from engines.nonrigid import ALIGNMENTS, DEFAULT_ALIGNMENT
from engines.types import MIN_SIDE, Result


def _backend_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        choices=("auto", "onnxruntime", "tensorrt"),
        default="auto",
        help="inference backend (default auto)",
    )


# -- fit -----------------------------------------------------------------------------------
def fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", type=Path, help="MVTec-layout dataset (train/good used) or a folder of good images")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    parser.add_argument(
        "--detector",
        choices=("template", "learned", "ensemble"),
        default="template",
        help="template (default), learned (needs the 'learned' extra), or ensemble (both, maps combined)",
    )
    parser.add_argument("--roi", type=Path, help="inspection-region mask (PNG, non-zero = inspect, image size)")
    parser.add_argument("--margin", type=int, help="px along the border left out of the region (default: automatic)")
    parser.add_argument(
        "--sensor-mask",
        type=Path,
        help="sensor-frame ignore mask (PNG, image size, non-zero = what the camera shows of itself: left out of "
        "every frame wherever the part sits)",
    )
    parser.add_argument(
        "--no-occluders",
        action="store_true",
        help="do not learn occluders (a fixture reaching in from an image edge) from the good images",
    )
    parser.add_argument("--target-frr", type=float, default=0.005, help="false-reject rate to calibrate for")
    parser.add_argument("--folds", type=int, default=5, help="k for the k-fold calibration on good images")
    parser.add_argument(
        "--leave-one-out",
        action="store_true",
        help="template: score each held-out good with the statistics of all the others (the folds stay for the "
        "local normalisation; see README, held-back seed 9003)",
    )
    parser.add_argument(
        "--core",
        type=int,
        help="tile core side in px, a multiple of 32 (default 512 for the template, 1024 for the networks)",
    )
    parser.add_argument(
        "--max-shift",
        type=float,
        metavar="PX",
        help="registration limit: how far a part may move, fit and run time (default: 4 %% of the longer side)",
    )
    parser.add_argument(
        "--max-rotation",
        type=float,
        default=3.0,
        metavar="DEG",
        help="registration limit: how far a part may turn, fit and run time (default 3)",
    )
    parser.add_argument(
        "--alignment",
        choices=ALIGNMENTS,
        default=DEFAULT_ALIGNMENT,
        help="rigid: the part's pose only; nonrigid: plus a smooth displacement field, for parts that bend; "
        f"auto: nonrigid where the good images bend (default {DEFAULT_ALIGNMENT})",
    )
    parser.add_argument(
        "--augment",
        type=int,
        default=0,
        metavar="K",
        help="K variants of each good image (sub-pixel pose, another good image's lighting) in the statistics",
    )
    parser.add_argument(
        "--shape-scores",
        nargs="?",
        choices=("auto", "on", "off"),
        const="on",
        default="auto",
        help="the blob and line scores beside the fine and coarse (benign thin marks pass, compact and long "
        "defects still count; about 3x the template graph's time per tile); auto (default): kept where the "
        "fit's self-test finds clearly more planted defects with them; a bare --shape-scores means on",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="IMAGE[,IMAGE...]",
        help="good images to leave out of the fit (file names or paths; repeatable); recorded in the manifest",
    )
    parser.add_argument(
        "--exclude-from",
        type=Path,
        metavar="FILE",
        help="a file listing good images to leave out, one per line (e.g. MODEL.fit-report/flagged.txt)",
    )
    learned = parser.add_argument_group("learned and ensemble detectors (need the 'learned' extra: torch)")
    learned.add_argument("--steps", type=int, default=2000, help="training steps per network (default 2000)")
    learned.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the training crops")
    learned.add_argument("--checkpoint", type=Path, help="checkpoint to resume from and write (default: <out>.ckpt)")
    learned.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="training device")
    learned.add_argument(
        "--init-weights",
        type=Path,
        help="start the network from weights on disk (.pt/.pth state dict, a learned .onnx graph or bundle)",
    )
    learned.add_argument(
        "--network",
        choices=tuple(ARCHITECTURES),
        default=DEFAULT_ARCHITECTURE,
        help=f"the network's architecture (default {DEFAULT_ARCHITECTURE}; see README, the learned detector)",
    )


def fit_main(args: argparse.Namespace) -> int:
    from calibration.fit_pipeline import NETWORK_CORE, TEMPLATE_CORE
    from calibration.template_fit import FitConfig, fit_template

    dataset = load_dataset(args.dataset)
    networks = getattr(args, "detector", "template") in ("learned", "ensemble")
    config = FitConfig(
        core=args.core or (NETWORK_CORE if networks else TEMPLATE_CORE),
        folds=args.folds,
        leave_one_out=getattr(args, "leave_one_out", False),
        target_frr=args.target_frr,
        margin_px=args.margin,
        max_shift_px=getattr(args, "max_shift", None),
        max_rotation_deg=getattr(args, "max_rotation", FitConfig.max_rotation_deg),
        alignment=getattr(args, "alignment", DEFAULT_ALIGNMENT),
        occluders=not getattr(args, "no_occluders", False),
        sensor_mask=str(args.sensor_mask) if getattr(args, "sensor_mask", None) else None,
        exclude=_excluded_names(getattr(args, "exclude", []), getattr(args, "exclude_from", None)),
        augment=getattr(args, "augment", 0),
        shape_scores={"on": True, "off": False}.get(getattr(args, "shape_scores", "auto")),
    )
    if networks:
        out = _fit_learned(args, dataset, config)
    else:
        out = fit_template(dataset.train_good, args.out, args.roi, config, progress=_progress())
    bundle = Bundle.load(out)
    cal = bundle.calibration
    print(
        f"{out}: {bundle.detector} model {bundle.bundle_id} for {bundle.geometry.describe()}, "
        f"threshold {cal['threshold']:.3f} ({cal['margin'] * 100:.0f} % above the worst of "
        f"{len(cal['good_scores'])} held-out good scores)"
    )
    excluded = bundle.manifest["training"].get("excluded", [])
    if excluded:
        print(f"excluded from the fit ({len(excluded)}): {', '.join(e['name'] for e in excluded)}")
    from calibration.probes import describe

    for line in describe(cal):
        print(line)
    if "audit" in cal:
        from calibration.audit import audit_lines

        print("\n".join(audit_lines(cal["audit"])))
        print(f"fit report: {cal['audit']['report']}")
    return 0


def _excluded_names(given: list[str], listing: Path | None) -> tuple[str, ...]:
    """--exclude values (comma lists) and --exclude-from lines (blank lines and # comments skipped), in order."""
    names = [n.strip() for value in given for n in value.split(",") if n.strip()]
    if listing is not None:
        try:
            text = listing.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{listing}: not a readable list of images ({exc})") from None
        names += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return tuple(dict.fromkeys(names))


def _fit_learned(args: argparse.Namespace, dataset, config) -> Path:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UserError(
            f"--detector {args.detector}: needs PyTorch for training (pip install 'inspectd[learned]')"
        ) from None
    from calibration.ensemble_fit import fit_ensemble
    from calibration.learned_fit import LearnConfig, fit_learned, network_cost

    learn = LearnConfig(
        steps=args.steps,
        seed=args.seed,
        checkpoint=args.checkpoint,
        device=args.device,
        init=args.init_weights,
        network=args.network,
    )
    fit = fit_ensemble if args.detector == "ensemble" else fit_learned
    out = fit(dataset.train_good, args.out, args.roi, config, learn, progress=_progress())
    params, flops = network_cost(Bundle.load(out).geometry.channels, args.network)
    print(f"{out}: network of {params} parameters, {flops / 1e9:.2f} GFLOP per megapixel")
    return out


# -- predict ---------------------------------------------------------------------------------
def predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="bundle directory")
    parser.add_argument("inputs", type=Path, nargs="+", help="images or folders of images (searched recursively)")
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file, one object per image")
    _backend_argument(parser)


def collect_images(inputs: list[Path]) -> list[Path]:
    """Files as given, folders expanded recursively; a missing path is a user error."""
    found: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found.extend(sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif item.is_file():
            found.append(item)
        else:
            raise UserError(f"{item}: no such image or folder")
    if not found:
        raise UserError(f"{', '.join(map(str, inputs))}: no images found (PNG, TIFF, BMP or JPEG)")
    return found


def prediction_record(path: Path, result: Result) -> dict:
    """The JSON object ``inspectd predict`` writes for one image (``evaluate`` keeps the same records)."""
    return {
        "image": str(path),
        **result.to_dict(),
        "timings_ms": {k: round(v, 1) for k, v in result.timings_ms.items()},
    }


def predict_records(inspector: Inspector, paths: list[Path], desc: str = "predicting") -> Iterator[dict]:
    for path in tqdm(paths, desc=desc, disable=not _progress(), unit="img"):
        yield prediction_record(path, inspector.inspect_path(path))


def predict_main(args: argparse.Namespace) -> int:
    paths = collect_images(args.inputs)
    inspector = Inspector.load(args.model, args.backend)
    with inspector, _atomic_text(args.out) as fh:
        rejects = 0
        for record in predict_records(inspector, paths):
            fh.write(json.dumps(record) + "\n")
            rejects += record["verdict"] == "reject"
    print(f"{args.out}: {len(paths)} images, {rejects} rejected (model {inspector.bundle_id})")
    return 0


class _atomic_text:
    """Write a text file through a temporary sibling; it appears only if everything succeeded."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        self._fh = os.fdopen(fd, "w", encoding="utf-8")
        return self._fh

    def __exit__(self, exc_type, *exc: object) -> None:
        self._fh.close()
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            os.unlink(self._tmp)


# -- calibrate ---------------------------------------------------------------------------------
def calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="bundle directory (rewritten atomically)")
    parser.add_argument("--good", type=Path, required=True, help="folder of good images the fit did not see")
    parser.add_argument(
        "--dataset", type=Path, help="labelled MVTec-layout dataset: adds ROC/PR, F1 and recall thresholds"
    )
    parser.add_argument("--target-frr", type=float, default=0.005, help="false-reject rate for the good-only threshold")
    parser.add_argument("--margin", type=float, default=0.1, help="threshold >= (1 + margin) * worst good score")
    parser.add_argument(
        "--policy", choices=("frr", "f1", "recall"), default="frr", help="which threshold becomes active (default frr)"
    )
    parser.add_argument("--recall", type=float, default=0.99, help="recall target for --policy recall")
    _backend_argument(parser)


def calibrate_main(args: argparse.Namespace) -> int:
    from calibration import metrics
    from calibration.thresholds import good_threshold

    goods = list_images(args.good) if args.good.is_dir() else []
    if len(goods) < 2:
        raise UserError(f"{args.good}: {len(goods)} good images, calibration needs at least 2")
    inspector = Inspector.load(args.model, args.backend)
    with inspector:
        good_scores = np.array([r["score"] for r in predict_records(inspector, goods, "scoring goods")], float)
        if not np.all(np.isfinite(good_scores)):
            bad = [str(p) for p, s in zip(goods, good_scores, strict=True) if not np.isfinite(s)]
            raise UserError(f"{bad[0]}: could not be scored (registration failed?); good images must be inspectable")
        calibration = {**inspector.bundle.calibration, **good_threshold(good_scores, args.target_frr, args.margin)}
        calibration["good_source"] = str(args.good)
        if args.dataset:
            calibration["labelled"] = _labelled_thresholds(inspector, args.dataset, args.recall, metrics)
    if args.policy != "frr":
        if "labelled" not in calibration:
            raise UserError(f"--policy {args.policy}: needs --dataset with labelled defects")
        key = "f1_threshold" if args.policy == "f1" else "recall_threshold"
        calibration["threshold"] = calibration["labelled"][key]
        calibration["policy"] = args.policy
    rewrite_calibration(inspector.bundle, calibration)
    print(f"{args.model}: threshold {calibration['threshold']:.3f} (policy {calibration['policy']})")
    return 0


def _labelled_thresholds(inspector: Inspector, root: Path, recall: float, metrics) -> dict:
    dataset = load_test_folder(root)
    records = list(predict_records(inspector, [s.path for s in dataset.test], "scoring labelled set"))
    labels = np.array([0 if s.is_good else 1 for s in dataset.test])
    scores = np.array([np.inf if r["score"] is None else r["score"] for r in records])
    threshold, f1 = metrics.f1_optimal_threshold(labels, scores)
    return {
        "dataset": str(root),
        "auroc": metrics.image_auroc(labels, scores),
        "f1_threshold": threshold,
        "f1": f1,
        "recall_target": recall,
        "recall_threshold": metrics.recall_target_threshold(labels, scores, recall),
    }


# -- evaluate ------------------------------------------------------------------------------------
def evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="bundle directory")
    parser.add_argument(
        "dataset",
        type=Path,
        help="MVTec-layout dataset with test/<kind>/ (ground_truth/<kind>/ masks optional: pixel metrics need them)",
    )
    parser.add_argument(
        "--report", type=Path, required=True, help="report directory (summary.md, summary.json, per_image.csv, plots)"
    )
    parser.add_argument(
        "--downscale", type=int, metavar="PX", help="also run the downscaled global-score baseline at PX (e.g. 2048)"
    )
    _backend_argument(parser)


def _num(value: object, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def evaluate_main(args: argparse.Namespace) -> int:
    from calibration.figures import require_plotting

    require_plotting()  # before any work: a missing extra must not cost a whole evaluation
    if args.downscale is not None and args.downscale < MIN_SIDE:
        raise UserError(f"--downscale {args.downscale}: expected a side of at least {MIN_SIDE} px (e.g. 2048)")
    from calibration.evaluation import evaluate

    summary = evaluate(args.model, args.dataset, args.report, args.backend, args.downscale, progress=_progress())
    image = summary["image"]
    frr = f"false-reject rate {_num(image['false_reject_rate'])} ({image['fp']} of {summary['n_good']} good rejected)"
    if summary["n_defect"] == 0:
        good = summary["scores"]["good"]
        print(
            f"{args.report}: {summary['n_good']} good images and no defects: {frr}; "
            f"highest score {_num(good['max'])} against threshold {_num(summary['threshold'])}"
        )
    else:
        print(
            f"{args.report}: {summary['n_good']} good and {summary['n_defect']} defect images; "
            f"F1 {_num(image['f1'])}, precision {_num(image['precision'])}, recall {_num(image['recall'])}, "
            f"{frr}, image AUROC {_num(image['auroc'], '.4f')}"
        )
    if summary["pixel"].get("note"):
        print(f"pixel metrics: {summary['pixel']['note']}")
    if "baseline" in summary:
        base = summary["baseline"]
        base_image = base.get("image") or {}
        print(
            f"baseline (downscaled to {base['downscale']} px, global score, threshold chosen on this test set): "
            f"AUROC {_num(base_image.get('auroc'))}, best F1 {_num(base_image.get('f1'))}"
        )
    return 0


def _progress() -> bool:
    return sys.stderr.isatty() or os.environ.get("INSPECTD_PROGRESS") == "1"
