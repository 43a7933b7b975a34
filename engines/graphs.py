"""The template detector's anomaly graph, built as ONNX so ONNX Runtime and TensorRT run the same model.

Inputs per tile batch: per frame ``image`` (the registered frame), ``photo`` (lighting model) and
``fine_gain`` [N, G, T/8, T/8] (learned local normalisation for this frame's pose, see
engines.tolerance; one channel per score: 3 for the template's fine, blob and line scores, 4 in
the ensemble graph); resident statistics ``mean``, ``low``, ``high`` [N, C, T, T], ``weight``
[N, 1, T, T] (inspection region) and ``coarse{l}`` [N, C, T/2^l, T/2^l] (1/spread of the block
means at level l).

Per tile (core + halo) the graph:
1. corrects illumination with a per-tile gain (quadratic) and offset (linear) field (``photo``), in FP32;
2. *fine* score: grey levels outside the per-pixel tolerance band [lo, hi] of good parts
   (the band is wide where good parts vary: structure edges, the border band);
3. *coarse* score: the residual against the reference mean, averaged over a pyramid of
   2^l-pixel blocks (l in ``LEVELS``) with a 3x3 neighbourhood, divided by the spread good
   parts show at that place and scale; this finds low-contrast stains and smears that are
   inside the noise per pixel;
4. *shape* scores (when the spec has their scales), from the fine score, so that good parts
   that carry thin short marks do not blind the detector to compact and to long defects:
   - *blob*: the fine score eroded by 3x3 pixels, the level a whole 3x3 neighbourhood exceeds
     the band by. Thin things (marks one or two pixels wide, a structure edge that moved, single
     noisy pixels) do not survive it; a dot, a missing marker, a particle does;
   - *line*: the fine score max-pooled to 4 px cells (and over 3x3 cells); along straight lines
     of ``LINE_TAPS`` cells (100 px) in ``LINE_ANGLES`` directions, the level that a run of
     ``LINE_FILL`` consecutive cells (60 px) all reach, the best run and direction kept, and
     never above the cell's own level: evidence that persists along a scratch, which a mark
     shorter than that cannot hold however strong it is, scored where the scratch is;
   each from the fine score before its gain, with its own learned local gain (``fine_gain``
   channels 1, 2: what good parts show in that score, where; clutter along the image border is
   line-like, so the line score needs its own tolerance there) and in units of what good parts
   reach in it (its scale), like the fine and coarse scores;
5. returns the maximum of the scaled scores on the core only.

Full-resolution arithmetic stays in FP32 in both variants (differences of two ~150-grey
values need more than FP16's 11 bits to keep the map within 1e-2 of FP32); the FP16 variant
runs the pyramid, the neighbourhood sums and the output in FP16, which is where the bulk of
the data movement is. Inputs are uint8 frames for 8-bit models (one byte per pixel to upload).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engines.registration import PHOTO_TERMS

LEVELS = (2, 3, 4, 5)
ALIGN = 2 ** max(LEVELS)  # core origins and halo must be multiples of the coarsest block
HALO = 2 * ALIGN  # the 3x3 neighbourhood at the coarsest level reaches 2 blocks out
# The fine score's learned local gain lives on 8 px blocks: fine enough that the border band of a
# 2048 px image (about 80 px) spans ten lines of blocks, so clutter and defects there part. On 16 px
# blocks a block the pose laid across the clutter's reach (48-52 px from the edge on the fixture lines)
# took that line's tolerance over its whole 16 px, and chips 53-71 px from the edge got gains of 0.04-0.28 and
# went unseen. What the fit learns on this grid, and what on coarser cells: calibration.tolerance_fit.
FINE_GAIN_LEVEL = 3
RESIDENT = ("mean", "low", "high", "weight", *(f"coarse{level}" for level in LEVELS))
PER_FRAME = ("image", "photo", "fine_gain")  # fine_gain depends on the frame's pose (engines.tolerance)
OPSET = 17
COMPONENTS = ("fine", "coarse", "blob", "line")  # the channels of a components graph (fitting), in order
LINE_CELL = 4  # px: the line score's cells (max-pooled fine score), tolerant of a scratch's curvature
LINE_TAPS = 25  # cells along a line: 100 px, over twice the benign marks of a 2048 px part (2 % of its side)
LINE_ANGLES = 16  # directions, 11.25 degrees apart: a line's end stays within its cell's 3x3 neighbourhood
LINE_FILL = 15  # of LINE_TAPS cells that must all hold the evidence: 60 px, more than a 2048 px mark and its 3x3 cells
BLOB_RADIUS = 2  # px: the blob score's disc (5 px across); marks up to 2 px wide, blurred, do not hold it
SHAPE_MARGIN = 64  # px around the core that the shape scores read (the line's reach), so tiles stitch exactly


@dataclass(frozen=True)
class TiledGraphSpec:
    """What every inspectd tile graph's shape depends on: channels, tile core and halo, input type, precision."""

    channels: int
    core: int
    halo: int = HALO
    input_dtype: str = "uint8"  # "uint8" or "float32"
    precision: str = "fp32"  # "fp32" or "fp16"
    gains: int = 1  # channels of the per-frame fine_gain input: one per detector in the graph

    @property
    def half(self) -> int:
        """The ONNX type of the graph's working precision (statistics, gains, output)."""
        return TensorProto.FLOAT16 if self.precision == "fp16" else TensorProto.FLOAT

    @property
    def np_half(self) -> type:
        """The numpy type of the working precision, for constants in that part of the graph."""
        return np.float16 if self.precision == "fp16" else np.float32

    @property
    def resident_type(self) -> int:
        """The ONNX type of the resident statistics: the working precision's (see ``tile_inputs``)."""
        return self.half

    def __post_init__(self) -> None:
        if self.core % ALIGN or self.halo % ALIGN or self.halo < HALO:
            raise ValueError(f"core and halo must be multiples of {ALIGN}, halo >= {HALO}")

    @property
    def tile(self) -> int:
        return self.core + 2 * self.halo


