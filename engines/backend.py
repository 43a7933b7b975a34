"""The one small base class every inference backend implements.

A backend runs one ONNX graph on batches of tiles. Some graph inputs are *resident*:
constants indexed by tile position (reference statistics), handed over once at
``activate`` and kept where the compute happens (host memory for ONNX Runtime,
device memory for TensorRT). Per-frame inputs arrive with each ``infer`` call
together with the range of tile positions they belong to.

Public methods check their inputs, then call the ``_impl`` hooks, so each backend
file only says how it runs, never what it accepts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class BackendError(RuntimeError):
    """A backend could not be created, activated or run; the message says why."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of one graph input or output (-1 = batch)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]


class Backend(ABC):
    """Runs one graph on batches of tiles: activate, infer, deactivate."""

    name = "backend"

    def __init__(self, graph_path: Path) -> None:
        self.graph_path = Path(graph_path)
        self._active = False
        self._n_tiles = 0
        self._resident_names: tuple[str, ...] = ()

    # -- introspection (subclasses fill _inputs and _outputs when they open the graph) --
    _inputs: dict[str, TensorSpec]
    _outputs: dict[str, TensorSpec]

    @property
    def inputs(self) -> dict[str, TensorSpec]:
        """Every graph input, resident ones included."""
        return self._inputs

    @property
    def outputs(self) -> dict[str, TensorSpec]:
        """Every graph output."""
        return self._outputs

    @property
    def is_active(self) -> bool:
        return self._active

    @property
    def max_batch(self) -> int:
        """Largest tile batch one ``infer`` call accepts (0 = unbounded)."""
        return 0

    # -- lifecycle -------------------------------------------------------------
    def activate(self, resident: Mapping[str, np.ndarray] | None = None) -> None:
        """Allocate buffers, take the resident constants ([tiles, ...] each) and warm up."""
        if self._active:
            raise BackendError(f"{self.name}: already active")
        resident = dict(resident or {})
        counts = set()
        for name, array in resident.items():
            spec = self._spec(name)
            self._check_array(spec, array, "resident")
            counts.add(array.shape[0])
        if len(counts) > 1:
            raise BackendError(f"{self.name}: resident inputs disagree on the tile count: {sorted(counts)}")
        self._n_tiles = counts.pop() if counts else 0
        self._resident_names = tuple(resident)
        self._activate_impl(resident)
        self._active = True

    def infer(self, feeds: Mapping[str, np.ndarray], tiles: range | None = None) -> dict[str, np.ndarray]:
        """Run one batch: per-frame ``feeds`` for the tile positions ``tiles``; returns the outputs."""
        if not self._active:
            raise BackendError(f"{self.name}: infer() before activate()")
        return self._infer_impl(feeds, self._check_batch(feeds, tiles))

    def infer_many(
        self, batches: Sequence[tuple[Mapping[str, np.ndarray], range | None]]
    ) -> list[dict[str, np.ndarray]]:
        """Run a whole frame's batches (each what ``infer`` takes); outputs in the order given.

        Every batch is checked before any runs. Backends that can overlap batches (pipelined
        streams, tiles on several cores) override ``_infer_many_impl``; by default they run in turn.
        """
        return self._infer_many_impl(self._check_batches(batches))

    def infer_each(
        self,
        batches: Sequence[tuple[Mapping[str, np.ndarray], range | None]],
        consume: Callable[[int, dict[str, np.ndarray]], None],
    ) -> None:
        """``infer_many``, handing each batch's outputs to ``consume(index, outputs)`` as soon as they are done.

        ``consume`` may be called from another thread and out of order (writes to disjoint places,
        such as stitching tiles into a map, are safe); every call has returned when this returns.
        By default the batches run as ``infer_many`` and are consumed in order, on this thread.
        """
        for index, outputs in enumerate(self.infer_many(batches)):
            consume(index, outputs)

    def _check_batches(
        self, batches: Sequence[tuple[Mapping[str, np.ndarray], range | None]]
    ) -> list[tuple[Mapping[str, np.ndarray], range]]:
        if not self._active:
            raise BackendError(f"{self.name}: infer() before activate()")
        return [(feeds, self._check_batch(feeds, tiles)) for feeds, tiles in batches]

    def deactivate(self) -> None:
        """Free every buffer; the backend can be activated again afterwards."""
        if self._active:
            self._deactivate_impl()
            self._active = False

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    # -- hooks -----------------------------------------------------------------
    @abstractmethod
    def _activate_impl(self, resident: dict[str, np.ndarray]) -> None: ...

    @abstractmethod
    def _infer_impl(self, feeds: Mapping[str, np.ndarray], tiles: range) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def _deactivate_impl(self) -> None: ...

    def _infer_many_impl(self, batches: list[tuple[Mapping[str, np.ndarray], range]]) -> list[dict[str, np.ndarray]]:
        return [self._infer_impl(feeds, tiles) for feeds, tiles in batches]

    # -- checks ----------------------------------------------------------------
    def _spec(self, name: str) -> TensorSpec:
        try:
            return self.inputs[name]
        except KeyError:
            raise BackendError(f"{self.name}: graph has no input {name!r} (inputs: {sorted(self.inputs)})") from None

    def _check_array(self, spec: TensorSpec, array: np.ndarray, what: str) -> None:
        if not isinstance(array, np.ndarray):
            raise BackendError(f"{self.name}: {what} input {spec.name!r} is {type(array).__name__}, not an ndarray")
        if array.dtype != spec.dtype:
            raise BackendError(f"{self.name}: {what} input {spec.name!r} is {array.dtype}, expected {spec.dtype}")
        if array.ndim != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, array.shape, strict=True)
        ):
            raise BackendError(
                f"{self.name}: {what} input {spec.name!r} has shape {array.shape}, expected {spec.shape}"
            )

    def _check_batch(self, feeds: Mapping[str, np.ndarray], tiles: range | None) -> range:
        """Check one batch's per-frame feeds and tile range (None = 0..batch); returns the range."""
        batch = self._check_feeds(feeds)
        if tiles is None:
            tiles = range(batch)
        if len(tiles) != batch or tiles.step != 1:
            raise BackendError(f"{self.name}: {batch} tiles fed but tile range {tiles} given")
        if self._n_tiles and (tiles.start < 0 or tiles.stop > self._n_tiles):
            raise BackendError(f"{self.name}: tile range {tiles} outside 0..{self._n_tiles}")
        if self.max_batch and batch > self.max_batch:
            raise BackendError(f"{self.name}: batch {batch} exceeds the maximum {self.max_batch}")
        return tiles

    def _check_feeds(self, feeds: Mapping[str, np.ndarray]) -> int:
        missing = self._frame_inputs() - set(feeds)
        extra = set(feeds) - self._frame_inputs()
        if missing or extra:
            raise BackendError(
                f"{self.name}: feeds must be exactly {sorted(self._frame_inputs())}; "
                f"missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        batches = set()
        for name, array in feeds.items():
            self._check_array(self._spec(name), array, "per-frame")
            batches.add(array.shape[0])
        if len(batches) != 1:
            raise BackendError(f"{self.name}: per-frame inputs disagree on the batch size: {sorted(batches)}")
        batch = batches.pop()
        if batch < 1:
            raise BackendError(f"{self.name}: empty batch")
        return batch

    def _frame_inputs(self) -> set[str]:
        return set(self.inputs) - set(self.resident_names)

    @property
    def resident_names(self) -> tuple[str, ...]:
        """Inputs supplied once at activation."""
        return self._resident_names
