"""The learned detector's anomaly graph: a compact fully convolutional network on reference-conditioned features.

Same inputs as the template graph (``image``, ``photo`` and the resident statistics, see
``engines.graphs``), same output (``anomaly`` [N, 1, core, core]), so the tiling, the
backends, the thresholds and the regions are shared and the Inspector runs it unchanged.

Per tile the graph
1. corrects illumination exactly as the template graph does (``photo``), in FP32;
2. builds ``FEATURES`` channels per colour channel from the corrected frame ``xn`` and the
   registered reference (mean ``mu``, band ``[lo, hi]``, region ``w``), on the core plus the
   network's receptive-field radius only:
   (xn - mu) / 32, band excess max(xn - hi, lo - xn, 0) / 16, (mu - 128) / 64, (hi - lo) / 64,
   and the difference in band widths (xn - mu) / (hi - lo + 4), each times w; so the network
   sees "how this pixel differs from the reference, and how much good parts vary here";
3. runs the network: 3x3 convolutions with dilations ``DILATIONS`` and ReLU, then a 1x1
   convolution to one logit; all convolutions are *valid* (no padding), so the output is
   exactly the core and equals the network applied to the whole image (the halo, 64 px, is
   larger than the receptive-field radius, ``RADIUS``);
4. returns softplus(logit) * w * fine_gain on the core: non-negative, ~0 where the network is
   sure the pixel is good and ~logit where it sees a defect, so "threshold = (1 + margin) *
   worst held-out good score" keeps its meaning. ``fine_gain`` is the learned local
   normalisation of this map (``calibration.learned_fit``): where held-out good parts made
   the network fire (structure edges under pose, the border band), the same output counts less.

The FP16 variant keeps stage 1-2 (differences of two ~150-grey values) in FP32 and runs the
network and the output in FP16. The coarse inputs are not used by the network; they are still
consumed (one element, times zero) so every backend binds the same inputs.

This module needs only numpy and onnx: inference never imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from engines.graphs import (
    HALO,
    LEVELS,
    TiledGraphSpec,
    _Builder,
    _photometric_fields,
    _slice,
    fine_gain,
    finish_model,
    tile_inputs,
)

FEATURES = 5  # per colour channel
DILATIONS = (1, 2, 4, 8, 16)
WIDTH = 16  # hidden channels
RADIUS = sum(DILATIONS)  # receptive-field radius of the valid 3x3 stack (px)
DIFF_SCALE, EXCESS_SCALE, MEAN_SCALE, BAND_SCALE = 32.0, 16.0, 64.0, 64.0
Z_FLOOR = 4.0  # grey levels added to the band width in the normalised difference
assert RADIUS <= HALO


@dataclass(frozen=True)
class LearnedGraphSpec(TiledGraphSpec):
    """The learned graph's shape depends on nothing beyond the common tile spec (weights come separately)."""


def layer_names() -> list[str]:
    """Names of the weight arrays, in order: conv{i}.weight / conv{i}.bias, the last is the 1x1 head."""
    return [f"conv{i}.{kind}" for i in range(len(DILATIONS) + 1) for kind in ("weight", "bias")]