@dataclass(frozen=True)
class TemplateGraphSpec(TiledGraphSpec):
    """Everything the template graph's shape and arithmetic depend on."""

    fine_scale: float = 1.0
    coarse_scale: float = 1.0
    blob_scale: float | None = None  # None: no blob score (graphs of bundles fitted before it)
    line_scale: float | None = None  # None: no line score
    components: bool = False  # fitting only: output every score (COMPONENTS) separately, unscaled
    # Resident statistics' precision when it differs from the working precision: the fit's FP32 graph reads the
    # statistics in FP16, which is how the fit holds them (exact), at half the memory of 25 float32 tiles of each.
    resident_precision: str | None = None

    @property
    def resident_type(self) -> int:
        if self.resident_precision is None:
            return self.half
        return TensorProto.FLOAT16 if self.resident_precision == "fp16" else TensorProto.FLOAT

    @property
    def shapes(self) -> tuple[str, ...]:
        """The shape scores this graph computes: those with a scale (in a components graph the scale is not
        applied: any value asks for the score)."""
        scales = {"blob": self.blob_scale, "line": self.line_scale}
        return tuple(name for name, scale in scales.items() if scale is not None)

    @property
    def template_gains(self) -> int:
        """Gain maps the template's scores read: the fine score's and one per shape score (a components graph
        scores raw, with the first only)."""
        return 1 if self.components else 1 + len(self.shapes)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resident_precision not in (None, "fp16", "fp32"):
            raise ValueError(f"resident precision {self.resident_precision!r}: expected fp16 or fp32")
        if self.gains < self.template_gains:
            raise ValueError(f"the template's scores read {self.template_gains} gain maps, the spec has {self.gains}")


