"""Build TensorRT plans from a bundle's FP16 graph, and refuse plans that no longer fit.

One build path serves TensorRT 10.x and 11.x: the network is created STRONGLY_TYPED
(11.x removed weak typing: no BuilderFlag.FP16, no EXPLICIT_BATCH), so precision
comes from the ONNX graph itself (``graph_fp16.onnx``). A plan is specific to the
TensorRT version and the GPU, so each plan gets a sidecar ``<plan>.json`` recording
both plus the SHA-256 of the ONNX it came from; ``check_plan`` compares them with
this machine before anything is deserialised.

CLI: ``inspectd build-engine MODEL [--out PLAN] [--max-batch N] [--workspace-mb N]
[--timing-cache FILE]``. Plans are written next to the bundle's files but are not
part of its manifest (the bundle loader ignores ``*.plan`` and ``*.plan.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from engines.backend import BackendError
from engines.bundle import sha256_file
from engines.errors import UserError
from engines.tensorrt_backend import import_gpu_modules

METADATA_FORMAT = 1
GRAPH_NAME = "graph_fp16.onnx"


# -- metadata -------------------------------------------------------------------
def sidecar_path(plan_path: Path) -> Path:
    """The metadata file that travels with a plan: ``<plan>.json``."""
    return Path(f"{plan_path}.json")


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of ``device``, via pycuda."""
    _, cuda = import_gpu_modules()
    try:
        cuda.init()
        dev = cuda.Device(device)
        major, minor = dev.compute_capability()
        return str(dev.name()), f"{major}.{minor}"
    except cuda.Error as exc:
        raise BackendError(f"cannot query CUDA device {device}: {exc}") from exc


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def default_plan_path(model_dir: Path, device: int = 0) -> Path:
    """``MODEL/engine_<trtversion>_<gpu-slug>.plan`` for this machine."""
    trt, _ = import_gpu_modules()
    name, _ = gpu_identity(device)
    return Path(model_dir) / f"engine_{trt.__version__}_{slug(name)}.plan"


def read_metadata(plan_path: Path) -> dict[str, Any]:
    path = sidecar_path(plan_path)
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise BackendError(
            f"{path}: plan metadata missing; rebuild the plan with: inspectd build-engine MODEL"
        ) from None
    except (OSError, ValueError) as exc:
        raise BackendError(
            f"{path}: unreadable plan metadata ({exc}); rebuild with: inspectd build-engine MODEL"
        ) from exc
    if not isinstance(meta, dict) or meta.get("format") != METADATA_FORMAT:
        raise BackendError(f"{path}: unknown plan metadata format; rebuild with: inspectd build-engine MODEL")
    return meta


def plan_mismatches(meta: dict[str, Any], onnx_path: Path | None, device: int = 0) -> list[str]:
    """Each way the plan's metadata disagrees with this machine (and with ``onnx_path`` if given)."""
    trt, _ = import_gpu_modules()
    gpu_name, capability = gpu_identity(device)
    checks = [
        ("TensorRT version", meta.get("tensorrt_version"), trt.__version__),
        ("GPU", meta.get("gpu_name"), gpu_name),
        ("compute capability", meta.get("compute_capability"), capability),
    ]
    if onnx_path is not None:
        checks.append((f"ONNX hash of {Path(onnx_path).name}", meta.get("onnx_sha256"), sha256_file(onnx_path)))
    return [f"{what}: plan has {have}, this machine has {want}" for what, have, want in checks if have != want]


def check_plan(plan_path: Path, onnx_path: Path) -> None:
    """Raise BackendError naming every mismatch (TensorRT, GPU, capability, ONNX hash) and the fix."""
    plan_path, onnx_path = Path(plan_path), Path(onnx_path)
    if not plan_path.is_file():
        raise BackendError(f"{plan_path}: no TensorRT plan; build one with: inspectd build-engine {onnx_path.parent}")
    problems = plan_mismatches(read_metadata(plan_path), onnx_path)
    if problems:
        raise BackendError(
            f"{plan_path}: plan does not match: {'; '.join(problems)}. "
            f"Rebuild it with: inspectd build-engine {onnx_path.parent}"
        )


