"""EMULATED TensorRT and pycuda for tests on machines without a GPU (they prove nothing about a GPU).

``install`` puts the emulated ``tensorrt`` (10.x or 11.x flavour) and ``pycuda.driver``
into ``sys.modules`` for one test; ``hide`` makes both unimportable, as on a CPU-only
box; ``write_toy_graph`` writes a small graph with the real template's I/O types
(uint8 image, float32 photo, float16 resident reference; float16 or float32 output).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.emulation import fake_pycuda, fake_tensorrt

TILE, HALO = 8, 2
CORE = TILE - 2 * HALO


def install(monkeypatch, major: int = 11, device_count: int = 1) -> tuple[types.ModuleType, types.ModuleType]:
    """Emulated (tensorrt, pycuda.driver) in sys.modules, with a fresh emulated driver.

    The test-only helpers of the driver emulation stay on ``fake_pycuda`` itself.
    """
    fake_pycuda.reset(device_count)
    trt = fake_tensorrt.make_module(major)
    driver = fake_pycuda.driver_module()
    package = types.ModuleType("pycuda", "EMULATED pycuda (tests only)")
    package.driver = driver
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt, driver


def hide(monkeypatch) -> None:
    """Make ``import tensorrt`` and ``import pycuda.driver`` fail, whatever is installed."""
    for name in ("tensorrt", "pycuda", "pycuda.driver"):
        monkeypatch.setitem(sys.modules, name, None)


def write_toy_graph(path: Path, fp16: bool = True, fixed_batch: bool = False) -> Path:
    """anomaly = core(image * 2 + reference[:, 0] + photo[:, 0]) with the template's I/O types."""
    compute = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    batch: str | int = 1 if fixed_batch else "N"
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=compute),
        helper.make_node("Mul", ["x", "two"], ["x2"]),
        helper.make_node("Slice", ["reference", "c0", "c1", "axis1"], ["ref0"]),
        helper.make_node("Cast", ["ref0"], ["ref"], to=compute),
        helper.make_node("Slice", ["photo", "c0", "c1", "axis1"], ["gain"]),
        helper.make_node("Unsqueeze", ["gain", "axes23"], ["gain4"]),
        helper.make_node("Cast", ["gain4"], ["g"], to=compute),
        helper.make_node("Add", ["x2", "ref"], ["s"]),
        helper.make_node("Add", ["s", "g"], ["t"]),
        helper.make_node("Slice", ["t", "lo", "hi", "axes23"], ["core"]),
        helper.make_node("Identity", ["core"], ["anomaly"]),
    ]
    dtype = np.float16 if fp16 else np.float32
    inits = [
        numpy_helper.from_array(np.array(2, dtype), "two"),
        helper.make_tensor("c0", TensorProto.INT64, [1], [0]),
        helper.make_tensor("c1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("axes23", TensorProto.INT64, [2], [2, 3]),
        helper.make_tensor("lo", TensorProto.INT64, [2], [HALO, HALO]),
        helper.make_tensor("hi", TensorProto.INT64, [2], [HALO + CORE, HALO + CORE]),
    ]
    graph = helper.make_graph(
        nodes,
        "toy",
        [
            helper.make_tensor_value_info("image", TensorProto.UINT8, [batch, 1, TILE, TILE]),
            helper.make_tensor_value_info("photo", TensorProto.FLOAT, [batch, 6]),
            helper.make_tensor_value_info("reference", TensorProto.FLOAT16, [batch, 4, TILE, TILE]),
        ],
        [helper.make_tensor_value_info("anomaly", compute, [batch, 1, CORE, CORE])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)


def toy_expected(image: np.ndarray, photo: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """What the toy graph computes, in float64."""
    total = image.astype(np.float64) * 2 + reference[:, :1].astype(np.float64) + photo[:, 0, None, None, None]
    return total[:, :, HALO : HALO + CORE, HALO : HALO + CORE]


def toy_inputs(rng: np.random.Generator, n: int, n_tiles: int = 0) -> dict[str, np.ndarray]:
    """Random per-frame feeds (image, photo) for ``n`` tiles; plus ``reference`` if n_tiles."""
    data = {
        "image": rng.integers(0, 256, (n, 1, TILE, TILE), dtype=np.uint8),
        "photo": rng.normal(size=(n, 6)).astype(np.float32),
    }
    if n_tiles:
        data["reference"] = rng.normal(size=(n_tiles, 4, TILE, TILE)).astype(np.float16)
    return data