class _Builder:
    """Tiny helper that names nodes and collects initializers."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value: np.ndarray, hint: str = "c") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs: object) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def ops(self, op_type: str, inputs: list[str], n_out: int, **attrs: object) -> list[str]:
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        return outs


def _slice(g: _Builder, x: str, start: int, stop: int, axes: tuple[int, ...]) -> str:
    n = len(axes)
    return g.op(
        "Slice",
        [
            x,
            g.const(np.full(n, start, np.int64)),
            g.const(np.full(n, stop, np.int64)),
            g.const(np.array(axes, np.int64)),
        ],
    )


def _photometric_fields(g: _Builder, photo: str, tile: int) -> tuple[str, str]:
    """Gain a = p0 + p1 u + p2 v + p3 u^2 + p4 v^2 + p5 u v and offset b = p6 + p7 u + p8 v over the tile.

    The gain is a sum of three outer products, a[v, u] = 1 * (p0 + p1 u + p3 u^2) + (p2 v + p4 v^2) * 1
    + v * (p5 u): one MatMul of [T, 3] by [3, T] writes it in one pass over the tile; the offset is
    one broadcast Add of a row and a column.
    """
    u = g.const(np.arange(tile, dtype=np.float32).reshape(1, 1, 1, tile), "u")
    v = g.const(np.arange(tile, dtype=np.float32).reshape(1, 1, tile, 1), "v")
    uu = g.const(np.square(np.arange(tile, dtype=np.float32)).reshape(1, 1, 1, tile), "uu")
    vv = g.const(np.square(np.arange(tile, dtype=np.float32)).reshape(1, 1, tile, 1), "vv")
    p = g.op("Reshape", [photo, g.const(np.array([-1, PHOTO_TERMS, 1, 1], np.int64))])
    c = g.ops("Split", [p, g.const(np.ones(PHOTO_TERMS, np.int64))], PHOTO_TERMS, axis=1)

    def mul(a: str, b: str) -> str:
        return g.op("Mul", [a, b])

    def add(a: str, b: str) -> str:
        return g.op("Add", [a, b])

    row = add(add(c[0], mul(c[1], u)), mul(c[3], uu))  # [N, 1, 1, T]: the terms in u
    col = add(mul(c[2], v), mul(c[4], vv))  # [N, 1, T, 1]: the terms in v
    ones_col = g.const(np.ones((1, 1, tile, 1), np.float32))
    ones_row = g.const(np.ones((1, 1, 1, tile), np.float32))
    v_col = g.op("Expand", [v, g.op("Shape", [col])])  # [N, 1, T, 1], so the factors share a batch dimension
    left = g.op("Concat", [g.op("Expand", [ones_col, g.op("Shape", [col])]), col, v_col], axis=3)  # [N, 1, T, 3]
    right = g.op("Concat", [row, g.op("Expand", [ones_row, g.op("Shape", [row])]), mul(c[5], u)], axis=2)  # [N,1,3,T]
    a = g.op("MatMul", [left, right])
    b = add(add(c[6], mul(c[7], u)), mul(c[8], v))
    return a, b


def tile_inputs(spec: TiledGraphSpec) -> list[onnx.ValueInfoProto]:
    """The inputs every inspectd tile graph declares (module docstring); resident ones in the working precision.

    Resident statistics travel in the graph's working precision: FP32 graphs get FP32 (no
    per-tile conversion on the CPU), FP16 graphs get FP16 (half the device memory and traffic);
    a template spec may ask for another (``resident_precision``).
    """
    c, t, half, resident = spec.channels, spec.tile, spec.half, spec.resident_type
    in_type = TensorProto.UINT8 if spec.input_dtype == "uint8" else TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("image", in_type, ["N", c, t, t]),
        helper.make_tensor_value_info("photo", TensorProto.FLOAT, ["N", PHOTO_TERMS]),
    ]
    for name, channels in (("mean", c), ("low", c), ("high", c), ("weight", 1)):
        inputs.append(helper.make_tensor_value_info(name, resident, ["N", channels, t, t]))
    side = t >> FINE_GAIN_LEVEL
    inputs.append(helper.make_tensor_value_info("fine_gain", half, ["N", spec.gains, side, side]))
    for level in LEVELS:
        inputs.append(helper.make_tensor_value_info(f"coarse{level}", resident, ["N", c, t >> level, t >> level]))
    return inputs


def fine_gain(g: _Builder, spec: TiledGraphSpec, channel: int = 0, scale: float = 1.0, margin: int = 0) -> str:
    """Channel ``channel`` of the per-block gain (learned local normalisation) times ``scale``, expanded in FP32
    over the core and ``margin`` px (within the halo) around it.

    ``scale`` is applied on the blocks, before the gain is expanded to pixels: one multiplication
    per 16x16 block instead of one per pixel.
    """
    step = 2**FINE_GAIN_LEVEL
    assert 0 <= margin <= spec.halo
    low, size = spec.halo // step, spec.core // step
    pad = -(-margin // step)  # whole blocks
    gain = g.op("Cast", ["fine_gain"], to=TensorProto.FLOAT)
    gain = _slice(g, gain, low - pad, low + size + pad, (2, 3))
    if spec.gains > 1:
        gain = _slice(g, gain, channel, channel + 1, (1,))
    if scale != 1.0:
        gain = g.op("Mul", [gain, g.const(np.float32(scale))])
    gain = g.op("Resize", [gain, "", g.const(np.array([1, 1, step, step], np.float32))], mode="nearest")
    skip = pad * step - margin
    return gain if not skip else _slice(g, gain, skip, skip + spec.core + 2 * margin, (2, 3))


def _channel_max(g: _Builder, x: str, channels: int) -> str:
    """Max over channels (colour); mono maps pass through without a copy."""
    return x if channels == 1 else g.op("ReduceMax", [x], axes=[1], keepdims=1)


def _coarse_score(g: _Builder, resid: str, inv_sigmas: dict[int, str], spec: TemplateGraphSpec) -> str:
    """Max over pyramid levels of |3x3 block mean of the residual| * (1/sigma), at level-2 resolution."""
    low = spec.halo // 4
    size = spec.core // 4
    level_maps = []
    pooled = resid
    for level in range(1, max(LEVELS) + 1):
        pooled = g.op("AveragePool", [pooled], kernel_shape=[2, 2], strides=[2, 2])
        if level not in LEVELS:
            continue
        hood = g.op("AveragePool", [pooled], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
        z = g.op("Mul", [g.op("Abs", [hood]), inv_sigmas[level]])
        z = _channel_max(g, z, spec.channels)
        scale = 2 ** (level - 2)
        if scale > 1:
            z = g.op("Resize", [z, "", g.const(np.array([1, 1, scale, scale], np.float32))], mode="nearest")
        level_maps.append(_slice(g, z, low, low + size, (2, 3)))
    return g.op("Max", level_maps)


def build_template_graph(spec: TemplateGraphSpec) -> onnx.ModelProto:
    """Build the tiled anomaly graph described in the module docstring."""
    g = _Builder()
    out_channels = template_anomaly(g, spec, "anomaly")
    outputs = [helper.make_tensor_value_info("anomaly", spec.half, ["N", out_channels, spec.core, spec.core])]
    return finish_model(g, "template", tile_inputs(spec), outputs, spec.precision, spec.core, spec.halo)


def template_anomaly(g: _Builder, spec: TemplateGraphSpec, out: str, gain_channel: int = 0) -> int:
    """Add the template detector's nodes, reading the tile inputs, writing tensor ``out``; returns its channels.

    Every full-size step is one pass over the tile; the band excess is taken over the whole tile
    and cut to the core once (cutting the frame, the band and the region to the core first would
    copy four tiles to save work on one); each score's scale rides on its per-block gain. The excess
    is not clamped at zero: the anomaly is its maximum with the coarse score, which is never
    negative, so a negative excess (inside the band) can never be the output; the shape scores are
    minima and maxima of the excess (erosion, pooling, order statistics along lines), so clamping
    before them or after the final maximum gives the same map. The fitting graph (``components``)
    outputs every score separately and clamps the excess before the shapes.
    """
    c, half, resident = spec.channels, spec.half, spec.resident_type
    stats = {
        name: name if resident == TensorProto.FLOAT else g.op("Cast", [name], to=TensorProto.FLOAT)
        for name in ("mean", "low", "high", "weight")
    }
    inv_sigmas = {
        level: f"coarse{level}" if resident == half else g.op("Cast", [f"coarse{level}"], to=half) for level in LEVELS
    }

    # Stage 1, FP32: illumination correction, band excess and residual at full resolution.
    x = g.op("Cast", ["image"], to=TensorProto.FLOAT)
    a, b = _photometric_fields(g, "photo", spec.tile)
    xn = g.op("Div", [g.op("Sub", [x, b]), a], "xn")
    mu, lo, hi, w = stats["mean"], stats["low"], stats["high"], stats["weight"]
    resid = g.op("Mul", [g.op("Sub", [xn, mu]), w], "resid")
    excess = g.op("Max", [g.op("Sub", [xn, hi]), g.op("Sub", [lo, xn])])  # > 0 outside the band
    excess = g.op("Mul", [_channel_max(g, excess, c), w])
    m = SHAPE_MARGIN if spec.shapes else 0
    raw = _slice(g, excess, spec.halo - m, spec.halo + spec.core + m, (2, 3))
    if spec.components:  # fitting: every score from the fine score as gained (by ones), clamped, unscaled
        raw = g.op("Relu", [g.op("Mul", [raw, fine_gain(g, spec, gain_channel, margin=m)])])
    shapes = {"blob": _blob_score, "line": _line_score}
    maps = [shapes[name](g, raw, spec, m) for name in spec.shapes]
    fine = _slice(g, raw, m, m + spec.core, (2, 3)) if m else raw
    if not spec.components:
        fine = g.op("Mul", [fine, fine_gain(g, spec, gain_channel, 1.0 / spec.fine_scale)])
        for k, name in enumerate(spec.shapes):
            scale = spec.blob_scale if name == "blob" else spec.line_scale
            gain = fine_gain(g, spec, gain_channel + 1 + k, 1.0 / scale)
            maps[k] = g.op("Mul", [maps[k], gain if half == TensorProto.FLOAT else g.op("Cast", [gain], to=half)])

    # Stage 2, FP16 in the FP16 variant: pyramid and neighbourhoods.
    if half == TensorProto.FLOAT16:
        resid = g.op("Cast", [resid], to=half)
        fine = g.op("Cast", [fine], to=half)
    coarse = _coarse_score(g, resid, inv_sigmas, spec)
    np_half = spec.np_half
    if not spec.components:
        coarse = g.op("Mul", [coarse, g.const(np_half(1.0 / spec.coarse_scale))])
    coarse_full = g.op("Resize", [coarse, "", g.const(np.array([1, 1, 4, 4], np.float32))], mode="nearest")
    if spec.components:
        g.nodes.append(helper.make_node("Concat", [fine, coarse_full, *maps], [out], axis=1))
        return 2 + len(maps)
    g.nodes.append(helper.make_node("Max", [fine, coarse_full, *maps], [out]))
    return 1


def _blob_score(g: _Builder, fine: str, spec: TemplateGraphSpec, margin: int) -> str:
    """The fine score (FP32, core + ``margin`` px) eroded by a 5 px disc: on the core, in the working precision.

    The disc is the union of a 5x3 and a 3x5 box (a 5x5 square without its corners), so the
    erosion is the smaller of the two box erosions (-MaxPool(-x)).
    """
    neg = g.op("Neg", [fine])
    r = BLOB_RADIUS
    boxes = [
        g.op("MaxPool", [neg], kernel_shape=[2 * a + 1, 2 * b + 1], strides=[1, 1], pads=[a, b, a, b])
        for a, b in ((r, r - 1), (r - 1, r))
    ]
    eroded = g.op("Neg", [g.op("Max", boxes)])
    eroded = _slice(g, eroded, margin, margin + spec.core, (2, 3))
    return eroded if spec.half == TensorProto.FLOAT else g.op("Cast", [eroded], to=spec.half)


def line_segments() -> list[tuple[list[tuple[int, int]], list[tuple[int, int]]]]:
    """Per direction, (starts, taps): where the LINE_FILL-cell segments of the line centred on a cell start
    (LINE_TAPS - LINE_FILL + 1 of them, as (dy, dx) cell offsets from it) and the offsets of a segment's cells
    from its start."""
    out = []
    for k in range(LINE_ANGLES):
        t = np.pi * k / LINE_ANGLES
        step = (np.sin(t), np.cos(t))
        first = -(LINE_TAPS - 1) / 2
        starts = [_cell(first + w, step) for w in range(LINE_TAPS - LINE_FILL + 1)]
        out.append((starts, [_cell(j, step) for j in range(LINE_FILL)]))
    return out


def _cell(u: float, step: tuple[float, float]) -> tuple[int, int]:
    return round(u * step[0]), round(u * step[1])


def _line_score(g: _Builder, fine: str, spec: TemplateGraphSpec, margin: int) -> str:
    """The level a run of LINE_FILL consecutive cells all reach, the best run of the best of LINE_ANGLES lines of
    LINE_TAPS cells centred on each cell (cell-pooled fine score), on the core; never above the cell's own level.

    Per direction, a line erosion (the minimum over a LINE_FILL-cell segment from each cell) then a
    dilation over the segments' starts: Min and Max of shifted slices, a few passes over a map 16
    times smaller than the tile. (The LINE_FILL-th largest of the LINE_TAPS cells, by TopK, was
    90 times the rest of the template graph's time.) Computed in FP32, returned in the working
    precision.
    """
    cells = g.op("MaxPool", [fine], kernel_shape=[LINE_CELL, LINE_CELL], strides=[LINE_CELL, LINE_CELL])
    # 3x3 cells: a curved scratch, or a line between two directions, stays on the line within a cell
    cells = g.op("MaxPool", [cells], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
    mc, n = margin // LINE_CELL, spec.core // LINE_CELL
    levels = []
    for starts, taps in line_segments():
        (y0, y1), (x0, x1) = ((mc + min(a), mc + n + max(a)) for a in zip(*starts, strict=True))
        eroded = g.op("Min", [_slice2(g, cells, (y0 + dy, y1 + dy), (x0 + dx, x1 + dx)) for dy, dx in taps])
        runs = [
            _slice2(g, eroded, (mc + dy - y0, mc + dy - y0 + n), (mc + dx - x0, mc + dx - x0 + n)) for dy, dx in starts
        ]
        levels.append(g.op("Max", runs))
    best = g.op("Max", levels)
    # A cell is scored only as far as it holds that evidence itself: the line score stays on the scratch
    # instead of lighting up every line that passes through a dot.
    best = g.op("Min", [best, _slice2(g, cells, (mc, mc + n), (mc, mc + n))])
    if spec.half == TensorProto.FLOAT16:
        best = g.op("Cast", [best], to=spec.half)
    return g.op("Resize", [best, "", g.const(np.array([1, 1, LINE_CELL, LINE_CELL], np.float32))], mode="nearest")


def _slice2(g: _Builder, x: str, rows: tuple[int, int], cols: tuple[int, int]) -> str:
    """x[:, :, rows[0]:rows[1], cols[0]:cols[1]]."""
    starts, ends = np.array([rows[0], cols[0]], np.int64), np.array([rows[1], cols[1]], np.int64)
    return g.op("Slice", [x, g.const(starts), g.const(ends), g.const(np.array([2, 3], np.int64))])


def finish_model(
    g: _Builder,
    detector: str,
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    precision: str,
    core: int,
    halo: int,
    extra_props: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """Wrap built nodes into a checked model carrying the metadata every inspectd graph has."""
    graph = helper.make_graph(g.nodes, f"inspectd_{detector}", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="inspectd")
    model.ir_version = 8
    props = {
        "inspectd.detector": detector,
        "inspectd.precision": precision,
        "inspectd.resident": ",".join(RESIDENT),
        "inspectd.core": str(core),
        "inspectd.halo": str(halo),
        **(extra_props or {}),
    }
    helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    return model
