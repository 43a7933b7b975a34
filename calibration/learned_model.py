"""Training side of the learned detector: the torch network and the synthetic defect augmentation.

Imported by ``calibration.learned_fit`` only (torch is a fit-time dependency, the ``learned``
extra); run time uses the ONNX graph of ``engines.learned_graph``, built from this network's
weights. Features and layers mirror that graph exactly (tests compare the two).

Synthetic defects are drawn on registered good crops in 8-bit grey units, before the lighting
correction, as a camera would see them: dots (from 3 px), scratches, low-contrast stains,
missing structure (the region replaced by a blurred, structure-free version), foreign
structure (texture copied from elsewhere in the same image), smears (directional blur). Masks
are irregular: thresholded smoothed noise. The label is where the defect changed the crop by
more than ``LABEL_MIN`` grey levels (smoothed over ~1 px).
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from engines.errors import UserError
from engines.learned_graph import (
    BAND_SCALE,
    DEFAULT_ARCHITECTURE,
    DIFF_SCALE,
    EXCESS_SCALE,
    LEGACY_ARCHITECTURE,
    MEAN_SCALE,
    NETWORK_KEY,
    RADIUS,
    TWO_SCALE_CROP,
    TWO_SCALE_FINE_CROP,
    Z_FLOOR,
    architecture,
)

LABEL_MIN = 2.0  # grey levels, of the change smoothed over ~1 px
DEFECT_KINDS = ("dot", "scratch", "stain", "missing", "foreign", "smear")


class LearnedNet(nn.Module):
    """The network of ``engines.learned_graph.Architecture`` ``network``: valid convolutions, ReLU where the
    architecture says, the last a 1x1 head to one logit; output side = input side - 2*RADIUS."""

    def __init__(self, channels: int, network: str = DEFAULT_ARCHITECTURE) -> None:
        super().__init__()
        self.network = network
        self.layers = architecture(network).layers(channels)
        # PyTorch's CPU depthwise dilated convolution is 3-4x slower per training step in NCHW than in
        # channels-last (oneDNN); the dilated network trains as it always has.
        self.memory_format = torch.channels_last if architecture(network).separable else torch.contiguous_format
        self.convs = nn.ModuleList(
            nn.Conv2d(
                layer.cin, layer.cout, layer.kernel, dilation=layer.dilation, groups=layer.groups, bias=layer.bias
            )
            for layer in self.layers
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if architecture(self.network).two_scale:
            return self._two_scale(features)
        h = features
        for i in range(len(self.layers)):
            h = self._conv(i, h)
        return h

    def _conv(self, i: int, h: torch.Tensor) -> torch.Tensor:
        h = self.convs[i](h)
        return torch.relu(h) if self.layers[i].relu else h

    def _two_scale(self, features: torch.Tensor) -> torch.Tensor:
        """``engines.learned_graph.two_scale_layers``, as the graph's ``_two_scale_network`` runs them."""
        if features.shape[-1] % 2 or features.shape[-2] % 2:
            raise ValueError(f"the two-scale network needs an even input side, got {tuple(features.shape[-2:])}")
        j, k = TWO_SCALE_CROP, TWO_SCALE_FINE_CROP
        h = features[..., j:-j, j:-j]
        # ONNX SpaceToDepth's channel order, (dy * 2 + dx) * C + c (torch's pixel_unshuffle interleaves c first).
        blocks = torch.cat([h[..., dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)], dim=1)
        fuse, head = len(self.layers) - 2, len(self.layers) - 1  # the layers' order: fine, context..., fuse, head
        fine = self._conv(0, blocks[..., k:-k, k:-k])
        context = nn.functional.avg_pool2d(h, 2)
        for i in range(1, fuse):
            context = self._conv(i, context)
        fused = self._conv(fuse, torch.cat([fine, context], dim=1))
        return nn.functional.pixel_shuffle(self._conv(head, fused), 2)

    def numpy_weights(self) -> dict[str, np.ndarray]:
        """Weights named as ``engines.learned_graph.weight_shapes`` expects."""
        return {
            f"conv{i}.{kind}": getattr(conv, kind).detach().cpu().numpy().astype(np.float32)
            for i, conv in enumerate(self.convs)
            for kind in ("weight", "bias")
            if getattr(conv, kind) is not None
        }


