"""The model bundle: the one directory that carries a fitted model from the offline to the online life.

Layout::

    manifest.json      format version, detector, geometry, tiling, package versions, training
                       fingerprint, creation time and the SHA-256 of every other file
    graph_fp32.onnx    the anomaly graph (FP32)
    graph_fp16.onnx    the same graph with FP16 pyramid and output (GPU path)
    reference.npz      reference statistics (resident on the device at run time) and registration levels
    calibration.json   pixel threshold, region rule, held-out good scores, margin, curves

Bundles are written into a temporary sibling directory and renamed into place, so a reader
never sees half a bundle. Loading verifies the format version and every file's hash and says
exactly which file is wrong. TensorRT plans (``*.plan`` with a ``.plan.json``) may sit beside
the bundle's files: they are built per machine and are checked separately.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import BundleError
from engines.types import Geometry

# 2: separate resident statistics inputs; 3: learned fine gain; 4: quadratic lighting gain;
# 5: one local gain map per detector ([G, Hb, Wb] in the ensemble), the learned map normalised too
FORMAT_VERSION = 6  # 6: the fine gain maps on 8 px blocks (16 px before)
MANIFEST = "manifest.json"
GRAPH_FP32 = "graph_fp32.onnx"
GRAPH_FP16 = "graph_fp16.onnx"
REFERENCE = "reference.npz"
CALIBRATION = "calibration.json"
REQUIRED = (GRAPH_FP32, GRAPH_FP16, REFERENCE, CALIBRATION)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of what produced (or runs) the bundle, for the manifest and for diagnostics."""
    from importlib.metadata import PackageNotFoundError, version

    from engines.version import VERSION

    out = {"inspectd": VERSION}
    for name in ("numpy", "opencv-python-headless", "onnx", "onnxruntime"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: dict[str, Any]
    calibration: dict[str, Any]

    @property
    def geometry(self) -> Geometry:
        return Geometry(**self.manifest["geometry"])

    @property
    def bundle_id(self) -> str:
        return self.manifest["bundle_id"]

    @property
    def detector(self) -> str:
        return self.manifest["detector"]

    def file(self, name: str) -> Path:
        return self.path / name

    def reference(self) -> dict[str, np.ndarray]:
        with np.load(self.file(REFERENCE)) as npz:
            return {k: npz[k] for k in npz.files}

    @classmethod
    def load(cls, path: Path) -> Bundle:
        """Read and verify a bundle; BundleError names the file and what is wrong."""
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"{path}: not a model bundle directory")
        manifest = _read_json(path / MANIFEST)
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(f"{path / MANIFEST}: format_version {version!r}, this inspectd reads {FORMAT_VERSION}")
        files = manifest.get("files")
        if not isinstance(files, dict) or any(name not in files for name in REQUIRED):
            raise BundleError(f"{path / MANIFEST}: file list must name {', '.join(REQUIRED)}")
        for name, digest in files.items():
            _verify_file(path / name, digest)
        for key in ("geometry", "detector", "bundle_id", "tiling"):
            if key not in manifest:
                raise BundleError(f"{path / MANIFEST}: missing {key!r}")
        try:
            Geometry(**manifest["geometry"])
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{path / MANIFEST}: bad geometry: {exc}") from None
        return cls(path, manifest, _read_json(path / CALIBRATION))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise BundleError(f"{path}: missing (incomplete bundle)") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return data


def _verify_file(path: Path, digest: str) -> None:
    if not path.is_file():
        raise BundleError(f"{path}: missing (incomplete bundle)")
    actual = sha256_file(path)
    if actual != digest:
        raise BundleError(
            f"{path}: SHA-256 {actual[:12]}… does not match the manifest's {digest[:12]}… (modified or corrupt)"
        )


def write_bundle(
    out: Path,
    manifest: dict[str, Any],
    writers: dict[str, Callable[[Path], None]],
    replace: bool = False,
    unhashed: tuple[Path, ...] = (),
) -> Path:
    """Write a bundle atomically: each writer fills its file in a temporary directory, then one rename.

    ``manifest`` gets ``format_version``, ``files`` (hashes), ``bundle_id`` and package versions added;
    ``unhashed`` files (machine-specific engine plans) are copied alongside without entering the manifest.
    """
    out = Path(out)
    if out.exists() and not replace:
        raise BundleError(f"{out}: already exists; choose another --out or remove it")
    with staged_directory(out) as tmp:
        for name, write in writers.items():
            write(tmp / name)
        files = {name: sha256_file(tmp / name) for name in sorted(writers)}
        for extra in unhashed:
            shutil.copyfile(extra, tmp / extra.name)
        full = {
            "format_version": FORMAT_VERSION,
            **manifest,
            "packages": package_versions(),
            "files": files,
            "bundle_id": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12],
        }
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


@contextlib.contextmanager
def staged_directory(out: Path, mode: int | None = None) -> Iterator[Path]:
    """A temporary sibling of ``out`` to fill; when the block ends it replaces ``out`` (``swap_into_place``).

    If the block raises, the temporary directory is removed and ``out`` is left as it was: a
    bundle or report is there whole or not at all. ``mode``: the directory's permissions before
    the swap (``mkdtemp`` makes it private to its owner).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed after.

    POSIX rename cannot replace a non-empty directory, hence the detour: between the two renames
    ``out`` briefly does not exist, but it is never half-written, and a failed rename puts the old
    one back. Bundles, evaluation reports and fit reports are all written this way.
    """
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    with contextlib.suppress(OSError):
        shutil.rmtree(old)


def rewrite_calibration(bundle: Bundle, calibration: dict[str, Any]) -> Path:
    """Replace a bundle's calibration (atomically, hashes updated, other files copied unchanged)."""

    def copier(name: str) -> Callable[[Path], None]:
        return lambda dst: shutil.copyfile(bundle.file(name), dst)

    writers: dict[str, Callable[[Path], None]] = {name: copier(name) for name in bundle.manifest["files"]}
    writers[CALIBRATION] = lambda dst: dst.write_text(json.dumps(calibration, indent=2) + "\n", encoding="utf-8")
    manifest = {
        k: v for k, v in bundle.manifest.items() if k not in ("files", "bundle_id", "packages", "format_version")
    }
    # plans built for this bundle stay valid (the graphs are unchanged), so they move along
    plans = tuple(p for p in bundle.path.iterdir() if p.name.endswith((".plan", ".plan.json")))
    return write_bundle(bundle.path, manifest, writers, replace=True, unhashed=plans)
