"""Bundles: atomic writes, verified loads that name the bad file, and calibration rewrites."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engines.bundle import (
    CALIBRATION,
    FORMAT_VERSION,
    GRAPH_FP16,
    GRAPH_FP32,
    MANIFEST,
    REFERENCE,
    Bundle,
    rewrite_calibration,
    sha256_file,
    write_bundle,
)
from engines.errors import BundleError
from engines.types import Geometry

GEOMETRY = Geometry(96, 128, 1, "uint8")


def writers(calibration: dict | None = None) -> dict:
    """Writers for the four bundle files with small, distinct contents."""
    cal = calibration or {"threshold": 1.5, "min_area": 1}
    return {
        GRAPH_FP32: lambda p: p.write_bytes(b"fp32 graph bytes"),
        GRAPH_FP16: lambda p: p.write_bytes(b"fp16 graph bytes"),
        REFERENCE: lambda p: np.savez(p.open("wb"), mu=np.arange(12, dtype=np.float16).reshape(3, 4)),
        CALIBRATION: lambda p: p.write_text(json.dumps(cal), encoding="utf-8"),
    }


def manifest() -> dict:
    return {"detector": "template", "geometry": GEOMETRY.to_dict(), "tiling": {"core": 96, "halo": 64, "align": 32}}


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    """A freshly written, valid bundle."""
    return write_bundle(tmp_path / "model", manifest(), writers())


def siblings(path: Path) -> list[str]:
    """Everything in ``path``'s parent directory, hidden entries included."""
    return sorted(p.name for p in path.parent.iterdir())


def test_round_trip(bundle_dir):
    """A written bundle loads with its manifest, geometry, hashes, id and calibration intact."""
    bundle = Bundle.load(bundle_dir)
    assert bundle.geometry == GEOMETRY and bundle.detector == "template"
    assert bundle.manifest["format_version"] == FORMAT_VERSION
    assert bundle.calibration == {"threshold": 1.5, "min_area": 1}
    assert set(bundle.manifest["files"]) == {GRAPH_FP32, GRAPH_FP16, REFERENCE, CALIBRATION}
    for name, digest in bundle.manifest["files"].items():
        assert sha256_file(bundle_dir / name) == digest
    assert len(bundle.bundle_id) == 12
    np.testing.assert_array_equal(bundle.reference()["mu"], np.arange(12, dtype=np.float16).reshape(3, 4))
    assert siblings(bundle_dir) == ["model"], "no temporary directory left behind"


def test_bundle_id_depends_on_the_contents(tmp_path):
    """Two bundles with different calibration get different ids; identical contents get the same id."""
    a = Bundle.load(write_bundle(tmp_path / "a", manifest(), writers()))
    b = Bundle.load(write_bundle(tmp_path / "b", manifest(), writers()))
    c = Bundle.load(write_bundle(tmp_path / "c", manifest(), writers({"threshold": 2.0})))
    assert a.bundle_id == b.bundle_id != c.bundle_id


@pytest.mark.parametrize("name", [GRAPH_FP32, GRAPH_FP16, REFERENCE, CALIBRATION])
def test_a_modified_file_is_named(bundle_dir, name):
    """Changing one byte of any file makes loading fail with a BundleError naming that file."""
    path = bundle_dir / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError) as info:
        Bundle.load(bundle_dir)
    assert str(path) in str(info.value) and "modified or corrupt" in str(info.value)


@pytest.mark.parametrize("name", [GRAPH_FP16, REFERENCE, MANIFEST])
def test_a_missing_file_is_named(bundle_dir, name):
    """A missing file makes loading fail with a BundleError naming it as missing."""
    (bundle_dir / name).unlink()
    with pytest.raises(BundleError, match="missing") as info:
        Bundle.load(bundle_dir)
    assert str(bundle_dir / name) in str(info.value)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_unknown_format_version(bundle_dir, version):
    """A manifest with another format_version is refused, naming the manifest and the version."""
    path = bundle_dir / MANIFEST
    data = json.loads(path.read_text())
    data["format_version"] = version
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="format_version") as info:
        Bundle.load(bundle_dir)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda m: m.pop("files"), "file list"),
        (lambda m: m["files"].pop(REFERENCE), "file list"),
        (lambda m: m.pop("tiling"), "'tiling'"),
        (lambda m: m["geometry"].update(channels=2), "bad geometry"),
    ],
)
def test_incomplete_or_bad_manifest(bundle_dir, edit, fragment):
    """Manifests without the file list, a required key, or with an impossible geometry are refused."""
    path = bundle_dir / MANIFEST
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=fragment):
        Bundle.load(bundle_dir)


def test_manifest_that_is_not_json(bundle_dir):
    """A manifest that is not JSON is refused naming it."""
    (bundle_dir / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(bundle_dir)


def test_not_a_directory(tmp_path):
    """Loading a path that is not a directory fails clearly."""
    with pytest.raises(BundleError, match="not a model bundle directory"):
        Bundle.load(tmp_path / "nothing")


def test_a_failing_writer_leaves_nothing_behind(tmp_path):
    """When one writer raises, neither the bundle nor its temporary directory remains."""
    w = writers()

    def broken(path: Path) -> None:
        path.write_bytes(b"partial")
        raise RuntimeError("disk full")

    w[REFERENCE] = broken
    with pytest.raises(RuntimeError, match="disk full"):
        write_bundle(tmp_path / "model", manifest(), w)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_without_replace(bundle_dir):
    """Writing onto an existing bundle without replace=True is refused and leaves it intact."""
    before = (bundle_dir / MANIFEST).read_bytes()
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(bundle_dir, manifest(), writers({"threshold": 9.0}))
    assert (bundle_dir / MANIFEST).read_bytes() == before
    Bundle.load(bundle_dir)


def test_rewrite_calibration_keeps_files_and_updates_hashes(bundle_dir):
    """rewrite_calibration replaces calibration.json, keeps the other files byte for byte and re-hashes."""
    old = Bundle.load(bundle_dir)
    kept = {name: (bundle_dir / name).read_bytes() for name in (GRAPH_FP32, GRAPH_FP16, REFERENCE)}
    (bundle_dir / "engine_sm90.plan").write_bytes(b"plan")
    (bundle_dir / "engine_sm90.plan.json").write_text("{}")
    rewrite_calibration(old, {**old.calibration, "threshold": 3.25})
    new = Bundle.load(bundle_dir)
    assert new.calibration["threshold"] == 3.25
    for name, data in kept.items():
        assert (bundle_dir / name).read_bytes() == data
        assert new.manifest["files"][name] == old.manifest["files"][name]
    assert (
        new.manifest["files"][CALIBRATION]
        == sha256_file(bundle_dir / CALIBRATION)
        != old.manifest["files"][CALIBRATION]
    )
    assert new.bundle_id != old.bundle_id
    assert new.geometry == old.geometry and new.manifest["tiling"] == old.manifest["tiling"]
    assert (bundle_dir / "engine_sm90.plan").read_bytes() == b"plan"
    assert (bundle_dir / "engine_sm90.plan.json").read_text() == "{}"
    assert "engine_sm90.plan" not in new.manifest["files"]
    assert siblings(bundle_dir) == ["model"], "no temporary or .old directory left behind"
