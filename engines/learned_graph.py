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
RADIUS = sum(DILATIONS)  # receptive-field radius of the valid 3x3 stack (px), the same for every architecture
DIFF_SCALE, EXCESS_SCALE, MEAN_SCALE, BAND_SCALE = 32.0, 16.0, 64.0, 64.0
Z_FLOOR = 4.0  # grey levels added to the band width in the normalised difference
assert RADIUS <= HALO


@dataclass(frozen=True)
class Layer:
    """One valid convolution of the network (the torch module and the ONNX node are built from it)."""

    cin: int
    cout: int
    kernel: int
    dilation: int = 1
    groups: int = 1  # cin: depthwise
    bias: bool = True
    relu: bool = True  # ReLU after this layer

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.cout, self.cin // self.groups, self.kernel, self.kernel)

    @property
    def macs(self) -> int:
        """Multiply-accumulates per output pixel."""
        return int(np.prod(self.weight_shape))


@dataclass(frozen=True)
class Architecture:
    """The learned network: 3x3 convolutions with ``DILATIONS`` and ReLU, then a 1x1 head to one logit.

    The first ``full`` 3x3 layers are full convolutions; each later one is depthwise-separable: a
    depthwise dilated 3x3 (no bias, no ReLU: it is linear up to the next layer) and a pointwise 1x1
    with ReLU. The first layer is always full: it mixes the features at the finest scale, where
    5x5 px dots live. Same receptive field (``RADIUS``) for every architecture.
    """

    name: str
    full: int = len(DILATIONS)
    width: int = WIDTH

    @property
    def separable(self) -> bool:
        return self.full < len(DILATIONS)

    def layers(self, channels: int) -> list[Layer]:
        """Every convolution in order; the last is the head."""
        w = self.width
        layers = [Layer(FEATURES * channels, w, 3, DILATIONS[0])]
        for i, dilation in enumerate(DILATIONS[1:], start=1):
            if i < self.full:
                layers.append(Layer(w, w, 3, dilation))
            else:
                layers += [Layer(w, w, 3, dilation, groups=w, bias=False, relu=False), Layer(w, w, 1)]
        return [*layers, Layer(w, 1, 1, relu=False)]