def weight_shapes(channels: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    cin = FEATURES * channels
    for i in range(len(DILATIONS)):
        shapes[f"conv{i}.weight"] = (WIDTH, cin, 3, 3)
        shapes[f"conv{i}.bias"] = (WIDTH,)
        cin = WIDTH
    head = len(DILATIONS)
    shapes[f"conv{head}.weight"] = (1, WIDTH, 1, 1)
    shapes[f"conv{head}.bias"] = (1,)
    return shapes


def macs_per_pixel(channels: int) -> int:
    """Multiply-accumulates of the network per output pixel."""
    return sum(int(np.prod(s)) for k, s in weight_shapes(channels).items() if k.endswith("weight"))


def build_learned_graph(spec: LearnedGraphSpec, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """Build the tiled graph described in the module docstring with the trained ``weights``."""
    g = _Builder()
    learned_anomaly(g, spec, weights, "anomaly", bind_unused=True)
    outputs = [helper.make_tensor_value_info("anomaly", spec.half, ["N", 1, spec.core, spec.core])]
    extra = {"inspectd.receptive_radius": str(RADIUS)}
    return finish_model(g, "learned", tile_inputs(spec), outputs, spec.precision, spec.core, spec.halo, extra)


def learned_anomaly(
    g: _Builder,
    spec: TiledGraphSpec,
    weights: Mapping[str, np.ndarray],
    out: str,
    gain_channel: int = 0,
    bind_unused: bool = False,
) -> None:
    """Add the learned detector's nodes, reading the tile inputs, writing tensor ``out`` [N, 1, core, core].

    ``bind_unused``: consume one element of each input the network does not read (times zero),
    so a graph of the learned detector alone binds the same inputs as every other.
    """
    shapes = weight_shapes(spec.channels)
    for name, shape in shapes.items():
        if tuple(np.shape(weights[name])) != shape:
            raise ValueError(f"weight {name}: shape {np.shape(weights[name])}, expected {shape}")
    half = spec.half
    np_half = spec.np_half

    # Stage 1, FP32: illumination correction over the whole tile (the photometric field is per tile).
    x = g.op("Cast", ["image"], to=TensorProto.FLOAT)
    a, b = _photometric_fields(g, "photo", spec.tile)
    xn = g.op("Div", [g.op("Sub", [x, b]), a], "xn")
    # Stage 2, FP32: features on the core plus the receptive-field radius.
    span = (spec.halo - RADIUS, spec.halo + spec.core + RADIUS)
    xn = _slice(g, xn, *span, (2, 3))
    stats = {}
    for name in ("mean", "low", "high", "weight"):
        v = _slice(g, name, *span, (2, 3))
        stats[name] = v if half == TensorProto.FLOAT else g.op("Cast", [v], to=TensorProto.FLOAT)
    mu, lo, hi, w = stats["mean"], stats["low"], stats["high"], stats["weight"]
    zero = g.const(np.float32(0))
    excess = g.op("Max", [g.op("Sub", [xn, hi]), g.op("Sub", [lo, xn]), zero])
    feats = [
        g.op("Mul", [g.op("Sub", [xn, mu]), g.const(np.float32(1 / DIFF_SCALE))]),
        g.op("Mul", [excess, g.const(np.float32(1 / EXCESS_SCALE))]),
        g.op("Mul", [g.op("Sub", [mu, g.const(np.float32(128))]), g.const(np.float32(1 / MEAN_SCALE))]),
        g.op("Mul", [g.op("Sub", [hi, lo]), g.const(np.float32(1 / BAND_SCALE))]),
        g.op("Div", [g.op("Sub", [xn, mu]), g.op("Add", [g.op("Sub", [hi, lo]), g.const(np.float32(Z_FLOOR))])]),
    ]
    h = g.op("Mul", [g.op("Concat", feats, axis=1), w])
    if half == TensorProto.FLOAT16:
        h = g.op("Cast", [h], to=half)

    # Stage 3: the network, valid convolutions.
    for i, dilation in enumerate(DILATIONS):
        wt = g.const(np.asarray(weights[f"conv{i}.weight"], np_half), f"conv{i}_w")
        bs = g.const(np.asarray(weights[f"conv{i}.bias"], np_half), f"conv{i}_b")
        h = g.op("Conv", [h, wt, bs], kernel_shape=[3, 3], dilations=[dilation, dilation])
        h = g.op("Relu", [h])
    head = len(DILATIONS)
    wt = g.const(np.asarray(weights[f"conv{head}.weight"], np_half), "head_w")
    bs = g.const(np.asarray(weights[f"conv{head}.bias"], np_half), "head_b")
    logit = g.op("Conv", [h, wt, bs], kernel_shape=[1, 1])
    if bind_unused:
        corner = [_slice(g, _slice(g, f"coarse{level}", 0, 1, (1,)), 0, 1, (2, 3)) for level in LEVELS]
        logit = g.op("Add", [logit, g.op("Mul", [g.op("Sum", corner), g.const(np_half(0))])])

    # Stage 4: region weight and the learned local gain (FP32 expansion, cast back to the output type).
    w_core = _slice(g, "weight", spec.halo, spec.halo + spec.core, (2, 3))
    gain = fine_gain(g, spec, gain_channel)
    if half == TensorProto.FLOAT16:
        gain = g.op("Cast", [gain], to=half)
    g.nodes.append(helper.make_node("Mul", [g.op("Mul", [g.op("Softplus", [logit]), w_core]), gain], [out]))
