"""Fit the learned detector: a compact FCN conditioned on the registered reference, trained on good tiles.

1. Registration and reference statistics exactly as every fit (``calibration.fit_pipeline``).
2. k-fold statistics: each good image is paired with statistics fitted *without* its fold, so
   the residuals the network learns from are those of parts the reference has not seen (as at
   run time).
3. Two networks are trained from scratch, each on half of the images (cross-fitting), on random
   crops, half of them (``defect_rate``) with a synthetic defect (``calibration.learned_model``),
   supervised to segment it. Seeded, resumable from checkpoints, on the GPU when there is one.
4. Every good image is scored through the real FP32 graph by the network that did not train on
   it (with its fold's statistics), max-pooled to 8 px blocks. From these held-out maps comes
   the learned map's local normalisation (``calibration.tolerance_fit.fit_local_tolerance``: where
   good parts make the network fire, structure edges under pose and the border band, the same
   output counts less) and, cross-fitted over the folds, the threshold (``good_threshold``),
   exactly as the template's fine score is calibrated.
5. The bundle carries the first network as FP32 and FP16 ONNX graphs (``engines.learned_graph``),
   the reference statistics of every good image, the gains and the calibration; inference never
   needs torch. The second network serves the calibration only.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from calibration import fit_pipeline as fp
from calibration import tolerance_fit as tol
from calibration.thresholds import good_threshold
from engines import registration as reg
from engines.bundle import GRAPH_FP16, GRAPH_FP32
from engines.errors import UserError
from engines.learned_graph import (
    DEFAULT_ARCHITECTURE,
    LEGACY_ARCHITECTURE,
    RADIUS,
    LearnedGraphSpec,
    architecture,
    build_learned_graph,
    macs_per_pixel,
)


@dataclass(frozen=True)
class LearnConfig:
    """Training knobs of the learned detector."""

    steps: int = 2000  # per network (NETWORKS are trained)
    batch: int = 8
    patch: int = 128  # px; the network's output on it is patch - 2 * RADIUS
    lr: float = 2e-3
    seed: int = 0
    defect_rate: float = 0.5  # fraction of training crops with a synthetic defect
    hard_rate: float = 0.5  # fraction of crops centred where good parts vary most (widest band: edges, border band)
    pos_weight: float = 5.0  # BCE weight of defect pixels
    checkpoint: Path | None = None  # default: <out>.ckpt next to the bundle
    init: Path | None = None  # start from these weights (state dict, learned graph or bundle) instead of random
    checkpoint_every: int = 200
    device: str = "auto"  # "auto", "cpu", "cuda"
    network: str = DEFAULT_ARCHITECTURE  # engines.learned_graph.ARCHITECTURES


@dataclass
class TrainReport:
    params: int
    flops_per_mpx: float
    steps: int
    resumed_from: int
    final_loss: float
    device: str
    seconds: float
    losses: list[float] = field(default_factory=list)  # mean loss per checkpoint interval

    def describe(self) -> str:
        return (
            f"network: {self.params} parameters ({self.params * 4 / 1024:.1f} KiB FP32), "
            f"{self.flops_per_mpx / 1e9:.2f} GFLOP per megapixel; {self.steps} steps on {self.device}"
            + (f" (resumed at {self.resumed_from})" if self.resumed_from else "")
            + f", final loss {self.final_loss:.4f}"
        )


def network_cost(channels: int, network: str = DEFAULT_ARCHITECTURE) -> tuple[int, float]:
    """(parameters, FLOPs per megapixel of output) of the network."""
    from engines.learned_graph import weight_shapes

    params = sum(int(np.prod(s)) for s in weight_shapes(channels, network).values())
    return params, 2.0 * macs_per_pixel(channels, network) * 1e6


def fit_learned(
    images: Sequence[Path],
    out: Path,
    roi: Path | None = None,
    config: fp.FitConfig | None = None,
    learn: LearnConfig | None = None,
    progress: bool = True,
    workdir: Path | None = None,
) -> Path:
    """Fit, train, calibrate and write a learned bundle to ``out``; returns ``out``."""
    config = config or fp.FitConfig(core=fp.NETWORK_CORE)
    learn = learn or LearnConfig()
    images, excluded = fp.select_training(images, config.exclude)
    out = Path(out)
    started = time.time()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        training, reference, config = fp.prepare_training(images, roi, config, Path(tmp), progress, "learned")
        learned = learn_and_calibrate(training, images, config, learn, out, Path(tmp), progress)
        stats = fp.statistics(training, range(len(images)), config)
        stats["fine_gain"] = learned.tolerance.part_gain.astype(np.float16)
        stats["fine_ring_gain"] = learned.tolerance.ring_gain.astype(np.float16)
        stats["held_out_blocks"] = learned.blocks[:, None].astype(np.float16)
        geo = training.geometry
        spec = LearnedGraphSpec(geo.channels, config.core, input_dtype=fp.graph_input_dtype(geo))
        weights, network = learned.weights, learn.network
        graphs = {
            GRAPH_FP32: lambda p: onnx.save(build_learned_graph(replace(spec, precision="fp32"), weights, network), p),
            GRAPH_FP16: lambda p: onnx.save(build_learned_graph(replace(spec, precision="fp16"), weights, network), p),
        }
        extra = {"learned": learned.manifest(learn)}
        return fp.write_fitted_bundle(
            out,
            "learned",
            training,
            stats,
            reference,
            learned.calibration,
            config,
            images,
            started,
            graphs,
            extra,
            held_out_map=learned.held_out_map,
            excluded=excluded,
        )


NETWORKS = 2  # cross-fitting: image i is scored by network i % NETWORKS, which trained on the others


@dataclass
class LearnedCalibration:
    """A trained network with its calibration from held-out good images."""

    weights: dict[str, np.ndarray]  # the shipped network (the first of the cross-fitted pair)
    reports: list[TrainReport]  # one per network
    calibration: dict  # threshold of the learned map (normalised by its gains)
    tolerance: tol.LocalTolerance  # the learned map's local gains, as the template's fine score has (factor 1)
    blocks: np.ndarray  # [n, Hb, Wb] held-out maps, unnormalised, max-pooled to blocks
    held_out_map: np.ndarray  # [n, Hb, Wb] the same normalised as scored (gains from the other folds)

    def manifest(self, learn: LearnConfig) -> dict:
        report = self.reports[0]
        return {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(learn).items()},
            "receptive_radius": RADIUS,
            "params": report.params,
            "flops_per_mpx": report.flops_per_mpx,
            "networks": [asdict(r) for r in self.reports],
        }


def learn_and_calibrate(
    training: fp.Training,
    images: list[Path],
    config: fp.FitConfig,
    learn: LearnConfig,
    out: Path,
    tmp: Path,
    progress: bool,
    fold_stats: list[dict] | None = None,
) -> LearnedCalibration:
    """Train the cross-fitted networks on registered good images and calibrate the learned map on held-out ones.

    ``fold_stats``: ``fit_pipeline.fold_statistics`` of this training set, when the caller has them.
    """
    geo = training.geometry
    if learn.patch <= 2 * RADIUS + 8:
        raise UserError(f"patch {learn.patch}: must exceed {2 * RADIUS + 8} px (the network's receptive field)")
    if architecture(learn.network).two_scale and learn.patch % 2:
        raise UserError(f"patch {learn.patch}: the {learn.network} network works on 2x2 blocks, give an even size")
    if min(geo.height, geo.width) < learn.patch:
        raise UserError(f"images are {geo.describe()}: smaller than the {learn.patch} px training patch")
    n = len(images)
    fold_stats = fold_stats if fold_stats is not None else fp.fold_statistics(training, config, progress)
    folds = len(fold_stats)
    checkpoint = learn.checkpoint or out.with_name(out.name + ".ckpt")
    data_id = f"{fp.fingerprint(images)['sha256']}:{folds}"
    spec = LearnedGraphSpec(geo.channels, config.core, input_dtype=fp.graph_input_dtype(geo))
    blocks = np.zeros((n, *tol.block_shape(geo)), np.float32)
    nets: list[tuple[dict[str, np.ndarray], TrainReport]] = []
    for net in range(NETWORKS):
        held, trained = fp.fold_members(n, NETWORKS, net)
        net_learn = replace(learn, seed=learn.seed + net)
        net_checkpoint = checkpoint.with_name(f"{checkpoint.name}.net{net}")
        desc = f"training network {net + 1}/{NETWORKS}"
        weights, report = train(
            training, fold_stats, trained, folds, net_learn, net_checkpoint, progress, f"{data_id}:net{net}", desc
        )
        if progress:
            print(report.describe(), file=sys.stderr)
        nets.append((weights, report))
        graph = tmp / f"learned_net{net}.onnx"
        onnx.save(build_learned_graph(spec, weights, learn.network), graph)
        for fold in tqdm(range(folds), desc=f"scoring held-out ({net + 1}/{NETWORKS})", disable=not progress):
            rows = [i for i in held if i % folds == fold]
            if rows:
                blocks[rows] = fp.graph_blocks(training, graph, fold_stats[fold], rows, config.core, 1)[:, 0]
    inside, border = tol.block_inside(training.weight), tol.border_blocks(geo)
    held_out_map = tol.cross_fitted_maps(blocks[:, None], training.poses, inside, border, folds)[:, 0]
    calibration = good_threshold(held_out_map.max(axis=(1, 2)), config.target_frr, config.threshold_margin)
    tolerance = tol.fit_local_tolerance(blocks[:, None], training.poses, inside, border)
    calibration.update(
        folds=folds,
        networks=NETWORKS,
        held_out_raw_max=[round(float(b.max()), 4) for b in blocks],
        local_tolerance=tolerance.summary(inside, border),
    )
    reports = [r for _, r in nets]
    return LearnedCalibration(nets[0][0], reports, calibration, tolerance, blocks, held_out_map)


# -- training ----------------------------------------------------------------------------------------
class _Sampler:
    """Random training crops: registered good crops, their fold's statistics, optional synthetic defect.

    Crops are centred on inspected pixels and may reach past the image border by up to the
    receptive-field radius; outside the image every array is edge-replicated and the lighting
    model extrapolated, exactly as the tile plan pads frames and statistics at run time, so the
    network also learns the border pixels it will score there.
    """

    def __init__(self, training: fp.Training, fold_stats: list[dict], indices: list[int], folds: int, learn):
        self.training, self.fold_stats, self.folds, self.learn = training, fold_stats, folds, learn
        self.indices = indices
        self.full = (training.geometry.height, training.geometry.width)
        self.centres = np.argwhere(training.weight > 0)
        if not len(self.centres):
            raise UserError("the inspection region is empty")
        # Hard negatives: the inspected pixels with the widest band (top 5 %) of the first fold's statistics.
        stats = fold_stats[0]
        width = (stats["hi"].astype(np.float32) - stats["lo"].astype(np.float32)).max(axis=0)
        width = np.where(training.weight > 0, width, -np.inf)
        self.hard = np.argwhere(width >= np.quantile(width[training.weight > 0], 0.95))

    def _origin(self, rng: np.random.Generator) -> tuple[int, int]:
        p = self.learn.patch
        pool = self.hard if rng.random() < self.learn.hard_rate else self.centres
        cy, cx = (int(v) for v in pool[int(rng.integers(len(pool)))])
        y = min(max(cy - p // 2, -RADIUS), self.full[0] - p + RADIUS)
        x = min(max(cx - p // 2, -RADIUS), self.full[1] - p + RADIUS)
        return y, x

    def _window(self, array: np.ndarray, y: int, x: int) -> np.ndarray:
        """array[..., y:y+p, x:x+p] with edge replication outside (``array`` is [H, W(, C)] or [C, H, W])."""
        p = self.learn.patch
        rows = np.clip(np.arange(y, y + p), 0, self.full[0] - 1)
        cols = np.clip(np.arange(x, x + p), 0, self.full[1] - 1)
        if array.shape[:2] == self.full:
            return np.asarray(array[rows[0] : rows[-1] + 1])[rows - rows[0]][:, cols]
        return np.asarray(array[:, rows[0] : rows[-1] + 1])[:, rows - rows[0]][:, :, cols]

    def batch(self, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        from calibration.learned_model import add_defect

        p, tr = self.learn.patch, self.training
        xs, mus, los, his, ws, labels = [], [], [], [], [], []
        for _ in range(self.learn.batch):
            i = int(self.indices[int(rng.integers(len(self.indices)))])
            y, x = self._origin(rng)
            crop = fp.planes(self._window(tr.registered[i], y, x), tr.unit)
            label = np.zeros((p, p), np.float32)
            if rng.random() < self.learn.defect_rate:
                source = fp.planes(self._window(tr.registered[i], *self._origin(rng)), tr.unit)
                crop, label = add_defect(crop, rng, source, RADIUS + 4)
            xs.append(_normalise_window(crop, tr.coefs[i], y, x, tr.geometry.shape[:2]))
            stats = self.fold_stats[i % self.folds]
            mus.append(self._window(stats["mu"], y, x))
            los.append(self._window(stats["lo"], y, x))
            his.append(self._window(stats["hi"], y, x))
            ws.append(self._window(tr.weight, y, x)[None])
            labels.append(label[None])
        return tuple(np.stack(a).astype(np.float32) for a in (xs, mus, los, his, ws, labels))


def _normalise_window(planes: np.ndarray, coef: np.ndarray, y: int, x: int, full_shape: tuple[int, int]) -> np.ndarray:
    """The lighting correction of ``fp.normalise`` on a window whose top-left pixel is (y, x)."""
    _, h, w = planes.shape
    xs = np.arange(x, x + w, dtype=np.float32)[None, :]
    ys = np.arange(y, y + h, dtype=np.float32)[:, None]
    gain, offset = reg.lighting_fields(coef, xs, ys, full_shape)
    return (planes - offset) / gain


def _signature(channels: int, learn: LearnConfig, data_id: str) -> dict:
    """What a checkpoint must agree on to be resumed: the data, the network and every knob but the step count."""
    skip = ("steps", "checkpoint", "checkpoint_every", "device")
    keep = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(learn).items() if k not in skip}
    return {"channels": channels, "data": data_id, **keep}


def _settled(signature: dict) -> dict:
    """A signature without its unset options, so adding an option (default None) keeps older checkpoints valid.

    Checkpoints from before the architecture was an option are all of the legacy (dilated) network.
    """
    return {"network": LEGACY_ARCHITECTURE, **{k: v for k, v in signature.items() if v is not None}}


def _check_resumable(checkpoint: Path, saved: dict, wanted: dict) -> None:
    if saved["network"] != wanted["network"]:
        raise UserError(
            f"{checkpoint}: checkpoint of the {saved['network']} network, this fit trains the {wanted['network']} one; "
            f"pass --network {saved['network']}, another --checkpoint, or delete it"
        )
    if saved != wanted:
        raise UserError(
            f"{checkpoint}: checkpoint of other training images or settings; delete it or pass another --checkpoint"
        )


def train(
    training: fp.Training,
    fold_stats: list[dict],
    indices: list[int],
    folds: int,
    learn: LearnConfig,
    checkpoint: Path | None,
    progress: bool = True,
    data_id: str = "",
    desc: str = "training",
) -> tuple[dict[str, np.ndarray], TrainReport]:
    """Train the network from scratch (or resume from ``checkpoint``); returns its numpy weights and a report."""
    import torch

    from calibration.learned_model import LearnedNet, features, load_initial_weights, output_crop

    started = time.time()
    device = learn.device if learn.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    channels = training.geometry.channels
    torch.manual_seed(learn.seed)
    model = LearnedNet(channels, learn.network)
    if learn.init is not None:
        copied = load_initial_weights(model, learn.init)
        if progress:
            total = len(model.state_dict())
            print(f"{learn.init}: started from {len(copied)} of {total} weight arrays", file=sys.stderr)
    model = model.to(device, memory_format=model.memory_format)
    optimiser = torch.optim.Adam(model.parameters(), lr=learn.lr)
    rng = np.random.default_rng(learn.seed)
    step, losses, loss_value = 0, [], float("nan")
    signature = _signature(channels, learn, data_id)
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        _check_resumable(Path(checkpoint), _settled(state["signature"]), _settled(signature))
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        rng.bit_generator.state = state["rng"]
        step, losses, loss_value = state["step"], list(state["losses"]), state["loss"]
    resumed = step
    sampler = _Sampler(training, fold_stats, indices, folds, learn)
    pos_weight = torch.tensor(learn.pos_weight, device=device)
    window: list[float] = []

    def save() -> None:
        if checkpoint is None:
            return
        state = {
            "signature": signature,
            "model": model.state_dict(),
            "optimiser": optimiser.state_dict(),
            "rng": rng.bit_generator.state,
            "step": step,
            "losses": losses,
            "loss": loss_value,
        }
        tmp = Path(checkpoint).with_name(Path(checkpoint).name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(checkpoint)

    model.train()
    with tqdm(total=learn.steps, initial=step, desc=desc, disable=not progress, unit="step") as bar:
        while step < learn.steps:
            xn, mu, lo, hi, w, label = (torch.from_numpy(a).to(device) for a in sampler.batch(rng))
            logit = model(features(xn, mu, lo, hi, w).contiguous(memory_format=model.memory_format))
            target, mask = output_crop(label), output_crop(w)
            per_pixel = torch.nn.functional.binary_cross_entropy_with_logits(
                logit, target, pos_weight=pos_weight, reduction="none"
            )
            loss = (per_pixel * mask).sum() / mask.sum().clamp(min=1)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            step += 1
            loss_value = float(loss.detach())
            window.append(loss_value)
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(window[-50:]):.4f}")
            if step % learn.checkpoint_every == 0 or step == learn.steps:
                losses.append(round(float(np.mean(window)), 5))
                window = []
                save()
    params, flops = network_cost(channels, learn.network)
    model.eval()
    report = TrainReport(params, flops, step, resumed, loss_value, device, round(time.time() - started, 1), losses)
    return model.numpy_weights(), report