# "dilated" is the network of every bundle before the architecture was recorded.
ARCHITECTURES = {
    a.name: a for a in (Architecture("dilated"), Architecture("separable", full=1), Architecture("hybrid", full=2))
}
DEFAULT_ARCHITECTURE = "dilated"
NETWORK_KEY = "inspectd.network"  # the graph's metadata entry naming its architecture


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown learned network {name!r} (known: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[name]


@dataclass(frozen=True)
class LearnedGraphSpec(TiledGraphSpec):
    """The learned graph's shape depends on nothing beyond the common tile spec (weights come separately)."""


def weight_shapes(channels: int, network: str = DEFAULT_ARCHITECTURE) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the weight arrays: conv{i}.weight / conv{i}.bias per layer in order, the last is the head."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i, layer in enumerate(architecture(network).layers(channels)):
        shapes[f"conv{i}.weight"] = layer.weight_shape
        if layer.bias:
            shapes[f"conv{i}.bias"] = (layer.cout,)
    return shapes


def macs_per_pixel(channels: int, network: str = DEFAULT_ARCHITECTURE) -> int:
    """Multiply-accumulates of the network per output pixel."""
    return sum(layer.macs for layer in architecture(network).layers(channels))


def build_learned_graph(
    spec: LearnedGraphSpec, weights: Mapping[str, np.ndarray], network: str = DEFAULT_ARCHITECTURE
) -> onnx.ModelProto:
    """Build the tiled graph described in the module docstring with the trained ``weights`` of ``network``."""
    g = _Builder()
    learned_anomaly(g, spec, weights, "anomaly", bind_unused=True, network=network)
    outputs = [helper.make_tensor_value_info("anomaly", spec.half, ["N", 1, spec.core, spec.core])]
    extra = {"inspectd.receptive_radius": str(RADIUS), NETWORK_KEY: network}
    return finish_model(g, "learned", tile_inputs(spec), outputs, spec.precision, spec.core, spec.halo, extra)


def learned_anomaly(
    g: _Builder,
    spec: TiledGraphSpec,
    weights: Mapping[str, np.ndarray],
    out: str,
    gain_channel: int = 0,
    bind_unused: bool = False,
    network: str = DEFAULT_ARCHITECTURE,
) -> None:
    """Add the learned detector's nodes, reading the tile inputs, writing tensor ``out`` [N, 1, core, core].

    ``bind_unused``: consume one element of each input the network does not read (times zero),
    so a graph of the learned detector alone binds the same inputs as every other.
    """
    for name, shape in weight_shapes(spec.channels, network).items():
        if name not in weights or tuple(np.shape(weights[name])) != shape:
            found = np.shape(weights[name]) if name in weights else "missing"
            raise ValueError(f"{network} network, weight {name}: {found}, expected {shape}")
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
    logit = _network(g, h, architecture(network).layers(spec.channels), weights, np_half)
    if bind_unused:
        corner = [_slice(g, _slice(g, f"coarse{level}", 0, 1, (1,)), 0, 1, (2, 3)) for level in LEVELS]
        logit = g.op("Add", [logit, g.op("Mul", [g.op("Sum", corner), g.const(np_half(0))])])

    # Stage 4: region weight and the learned local gain (FP32 expansion, cast back to the output type).
    w_core = _slice(g, "weight", spec.halo, spec.halo + spec.core, (2, 3))
    gain = fine_gain(g, spec, gain_channel)
    if half == TensorProto.FLOAT16:
        gain = g.op("Cast", [gain], to=half)
    score = _softplus(g, logit, np_half)
    g.nodes.append(helper.make_node("Mul", [g.op("Mul", [score, w_core]), gain], [out]))


def _softplus(g: _Builder, x: str, np_half: type) -> str:
    """softplus(x) = relu(x) + log1p(exp(-|x|)), stable; ONNX Runtime's CPU Softplus kernel took ~9x longer.

    ONNX has no log1p: log(1 + u) rounds to 0 below u ~ 6e-8 (x < -16.6), where softplus is ~u.
    u - u^2/2 <= log1p(u) for u >= 0 and is exact to float precision there, so the larger of the
    two keeps the map positive wherever softplus is (a very sure network's good parts still score
    above 0, and "threshold = (1 + margin) * worst held-out good score" keeps its meaning).
    """
    u = g.op("Exp", [g.op("Neg", [g.op("Abs", [x])])])
    series = g.op("Mul", [u, g.op("Add", [g.op("Mul", [u, g.const(np_half(-0.5))]), g.const(np_half(1))])])
    log1p = g.op("Max", [g.op("Log", [g.op("Add", [u, g.const(np_half(1))])]), series])
    return g.op("Add", [g.op("Relu", [x]), log1p])


def _network(g: _Builder, h: str, layers: list[Layer], weights: Mapping[str, np.ndarray], np_half: type) -> str:
    """The convolutions of ``layers`` on ``h``; initializers named conv{i}_w / conv{i}_b, the last head_w / head_b."""
    for i, layer in enumerate(layers):
        prefix = "head" if i == len(layers) - 1 else f"conv{i}"
        inputs = [h, g.const(np.asarray(weights[f"conv{i}.weight"], np_half), f"{prefix}_w")]
        if layer.bias:
            inputs.append(g.const(np.asarray(weights[f"conv{i}.bias"], np_half), f"{prefix}_b"))
        # Attributes only where they differ from ONNX's defaults: the dilated network's graph stays as it was.
        attrs: dict[str, object] = {"kernel_shape": [layer.kernel] * 2}
        if layer.kernel > 1:
            attrs["dilations"] = [layer.dilation] * 2
        if layer.groups > 1:
            attrs["group"] = layer.groups
        h = g.op("Conv", inputs, **attrs)
        if layer.relu:
            h = g.op("Relu", [h])
    return h
