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
   larger than the receptive-field radius, ``RADIUS``); the two-scale network (``--network
   twoscale``) runs on 2x2 pixel blocks that sit on the same frame grid in every tile;
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
    block: int = 1  # its map has one value per block x block pixels: 2 for the two-scale network's layers

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.cout, self.cin // self.groups, self.kernel, self.kernel)

    @property
    def macs(self) -> int:
        """Multiply-accumulates per full-resolution output pixel."""
        return int(np.prod(self.weight_shape)) // self.block**2


@dataclass(frozen=True)
class Architecture:
    """The learned network: 3x3 convolutions with ``DILATIONS`` and ReLU, then a 1x1 head to one logit.

    The first ``full`` 3x3 layers are full convolutions; each later one is depthwise-separable: a
    depthwise dilated 3x3 (no bias, no ReLU: it is linear up to the next layer) and a pointwise 1x1
    with ReLU. The first layer is always full: it mixes the features at the finest scale, where
    5x5 px dots live. Same receptive field (``RADIUS``) for every architecture.

    ``two_scale``: every layer on 2x2 blocks of pixels, a quarter of the positions; a fine branch that
    still sees and scores each pixel, and a context branch with the wide receptive field, fused by a
    1x1 before the head (see ``two_scale_layers``).
    """

    name: str
    full: int = len(DILATIONS)
    width: int = WIDTH
    two_scale: bool = False

    @property
    def separable(self) -> bool:
        return self.full < len(DILATIONS)

    def layers(self, channels: int) -> list[Layer]:
        """Every convolution in order; the last is the head."""
        w = self.width
        if self.two_scale:
            return two_scale_layers(FEATURES * channels, w)
        layers = [Layer(FEATURES * channels, w, 3, DILATIONS[0])]
        for i, dilation in enumerate(DILATIONS[1:], start=1):
            if i < self.full:
                layers.append(Layer(w, w, 3, dilation))
            else:
                layers += [Layer(w, w, 3, dilation, groups=w, bias=False, relu=False), Layer(w, w, 1)]
        return [*layers, Layer(w, 1, 1, relu=False)]


def two_scale_layers(cin: int, w: int) -> list[Layer]:
    """The two-scale network's convolutions, in the order ``_two_scale_network`` (graph and torch) runs them.

    Every layer runs at half resolution, on 2x2 blocks of pixels; only the features and the logit are
    at full resolution. The fine branch keeps every pixel: its input is the features of each block's
    four pixels side by side (space-to-depth, 4 x ``cin`` channels), its output one logit per pixel
    (depth-to-space of 4 channels), so a 5x5 px dot is still seen pixel by pixel.
    0: fine: 3x3 over the blocks (a 6x6 px window around each pixel), ``w`` channels, ReLU;
    1-4: context: 3x3 on the features 2x2-averaged, dilations ``DILATIONS[:-1]`` (2, 4, 8, 16 px at
       full resolution for the 16-channel layers, as in the dilated network), ReLU;
    5: 1x1 across both branches (concatenated), ``w`` channels, ReLU: each block fused with its context;
    6: the head: 1x1 to four logits, one per pixel of the block.
    Receptive field: 1 + 2 * (1 + 2 + 4 + 8) = 31 px = ``RADIUS``, as for the other networks. Why so:
    the dense convolutions run near ONNX Runtime's arithmetic peak, but the elementwise work between
    full-resolution layers (a 16-channel upsample, concatenation or add per pixel) cost as much as
    the convolutions it saved; on blocks, only the 5 feature channels and the logit are full size.
    """
    fine = Layer(4 * cin, w, 3, block=2)
    context = [Layer(cin if i == 0 else w, w, 3, d, block=2) for i, d in enumerate(DILATIONS[:-1])]
    return [fine, *context, Layer(2 * w, w, 1, block=2), Layer(w, 4, 1, relu=False, block=2)]


# Crops of the two-scale network's input, px per side (input core + 2 * RADIUS): both branches read it
# less 1 px, so every 2x2 block and averaging window starts on an even frame coordinate in every tile
# (core origins are multiples of ALIGN; the input starts at core origin - RADIUS): tiling stays exact.
# The context stack then ends exactly on the core (2 * 15 px); the fine branch reads the core's blocks
# plus its 1-block radius.
TWO_SCALE_CROP = RADIUS - 2 * sum(DILATIONS[:-1])
TWO_SCALE_FINE_CROP = (RADIUS - TWO_SCALE_CROP) // 2 - 1  # blocks, after the first crop
assert TWO_SCALE_CROP == 1 and TWO_SCALE_FINE_CROP == 14

ARCHITECTURES = {
    a.name: a
    for a in (
        Architecture("dilated"),
        Architecture("separable", full=1),
        Architecture("hybrid", full=2),
        Architecture("twoscale", two_scale=True),
    )
}
# What a new fit trains: the two-scale network finds what the dilated one finds at half its CPU time
# (README, the learned detector: three lines side by side). Bundles, graphs and checkpoints that do
# not record their architecture were all written before there was a choice: they are LEGACY's.
DEFAULT_ARCHITECTURE = "twoscale"
LEGACY_ARCHITECTURE = "dilated"
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
    arch = architecture(network)
    run = _two_scale_network if arch.two_scale else _network
    logit = run(g, h, arch.layers(spec.channels), weights, np_half)
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
    for i in range(len(layers)):
        h = _conv(g, h, i, layers, weights, np_half)
    return h


def _conv(g: _Builder, h: str, i: int, layers: list[Layer], weights: Mapping[str, np.ndarray], np_half: type) -> str:
    """Layer ``i`` of ``layers`` on ``h``, and its ReLU where it has one."""
    layer = layers[i]
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
    return g.op("Relu", [h]) if layer.relu else h


def _two_scale_network(
    g: _Builder, h: str, layers: list[Layer], weights: Mapping[str, np.ndarray], np_half: type
) -> str:
    """The two-scale network (``two_scale_layers``) on ``h``: features of the core plus ``RADIUS`` per side."""
    h = _slice(g, h, TWO_SCALE_CROP, -TWO_SCALE_CROP, (2, 3))
    # SpaceToDepth: channel (dy * 2 + dx) * C + c holds pixel (2y + dy, 2x + dx) of channel c.
    blocks = _slice(g, g.op("SpaceToDepth", [h], blocksize=2), TWO_SCALE_FINE_CROP, -TWO_SCALE_FINE_CROP, (2, 3))
    fuse, head = len(layers) - 2, len(layers) - 1  # the layers' order: fine, context..., fuse, head
    fine = _conv(g, blocks, 0, layers, weights, np_half)
    context = g.op("AveragePool", [h], kernel_shape=[2, 2], strides=[2, 2])
    for i in range(1, fuse):
        context = _conv(g, context, i, layers, weights, np_half)
    fused = _conv(g, g.op("Concat", [fine, context], axis=1), fuse, layers, weights, np_half)
    # DepthToSpace of the four logits: channel dy * 2 + dx is pixel (2y + dy, 2x + dx).
    return g.op("DepthToSpace", [_conv(g, fused, head, layers, weights, np_half)], blocksize=2, mode="DCR")
