"""The ensemble graph: the template and the learned detector on the same tile, their calibrated maps combined.

Both detectors read the same inputs (``engines.graphs.tile_inputs``); ``fine_gain`` has one
channel per score, the template's (its fine score, then its shape scores) and the learned map's
(last), each carried with the frame's pose by the Inspector. Each map is divided by its own
detector's calibrated threshold, so 1.0 means "at that detector's threshold" in both; the
output is their mean. Where good parts make one detector fire, the other rarely agrees, so the
mean of good parts stays low, while a defect that one detector sees clearly, or both see
faintly, stands out; the ensemble's own threshold is set on held-out good parts
(``calibration.ensemble_fit``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from engines.graphs import TemplateGraphSpec, _Builder, finish_model, template_anomaly, tile_inputs
from engines.learned_graph import DEFAULT_ARCHITECTURE, NETWORK_KEY, RADIUS, learned_anomaly


@dataclass(frozen=True)
class EnsembleGraphSpec(TemplateGraphSpec):
    """The template spec (its fine and coarse scales) plus each detector's calibrated threshold."""

    gains: int = 2
    template_threshold: float = 1.0
    learned_threshold: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gains != self.template_gains + 1 or self.components:
            raise ValueError(
                f"the ensemble graph reads {self.template_gains + 1} gain channels (the template's and the learned "
                "map's) and outputs one combined map"
            )
        if min(self.template_threshold, self.learned_threshold) <= 0:
            raise ValueError("detector thresholds must be positive")


def build_ensemble_graph(
    spec: EnsembleGraphSpec, weights: Mapping[str, np.ndarray], network: str = DEFAULT_ARCHITECTURE
) -> onnx.ModelProto:
    """(template / template_threshold + learned / learned_threshold) / 2 per pixel of the core."""
    g = _Builder()
    np_half = spec.np_half
    template_anomaly(g, spec, "template_map", gain_channel=0)
    learned_anomaly(g, spec, weights, "learned_map", gain_channel=spec.template_gains, network=network)
    scaled = [
        g.op("Mul", ["template_map", g.const(np_half(0.5 / spec.template_threshold))]),
        g.op("Mul", ["learned_map", g.const(np_half(0.5 / spec.learned_threshold))]),
    ]
    g.nodes.append(helper.make_node("Add", scaled, ["anomaly"]))
    outputs = [helper.make_tensor_value_info("anomaly", spec.half, ["N", 1, spec.core, spec.core])]
    extra = {"inspectd.receptive_radius": str(RADIUS), NETWORK_KEY: network}
    return finish_model(g, "ensemble", tile_inputs(spec), outputs, spec.precision, spec.core, spec.halo, extra)
