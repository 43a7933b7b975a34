"""prepare -> engine -> regions: the one inspection path shared by `inspectd predict` and the daemon.

``prepare`` (registration, illumination fit, resampling) and ``decide`` (regions, verdict)
are pure functions of their inputs and run in any thread; ``infer`` drives the backend
and must stay in the one thread that owns it (the GPU thread on the TensorRT path).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engines import nonrigid, sensor
from engines import registration as reg
from engines.backend import Backend
from engines.buffers import BufferPool
from engines.bundle import GRAPH_FP16, GRAPH_FP32, Bundle
from engines.decode import conform, read_image
from engines.errors import BundleError, ImageError, InspectError
from engines.graphs import FINE_GAIN_LEVEL, LEVELS, PER_FRAME, RESIDENT
from engines.regions import find_regions
from engines.select import create_backend
from engines.tiling import TilePlan
from engines.tolerance import frame_fine_gain
from engines.types import DTYPES, Result


@dataclass(frozen=True)
class Prepared:
    """A frame registered to the reference, padded for tiling, with its per-tile lighting model and fine gain."""

    padded: np.ndarray
    photo: np.ndarray
    fine_gain: np.ndarray  # [tiles, G, T/8, T/8] float32: one local gain per detector in the graph
    pose: reg.Pose
    timings_ms: dict[str, float] = field(default_factory=dict)


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - start) * 1000


def _field_reference(
    bundle: Bundle, ref: dict[str, np.ndarray], full_shape: tuple[int, int]
) -> nonrigid.FieldReference:
    """The bundle's field reference, run as it was fitted: what a bundle records of its own (ridge, shared levels,
    steps, coupling, smoothing first, coarse steps) it keeps, with the values before each was recorded; the other
    constants must match."""
    cfg = bundle.manifest["registration"]["field"]
    own = ("factor", "ridge", "shared_levels", "steps", "coupled", "smooth_first", "coarse_steps")
    checked = {k: v for k, v in nonrigid.parameters().items() if k not in own}
    if {k: v for k, v in cfg.items() if k not in own} != checked:
        raise BundleError(f"{bundle.path}: fitted with other non-rigid alignment parameters; refit the model")
    return nonrigid.FieldReference(
        int(cfg["factor"]),
        ref["reg_field"],
        ref["reg_field_mask"],
        full_shape,
        ridge=float(cfg["ridge"]),
        shared_levels=bool(cfg.get("shared_levels", False)),  # before: each level read from the frame
        steps=int(cfg["steps"]),
        coupled=bool(cfg.get("coupled", False)),  # before: x and y solved apart
        smooth_first=bool(cfg.get("smooth_first", False)),  # before: each step's resampled level smoothed
        coarse_steps=int(cfg.get("coarse_steps", 0)),  # before: every step on the field's level
    )


def registration_reference(bundle: Bundle, ref: dict[str, np.ndarray]) -> reg.RegistrationReference:
    cfg = bundle.manifest["registration"]
    geo = bundle.geometry
    full_shape = (geo.height, geo.width)
    field = None
    if "field" in cfg:
        field = _field_reference(bundle, ref, full_shape)
    registration = reg.RegistrationReference(
        coarse=ref["reg_coarse"],
        fine=ref["reg_fine"],
        coarse_mask=ref["reg_coarse_mask"],
        fine_mask=ref["reg_fine_mask"],
        factors=tuple(cfg["factors"]),
        full_shape=full_shape,
        max_shift_px=float(cfg["max_shift_px"]),
        max_rotation_deg=float(cfg["max_rotation_deg"]),
        min_correlation=float(cfg["min_correlation"]),
        field=field,
        sensor=_sensor_model(bundle, cfg, ref, full_shape),
        light_fit=_light_fit(bundle, cfg),
    )
    # bundles from before the coarse pose search start ECC at the identity, as they were calibrated
    return registration.with_search() if cfg.get("search", False) else registration


def _light_fit(bundle: Bundle, cfg: dict) -> str:
    """The lighting fit the bundle was fitted with (bundles from before it was recorded: "trim")."""
    method = str(cfg.get("light_fit", "trim"))
    if method not in reg.LIGHT_FITS:
        raise BundleError(f"{bundle.path}: fitted with an unknown lighting fit {method!r}; refit the model")
    return method


def _sensor_model(
    bundle: Bundle, cfg: dict, ref: dict[str, np.ndarray], full_shape: tuple[int, int]
) -> sensor.SensorModel | None:
    """What of the sensor frame the bundle leaves out of every frame (None for bundles from before it)."""
    if "sensor" not in cfg:
        return None
    learned = ("max_depth_px", "user_mask", "clutter_depth_px")
    recorded = {k: v for k, v in cfg["sensor"].items() if k not in learned}
    if recorded != sensor.parameters():
        raise BundleError(f"{bundle.path}: fitted with other occluder parameters; refit the model")
    user = None
    if cfg["sensor"]["user_mask"]:
        user = np.unpackbits(ref["sensor_mask"], count=full_shape[0] * full_shape[1]).reshape(full_shape) > 0
    clutter = tuple(float(d) for d in cfg["sensor"].get("clutter_depth_px", (0.0,) * 4))  # 0: bundles before it
    return sensor.SensorModel(float(cfg["sensor"]["max_depth_px"]), ref["mu"], user, clutter)


def resident_inputs(plan: TilePlan, ref: dict[str, np.ndarray], dtype: np.dtype = np.float32) -> dict[str, np.ndarray]:
    """Tile the reference statistics once, in the layout and precision of the graph's resident inputs."""
    full = {"mean": ref["mu"], "low": ref["lo"], "high": ref["hi"], "weight": ref["weight"][None]}
    out = {name: _tile_planes(plan, planes, dtype) for name, planes in full.items()}
    for level in LEVELS:
        inv = ref[f"inv_sigma{level}"]
        sub = TilePlan(inv.shape[1], inv.shape[2], plan.core >> level, plan.halo >> level, 1)
        out[f"coarse{level}"] = _tile_planes(sub, inv, dtype)
    return out


