"""Engine building and plan checks against *emulated* TensorRT 10.x and 11.x (no GPU involved)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from engines.backend import BackendError
from engines.errors import UserError
from tests.emulation import TILE, install, write_toy_graph
from tests.emulation.fake_tensorrt import state


@pytest.fixture(params=[10, 11], ids=["trt10", "trt11"])
def trt(request, monkeypatch):
    """The emulated tensorrt module of each major version, installed for one test."""
    module, _ = install(monkeypatch, major=request.param)
    return module


@pytest.fixture
def graph(tmp_path) -> Path:
    """A toy FP16 graph in a bundle-like directory."""
    (tmp_path / "bundle").mkdir()
    return write_toy_graph(tmp_path / "bundle" / "graph_fp16.onnx")


def build(graph: Path, plan: Path, cache: Path | None = None, **options) -> dict:
    from engines.trt_build import build_engine

    return build_engine(graph, plan, max_batch=6, workspace_mb=128, timing_cache=cache, **options)


def test_build_uses_strong_typing_and_never_fp16_flags(trt, graph, tmp_path) -> None:
    """The network is STRONGLY_TYPED; FP16 and EXPLICIT_BATCH flags are never looked up or set."""
    build(graph, tmp_path / "a.plan")
    strongly = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert state(trt)["network_flags"] == [strongly]
    assert state(trt)["config_flags"] == []
    assert not {"BuilderFlag.FP16", "NetworkDefinitionCreationFlag.EXPLICIT_BATCH"} & state(trt)["touched"]
    assert state(trt)["pool_limits"] == {"WORKSPACE": 128 << 20}


def test_profile_covers_the_batch_of_every_input(trt, graph, tmp_path) -> None:
    """One profile with min/opt/max over the batch dimension, other dims from the graph."""
    build(graph, tmp_path / "a.plan", min_batch=2, opt_batch=4)
    (profile,) = state(trt)["profiles"]
    assert set(profile) == {"image", "photo", "reference"}
    assert profile["image"] == [(2, 1, TILE, TILE), (4, 1, TILE, TILE), (6, 1, TILE, TILE)]
    assert profile["photo"] == [(2, 6), (4, 6), (6, 6)]


def test_timing_cache_is_saved_and_reused(trt, graph, tmp_path) -> None:
    """The first build writes the timing cache; the second build hits it."""
    cache = tmp_path / "timing.cache"
    build(graph, tmp_path / "a.plan", cache)
    assert cache.is_file() and state(trt)["cache_misses"] == 1
    build(graph, tmp_path / "b.plan", cache)
    assert state(trt)["cache_hits"] == 1


def test_corrupt_timing_cache_only_costs_time(trt, graph, tmp_path) -> None:
    """An unreadable timing cache is replaced instead of failing the build."""
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"garbage")
    build(graph, tmp_path / "a.plan", cache)
    assert cache.read_bytes() != b"garbage"


def test_metadata_sidecar_is_written(trt, graph, tmp_path) -> None:
    """The plan's <plan>.json records TensorRT, GPU, capability, ONNX hash, batch and time."""
    from engines.trt_build import sha256_file

    plan = tmp_path / "a.plan"
    meta = build(graph, plan)
    on_disk = json.loads(Path(f"{plan}.json").read_text())
    assert on_disk == meta
    assert meta["tensorrt_version"] == trt.__version__
    assert meta["gpu_name"] == "Emulated GPU (numpy)"
    assert meta["compute_capability"] == "9.0"
    assert meta["onnx_sha256"] == sha256_file(graph)
    assert meta["max_batch"] == 6 and meta["created"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.plan", "a.plan.json", "bundle"]


def test_check_plan_accepts_a_matching_plan(trt, graph, tmp_path) -> None:
    """A plan built here for this graph passes check_plan."""
    from engines.trt_build import check_plan

    build(graph, tmp_path / "a.plan")
    check_plan(tmp_path / "a.plan", graph)


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("tensorrt_version", "9.9.9", "TensorRT version"),
        ("gpu_name", "Tesla K80", "GPU"),
        ("compute_capability", "3.7", "compute capability"),
        ("onnx_sha256", "0" * 64, "ONNX hash"),
    ],
)
def test_check_plan_names_each_mismatch_and_the_fix(trt, graph, tmp_path, field, value, named) -> None:
    """A plan whose metadata disagrees is refused with what differs and the rebuild command."""
    from engines.trt_build import check_plan

    plan = tmp_path / "a.plan"
    build(graph, plan)
    sidecar = Path(f"{plan}.json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), field: value}))
    with pytest.raises(BackendError) as caught:
        check_plan(plan, graph)
    message = str(caught.value)
    assert named in message and value in message
    assert f"inspectd build-engine {graph.parent}" in message


def test_check_plan_refuses_plan_from_other_tensorrt_major(monkeypatch, graph, tmp_path) -> None:
    """A plan built under TensorRT 10.x is refused under 11.x before deserialisation."""
    from engines.trt_build import check_plan

    install(monkeypatch, major=10)
    build(graph, tmp_path / "a.plan")
    install(monkeypatch, major=11)
    with pytest.raises(BackendError, match=r"TensorRT version: plan has 10\.13\.3\.9, this machine has 11\.4"):
        check_plan(tmp_path / "a.plan", graph)


def test_check_plan_without_metadata_says_how_to_rebuild(trt, graph, tmp_path) -> None:
    """A plan without its sidecar is refused with the rebuild hint."""
    from engines.trt_build import check_plan

    plan = tmp_path / "a.plan"
    build(graph, plan)
    Path(f"{plan}.json").unlink()
    with pytest.raises(BackendError, match=r"metadata missing.*inspectd build-engine"):
        check_plan(plan, graph)


def test_parser_errors_are_reported(trt, tmp_path) -> None:
    """A graph TensorRT's parser rejects raises BackendError carrying the parser's messages."""
    broken = tmp_path / "graph_fp16.onnx"
    broken.write_bytes(b"not an onnx model")
    with pytest.raises(BackendError, match="ONNX parser failed: In node"):
        build(broken, tmp_path / "a.plan")
    assert not (tmp_path / "a.plan").exists()


def test_fixed_batch_graph_is_refused(trt, tmp_path) -> None:
    """An input without a dynamic batch dimension cannot get the batch profile."""
    graph = write_toy_graph(tmp_path / "graph_fp16.onnx", fixed_batch=True)
    with pytest.raises(BackendError, match="expected \\[-1"):
        build(graph, tmp_path / "a.plan")


def test_cli_builds_into_the_bundle_by_default(trt, graph, capsys) -> None:
    """`inspectd build-engine MODEL` writes MODEL/engine_<trt>_<gpu>.plan and its sidecar."""
    from engines import trt_build

    parser = argparse.ArgumentParser()
    trt_build.add_arguments(parser)
    assert trt_build.main(parser.parse_args([str(graph.parent), "--max-batch", "2"])) == 0
    plan = graph.parent / f"engine_{trt.__version__}_emulated-gpu-numpy.plan"
    assert plan.is_file() and Path(f"{plan}.json").is_file()
    assert str(plan) in capsys.readouterr().out


def test_cli_refuses_a_directory_without_the_graph(trt, tmp_path) -> None:
    """MODEL without graph_fp16.onnx is a UserError naming the directory."""
    from engines import trt_build

    parser = argparse.ArgumentParser()
    trt_build.add_arguments(parser)
    with pytest.raises(UserError, match=r"graph_fp16\.onnx"):
        trt_build.main(parser.parse_args([str(tmp_path)]))