# -- building -------------------------------------------------------------------
def build_engine(
    onnx_path: Path,
    plan_path: Path,
    max_batch: int,
    workspace_mb: int,
    timing_cache: Path | None,
    min_batch: int = 1,
    opt_batch: int | None = None,
) -> dict[str, Any]:
    """Build a strongly typed plan with one batch profile; write it and its sidecar atomically."""
    trt, _ = import_gpu_modules()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    opt_batch = max_batch if opt_batch is None else opt_batch
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise BackendError(f"batch sizes must satisfy 1 <= min {min_batch} <= opt {opt_batch} <= max {max_batch}")
    data = onnx_path.read_bytes()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    _parse(trt, network, logger, data, onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    shapes = _add_batch_profile(builder, network, config, (min_batch, opt_batch, max_batch), onnx_path)
    _load_timing_cache(config, timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above)")
    if timing_cache is not None:
        _write_atomic(Path(timing_cache), bytes(memoryview(config.get_timing_cache().serialize())))
    meta = _metadata(trt, data, onnx_path, (min_batch, opt_batch, max_batch), workspace_mb, shapes)
    _write_atomic(plan_path, bytes(memoryview(serialized)))
    _write_atomic(sidecar_path(plan_path), (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def _parse(trt: Any, network: Any, logger: Any, data: bytes, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(data, str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BackendError(f"{onnx_path}: TensorRT's ONNX parser failed: " + " | ".join(errors or ["no detail"]))


def _add_batch_profile(
    builder: Any, network: Any, config: Any, batches: tuple[int, int, int], onnx_path: Path
) -> dict[str, list[int]]:
    """One optimisation profile over the batch dimension of every input (shapes from the graph)."""
    profile = builder.create_optimization_profile()
    shapes = {}
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = [int(d) for d in tensor.shape]
        if not shape or shape[0] != -1 or -1 in shape[1:]:
            raise BackendError(f"{onnx_path}: input {tensor.name!r} has shape {shape}; expected [-1 (batch), fixed...]")
        profile.set_shape(tensor.name, *[(b, *shape[1:]) for b in batches])
        shapes[tensor.name] = shape
    config.add_optimization_profile(profile)
    return shapes


def _load_timing_cache(config: Any, path: Path | None) -> None:
    """Reuse a timing cache when one exists and matches; a stale one is replaced after the build."""
    blob = Path(path).read_bytes() if path is not None and Path(path).is_file() else b""
    try:
        cache = config.create_timing_cache(blob)
    except Exception:  # a corrupt cache file is only a slower build, never a failed one
        cache = None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _metadata(
    trt: Any, data: bytes, onnx_path: Path, batches: tuple[int, int, int], workspace_mb: int, shapes: dict
) -> dict[str, Any]:
    gpu_name, capability = gpu_identity()
    return {
        "format": METADATA_FORMAT,
        "tensorrt_version": trt.__version__,
        "gpu_name": gpu_name,
        "compute_capability": capability,
        "onnx_file": onnx_path.name,
        "onnx_sha256": hashlib.sha256(data).hexdigest(),
        "min_batch": batches[0],
        "opt_batch": batches[1],
        "max_batch": batches[2],
        "workspace_mb": int(workspace_mb),
        "inputs": shapes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -- CLI --------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, metavar="MODEL", help=f"bundle directory holding {GRAPH_NAME}")
    parser.add_argument("--out", type=Path, help="plan file (default: MODEL/engine_<trt>_<gpu>.plan)")
    parser.add_argument("--max-batch", type=int, default=8, help="largest tile batch (default 8)")
    parser.add_argument("--workspace-mb", type=int, default=2048, help="builder workspace in MiB (default 2048)")
    parser.add_argument("--timing-cache", type=Path, help="timing cache file, read if present and updated")


def main(args: argparse.Namespace) -> int:
    model = Path(args.model)
    graph = model / GRAPH_NAME
    if not graph.is_file():
        raise UserError(f"{model}: not a model bundle (expected {GRAPH_NAME} in it)")
    if args.max_batch < 1 or args.workspace_mb < 1:
        raise UserError("--max-batch and --workspace-mb must be positive")
    try:
        plan = args.out or default_plan_path(model)
        started = time.perf_counter()
        meta = build_engine(graph, plan, args.max_batch, args.workspace_mb, args.timing_cache)
    except BackendError as exc:
        raise UserError(str(exc)) from exc
    print(
        f"{plan}: TensorRT {meta['tensorrt_version']} on {meta['gpu_name']} (sm {meta['compute_capability']}), "
        f"max batch {meta['max_batch']}, built in {time.perf_counter() - started:.1f} s",
        file=sys.stdout,
    )
    return 0
