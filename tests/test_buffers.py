"""Reused anomaly-map buffers (engines/buffers.py): a map anyone still holds is never overwritten."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines.buffers import BufferPool


def test_a_held_buffer_is_never_handed_out_again() -> None:
    pool = BufferPool((8, 8), np.float32)
    first = pool.take()
    first[...] = 1
    second = pool.take()
    assert second is not first
    second[...] = 2
    assert (first == 1).all()
    assert pool.reused == 0


def test_a_dropped_buffer_is_reused() -> None:
    pool = BufferPool((8, 8), np.float32)
    address = pool.take().ctypes.data  # dropped at once
    again = pool.take()
    assert again.ctypes.data == address
    assert pool.reused == 1


@pytest.mark.parametrize("holder", ["view", "memoryview", "list"])
def test_any_reference_keeps_a_buffer_out_of_reuse(holder: str) -> None:
    """A view (its base), an exported buffer (a zero-copy send) or a container: each pins the buffer."""
    pool = BufferPool((8, 8), np.float32)
    buf = pool.take()
    address = buf.ctypes.data
    kept = {"view": lambda b: b[2:], "memoryview": memoryview, "list": lambda b: [b]}[holder](buf)
    del buf
    assert pool.take().ctypes.data != address
    del kept
    assert pool.take().ctypes.data == address


def test_buffers_beyond_keep_are_not_kept() -> None:
    pool = BufferPool((4,), np.uint8, keep=1)
    held = [pool.take() for _ in range(3)]
    assert len({b.ctypes.data for b in held}) == 3
    assert len(pool._buffers) == 1


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[np.ndarray], Path]:
    """A tiny synthetic line (256 px, good and defective frames) and a template bundle fitted on it."""
    from calibration.datasets import load_dataset
    from calibration.synth import SynthConfig, write_dataset
    from calibration.template_fit import FitConfig, fit_template
    from engines.decode import read_image

    root = tmp_path_factory.mktemp("buffers")
    synth = SynthConfig(size=256, train=8, test_good=2, per_kind=1, kinds=("dot", "missing"), workers=1)
    write_dataset(root / "data", synth, progress=False)
    fit_template(
        load_dataset(root / "data").train_good, root / "bundle", config=FitConfig(core=128, folds=4), progress=False
    )
    return [read_image(p) for p in sorted((root / "data" / "test").rglob("*.png"))], root / "bundle"


def test_inspector_reuses_a_dropped_map_and_never_a_held_one(line: tuple[list[np.ndarray], Path]) -> None:
    """Results kept by the caller keep their maps; a dropped result's map is reused; every map is the same
    as an inspector that allocates afresh computes (the reuse changes no pixel and no decision)."""
    from engines.inspector import Inspector

    frames, bundle = line
    with Inspector.load(bundle, backend="onnxruntime") as inspector:
        streamed = []
        for f in frames:  # each result dropped before the next frame, as the daemon's decisions are
            result = inspector.inspect(f)
            streamed.append((result.verdict, result.reason, result.anomaly_map.copy()))
            del result
        assert inspector._maps.reused >= len(frames)  # the warm-up's map, then each frame's, handed on
        kept = [inspector.inspect(f) for f in frames]
        copies = [r.anomaly_map.copy() for r in kept]
        for f in frames:  # more frames while the kept results hold their maps
            inspector.inspect(f)
    assert len({r.anomaly_map.ctypes.data for r in kept}) == len(frames)  # none shares a buffer
    for held, copy, (verdict, reason, fresh) in zip(kept, copies, streamed, strict=True):
        np.testing.assert_array_equal(held.anomaly_map, copy)  # untouched by the later frames
        np.testing.assert_array_equal(fresh, copy)  # a reused buffer gives the same map ...
        assert (held.verdict, held.reason) == (verdict, reason)  # ... and the same decision