def features(xn: torch.Tensor, mu: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The graph's features (``engines.learned_graph``) in torch: [N, C, H, W] each, w [N, 1, H, W]."""
    excess = torch.clamp(torch.maximum(xn - hi, lo - xn), min=0)
    parts = [
        (xn - mu) / DIFF_SCALE,
        excess / EXCESS_SCALE,
        (mu - 128) / MEAN_SCALE,
        (hi - lo) / BAND_SCALE,
        (xn - mu) / (hi - lo + Z_FLOOR),
    ]
    return torch.cat(parts, dim=1) * w


def score_map(logit: torch.Tensor) -> torch.Tensor:
    """What the graph outputs (before the region weight): softplus of the logit."""
    return nn.functional.softplus(logit)


# -- synthetic defects -----------------------------------------------------------------------------
def irregular_mask(
    rng: np.random.Generator, shape: tuple[int, int], centre: tuple[float, float], radius: float
) -> np.ndarray:
    """A blob of about ``radius`` px: smoothed noise plus a radial falloff, thresholded, with soft edges (0..1)."""
    h, w = shape
    noise = rng.standard_normal((h, w)).astype(np.float32)
    sigma = max(radius / 3, 1.0)
    noise = cv2.GaussianBlur(noise, (0, 0), sigma)
    noise /= noise.std() + 1e-6
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    r = np.hypot(yy - centre[0], xx - centre[1]) / max(radius, 1.0)
    field = 1.0 - r + 0.35 * noise
    mask = np.clip(field * 4, 0, 1)
    return cv2.GaussianBlur(mask, (0, 0), 0.7)


def _line_mask(rng: np.random.Generator, shape: tuple[int, int], centre: tuple[float, float]) -> np.ndarray:
    length = rng.uniform(10, min(shape) * 0.8)
    angle = rng.uniform(0, np.pi)
    width = int(rng.integers(1, 4))
    dy, dx = np.sin(angle) * length / 2, np.cos(angle) * length / 2
    mask = np.zeros(shape, np.float32)
    p0 = (round((centre[1] - dx) * 16), round((centre[0] - dy) * 16))
    p1 = (round((centre[1] + dx) * 16), round((centre[0] + dy) * 16))
    cv2.line(mask, p0, p1, 1.0, width, cv2.LINE_AA, shift=4)
    return mask


def add_defect(
    crop: np.ndarray, rng: np.random.Generator, source: np.ndarray, margin: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one random defect on ``crop`` [C, H, W] (grey units); returns (defective crop, label [H, W] in {0, 1}).

    ``source`` [C, H', W'] is another part of the image (texture for foreign structure). The defect's
    centre stays ``margin`` px inside the crop, so it lies where the network's output is.
    """
    c, h, w = crop.shape
    centre = (rng.uniform(margin, h - margin), rng.uniform(margin, w - margin))
    kind = DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))]
    sign = 1.0 if rng.random() < 0.5 else -1.0
    tint = rng.uniform(0.6, 1.0, (c, 1, 1)).astype(np.float32) if c > 1 else np.ones((1, 1, 1), np.float32)
    out = crop.copy()
    if kind == "dot":
        radius = rng.uniform(1.5, 6)
        mask = np.zeros((h, w), np.float32)
        cv2.circle(
            mask, (round(centre[1] * 16), round(centre[0] * 16)), round(radius * 16), 1.0, -1, cv2.LINE_AA, shift=4
        )
        out = out + sign * rng.uniform(15, 80) * tint * mask
    elif kind == "scratch":
        mask = _line_mask(rng, (h, w), centre)
        out = out + sign * rng.uniform(12, 60) * tint * mask
    elif kind == "stain":
        mask = irregular_mask(rng, (h, w), centre, rng.uniform(8, min(h, w) / 3))
        out = out + sign * rng.uniform(4, 15) * tint * mask
    else:
        mask = irregular_mask(rng, (h, w), centre, rng.uniform(4, min(h, w) / 4))
        if kind == "missing":
            k = int(rng.integers(7, 16)) | 1
            other = np.stack([cv2.medianBlur(np.clip(p, 0, 255).astype(np.uint8), k).astype(np.float32) for p in crop])
            other = np.stack([cv2.GaussianBlur(p, (0, 0), 3) for p in other])
        elif kind == "foreign":
            flip = [lambda p: p, np.fliplr, np.flipud, lambda p: p.T][int(rng.integers(4))]
            other = np.stack([np.ascontiguousarray(flip(p))[:h, :w] for p in source])
            if other.shape[1:] != (h, w):
                other = np.stack([cv2.resize(p, (w, h)) for p in other])
        else:  # smear: directional blur
            k = int(rng.integers(7, 21))
            kernel = np.zeros((k, k), np.float32)
            cv2.line(kernel, (0, int(rng.integers(k))), (k - 1, int(rng.integers(k))), 1.0, 1)
            kernel /= kernel.sum()
            other = np.stack([cv2.filter2D(p, -1, kernel, borderType=cv2.BORDER_REFLECT) for p in crop])
        out = out * (1 - mask) + other * mask
    out = np.clip(out, 0, 255).astype(np.float32)
    # Smoothed signed change: denoising a flat area (missing structure, smears) is not a defect by itself.
    change = np.stack([cv2.GaussianBlur(p, (0, 0), 1.0) for p in out - crop])
    label = (np.abs(change).max(axis=0) > LABEL_MIN).astype(np.float32)
    return out, label


def output_crop(array: np.ndarray) -> np.ndarray:
    """The part of a [..., H, W] array that the valid network outputs for an H x W input."""
    return array[..., RADIUS:-RADIUS, RADIUS:-RADIUS]


# -- starting from pretrained weights ----------------------------------------------------------------
_ONNX_WEIGHT = re.compile(r"^(conv(\d+)|head)_([wb])_\d+$")


def load_initial_weights(model: LearnedNet, path: Path) -> list[str]:
    """Copy every layer of ``path`` whose name and shape match ``model``'s into it; returns the names copied.

    ``path`` is a file on disk, never a download: a PyTorch state dict (``.pt``/``.pth``, or an
    inspectd training checkpoint), an inspectd learned graph (``.onnx``) or a learned bundle
    directory. Layers whose shape differs (another colour layout) keep their initialisation.
    """
    source = _read_weights(Path(path), model)
    own = model.state_dict()
    copied = [k for k, v in source.items() if k in own and tuple(own[k].shape) == tuple(v.shape)]
    if not copied:
        raise UserError(f"{path}: no layer matches the learned network ({', '.join(own)})")
    own.update({k: torch.as_tensor(np.asarray(source[k], np.float32)) for k in copied})
    model.load_state_dict(own)
    return copied


def _read_weights(path: Path, model: LearnedNet) -> dict[str, np.ndarray]:
    if path.is_dir():
        path = path / "graph_fp32.onnx"
    if not path.is_file():
        raise UserError(f"{path}: no such weights file (expected .pt, .pth, .onnx or a learned bundle directory)")
    if path.suffix == ".onnx":
        import onnx
        from onnx import numpy_helper

        try:
            graph = onnx.load(str(path))
        except Exception as exc:  # onnx raises several types for damaged files
            raise UserError(f"{path}: not a readable ONNX graph ({exc})") from None
        network = {p.key: p.value for p in graph.metadata_props}.get(NETWORK_KEY, LEGACY_ARCHITECTURE)
        if network != model.network:
            raise UserError(
                f"{path}: a {network} network; this fit trains a {model.network} one (fit --network {network})"
            )
        head = len(model.convs) - 1
        out = {}
        for init in graph.graph.initializer:
            match = _ONNX_WEIGHT.match(init.name)
            if match:
                layer = head if match.group(1) == "head" else int(match.group(2))
                kind = "weight" if match.group(3) == "w" else "bias"
                out[f"convs.{layer}.{kind}"] = numpy_helper.to_array(init).astype(np.float32)
        return out
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or damaged files
        raise UserError(f"{path}: not a readable PyTorch weights file ({exc})") from None
    state = state.get("model", state) if isinstance(state, dict) else {}
    return {k: v.detach().cpu().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}
