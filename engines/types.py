"""Plain value types shared by the offline and online lives: geometry, defects, results."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

DTYPES = {"uint8": np.dtype(np.uint8), "uint16": np.dtype(np.uint16)}
# px: the shortest image side inspectd fits models for (every detector; the learned one trains on
# 128 px crops, and below it a part is too small to register reliably). Any larger size works,
# square or not, whatever its remainder by the tile and block sizes.
MIN_SIDE = 128


@dataclass(frozen=True)
class Geometry:
    """What a model accepts: image size, channel count and pixel type."""

    height: int
    width: int
    channels: int
    dtype: str

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy shape of one image: (H, W) for mono, (H, W, 3) for colour."""
        return (self.height, self.width) if self.channels == 1 else (self.height, self.width, 3)

    @property
    def nbytes(self) -> int:
        return self.height * self.width * self.channels * DTYPES[self.dtype].itemsize

    def describe(self) -> str:
        kind = "mono" if self.channels == 1 else "colour"
        return f"{self.width}x{self.height} {kind} {self.dtype}"

    def check(self, image: np.ndarray) -> str | None:
        """Why ``image`` does not fit this geometry, or None when it does."""
        if image.dtype != DTYPES[self.dtype]:
            return f"pixel type {image.dtype}, expected {self.dtype}"
        if image.shape != self.shape:
            got = "x".join(map(str, image.shape[1::-1])) + (f"x{image.shape[2]}" if image.ndim == 3 else "")
            return f"image {got}, expected {self.describe()}"
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Defect:
    """One connected region above the pixel threshold; bbox in full-resolution pixels, x1/y1 exclusive."""

    bbox: tuple[int, int, int, int]
    area: int
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"bbox": [int(v) for v in self.bbox], "area": int(self.area), "score": round(float(self.score), 4)}


@dataclass
class Result:
    """The outcome of inspecting one image: verdict, why, score and the defects found."""

    verdict: str  # "pass" | "reject"
    reason: str  # "ok" | "defect" | "registration" | "bad_frame" | "error" ...
    score: float
    threshold: float
    defects: list[Defect] = field(default_factory=list)
    detail: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)
    anomaly_map: np.ndarray | None = field(default=None, repr=False)
    pose_matrix: np.ndarray | None = field(default=None, repr=False)  # reference -> frame pixels

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "verdict": self.verdict,
            "reason": self.reason,
            # no score when the frame could not be scored (registration failed, bad frame)
            "score": round(float(self.score), 4) if np.isfinite(self.score) else None,
            "threshold": round(float(self.threshold), 4),
            "defects": [d.to_dict() for d in self.defects],
        }
        if self.detail:
            out["detail"] = self.detail
        return out