def gain_tiles(plan: TilePlan, gain: np.ndarray) -> np.ndarray:
    """A frame's fine gains per gain block [G, Hb, Wb] (or [Hb, Wb]) in the graph's layout [tiles, G, T/b, T/b]."""
    step = 2**FINE_GAIN_LEVEL
    planes = gain.reshape(-1, *gain.shape[-2:])
    sub = TilePlan(planes.shape[1], planes.shape[2], plan.core // step, plan.halo // step, 1)
    return _tile_planes(sub, planes, np.float32)


def detector_gains(ref: dict[str, np.ndarray], name: str) -> np.ndarray:
    """A bundle's gain maps as [G, Hb, Wb] float32, one per detector (single-detector bundles store [Hb, Wb])."""
    gain = ref[name].astype(np.float32)
    return gain.reshape(-1, *gain.shape[-2:])


def _tile_planes(plan: TilePlan, planes: np.ndarray, dtype: np.dtype) -> np.ndarray:
    out = np.empty((plan.n_tiles, len(planes), plan.tile, plan.tile), dtype)
    for c, plane in enumerate(planes):  # floats are tiled as they are (no full-size copy); the store converts
        tiled = plane if plane.dtype in (np.float16, np.float32) else plane.astype(np.float32)
        out[:, c : c + 1] = plan.tile_all(tiled)
    return out


class Inspector:
    """Inspects frames with one bundle on one backend."""

    def __init__(self, bundle: Bundle, backend: Backend, batch: int = 1) -> None:
        self.bundle = bundle
        self.backend = backend
        self.geometry = bundle.geometry
        self.bundle_id = bundle.bundle_id
        cal = bundle.calibration
        self.threshold = float(cal["threshold"])
        self.min_area = int(cal.get("min_area", 1))
        tiling = bundle.manifest["tiling"]
        self.plan = TilePlan(self.geometry.height, self.geometry.width, tiling["core"], tiling["halo"], tiling["align"])
        self.batch = max(1, (backend.max_batch and min(batch, backend.max_batch)) or batch)
        missing = {*PER_FRAME, *RESIDENT} - set(backend.inputs)
        if missing:
            raise BundleError(f"{backend.graph_path}: graph lacks inputs {sorted(missing)}; refit with this inspectd")
        self._ref = bundle.reference()
        self._registration = registration_reference(bundle, self._ref)
        self._float_input = self.geometry.dtype == "uint16"
        # Maps are reused once the previous frames' results are dropped (engines/buffers.py: no page faults).
        # Three: the frame being inferred, the one before it (still being decided or published) and the
        # latest reject the status page holds until it renders it; more in use are allocated afresh.
        self._maps = BufferPool((self.geometry.height, self.geometry.width), np.float32, keep=3)
        self._origins = [self.plan.origin(i) for i in range(self.plan.n_tiles)]
        self._part_gains = detector_gains(self._ref, "fine_gain")
        self._ring_gains = detector_gains(self._ref, "fine_ring_gain")
        gain_channels = backend.inputs["fine_gain"].shape[1]
        if gain_channels != len(self._part_gains):
            raise BundleError(
                f"{backend.graph_path}: graph reads {gain_channels} gain maps, the bundle has {len(self._part_gains)}"
            )

    @classmethod
    def load(cls, path: Path, backend: str = "auto", batch: int = 1) -> Inspector:
        """Verify the bundle and create its backend (not yet activated)."""
        bundle = Bundle.load(path)
        engine = create_backend(backend, bundle.file(GRAPH_FP32), bundle.file(GRAPH_FP16))
        return cls(bundle, engine, batch)

    # -- lifecycle -----------------------------------------------------------------
    def activate(self) -> None:
        """Upload the resident reference statistics and warm the backend up with one frame."""
        self.backend.activate(resident_inputs(self.plan, self._ref, self.backend.inputs["mean"].dtype))
        self.infer(self._warmup_frame())

    def deactivate(self) -> None:
        self.backend.deactivate()
        self._maps.clear()

    def __enter__(self) -> Inspector:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def reference_frame(self) -> np.ndarray:
        """The fitted mean part as a frame of the sensor's geometry and type: a frame that takes every step of
        prepare (a blank one stops early, at registration), for warming threads up before the first real frame."""
        dtype = DTYPES[self.geometry.dtype]
        values = self._ref["mu"] * np.float32(257 if self._float_input else 1)  # [C, H, W]; a copy (x * 1 is x)
        np.clip(np.rint(values, out=values), 0, np.iinfo(dtype).max, out=values)  # in place, as sensor._replace
        frame = values.astype(dtype)
        return frame[0] if self.geometry.channels == 1 else np.ascontiguousarray(frame.transpose(1, 2, 0))

    def _warmup_frame(self) -> Prepared:
        shape = (
            self.plan.rows * self.plan.core + 2 * self.plan.halo,
            self.plan.cols * self.plan.core + 2 * self.plan.halo,
        )
        if self.geometry.channels == 3:
            shape = (*shape, 3)
        dtype = np.float32 if self._float_input else np.uint8
        photo = np.tile(np.eye(1, reg.PHOTO_TERMS, dtype=np.float32), (self.plan.n_tiles, 1))
        gain = gain_tiles(self.plan, self._part_gains)
        return Prepared(np.full(shape, 128, dtype), photo, gain, reg.Pose(np.eye(2, 3), 1.0))

    # -- the three stages ------------------------------------------------------------
    def prepare(self, image: np.ndarray, source: str = "frame") -> Prepared:
        """Check geometry, register to the reference, fit the lighting, resample and pad."""
        timings: dict[str, float] = {}
        with _timed(timings, "registration"):
            image = conform(image, self.geometry, source)
            if self._float_input:  # 16 bit: the graph takes float, so the registered frame is converted anyway
                aligned = reg.align(image, self._registration)
                padded = self.plan.pad(aligned.registered.astype(np.float32) * np.float32(1 / 257))
            else:  # resampled straight into the padded frame: no 26 MB copy at 5120 px
                padded = np.empty(self.plan.padded_shape() + image.shape[2:], image.dtype)
                aligned = reg.align(image, self._registration, out=self.plan.interior(padded))
                self.plan.replicate(padded)
            pose, coef = aligned.pose, aligned.coef
            photo = reg.tile_photometric(coef, self._origins, self.plan.halo, (self.plan.height, self.plan.width))
            pairs = zip(self._part_gains, self._ring_gains, strict=True)
            gain = gain_tiles(self.plan, np.stack([frame_fine_gain(p, r, pose.matrix) for p, r in pairs]))
        return Prepared(padded, photo, gain, pose, timings)

    def infer(self, prepared: Prepared) -> np.ndarray:
        """Run the anomaly graph over every tile; returns the float32 [H, W] map (reference frame)."""
        amap = self._maps.take()  # every pixel is written below (the tiles' cores cover the map)
        jobs = []
        gain = prepared.fine_gain.astype(self.backend.inputs["fine_gain"].dtype, copy=False)
        for tiles in self.plan.batches(self.batch):
            feeds = {
                "image": self._tile_image(prepared.padded, tiles),
                "photo": prepared.photo[tiles.start : tiles.stop],
                "fine_gain": gain[tiles.start : tiles.stop],
            }
            jobs.append((feeds, tiles))

        def stitch(index: int, outputs: dict[str, np.ndarray]) -> None:  # tiles own disjoint places of the map
            self.plan.stitch(outputs["anomaly"], jobs[index][1], amap)

        # tiles side by side, each stitched by the worker that ran it (CPU), or pipelined over streams (GPU)
        self.backend.infer_each(jobs, stitch)
        return amap

    def _tile_image(self, padded: np.ndarray, tiles: range) -> np.ndarray:
        """A batch's frame input: one tile as a view of the padded frame, copied by the worker that runs it (in
        parallel, into that core's cache, just before its run); a batch of several as one copy made here."""
        return self.plan.window(padded, tiles.start) if len(tiles) == 1 else self.plan.extract(padded, tiles)

    def decide(self, prepared: Prepared, amap: np.ndarray) -> Result:
        """Regions above the pixel threshold decide the verdict; boxes go back to frame pixels."""
        row_max = amap.max(axis=1)  # the one full pass over the map: its score, and where to look for regions
        regions = find_regions(amap, self.threshold, self.min_area, row_max=row_max)
        h, w = amap.shape
        defects = [type(d)(reg.bbox_to_frame(d.bbox, prepared.pose, h, w), d.area, d.score) for d in regions]
        score = float(row_max.max())
        verdict, reason = ("reject", "defect") if defects else ("pass", "ok")
        return Result(
            verdict, reason, score, self.threshold, defects, anomaly_map=amap, pose_matrix=prepared.pose.matrix
        )

    # -- conveniences ----------------------------------------------------------------
    def inspect(self, image: np.ndarray, source: str = "frame") -> Result:
        """All three stages; anything that stops an inspection becomes a reject with a reason."""
        timings: dict[str, float] = {}
        try:
            prepared = self.prepare(image, source)
            timings.update(prepared.timings_ms)
            with _timed(timings, "anomaly_map"):
                amap = self.infer(prepared)
            with _timed(timings, "regions"):
                result = self.decide(prepared, amap)
        except InspectError as exc:
            result = Result("reject", exc.reason, float("inf"), self.threshold, detail=exc.detail)
        except ImageError as exc:
            result = Result("reject", "bad_frame", float("inf"), self.threshold, detail=str(exc))
        result.timings_ms = timings
        return result

    def inspect_path(self, path: Path) -> Result:
        """Read and inspect one file; unreadable files raise ImageError (the caller decides)."""
        start = time.perf_counter()
        image = read_image(path)
        decode_ms = (time.perf_counter() - start) * 1000
        result = self.inspect(image, str(path))
        result.timings_ms = {"decode": decode_ms, **result.timings_ms}
        return result
