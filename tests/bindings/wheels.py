"""The real bindings, cached outside the repository, and stub libraries that let them import.

    python -m tests.bindings.wheels        # fetch whatever is missing from the cache (pip download)

The cache is ``$INSPECTD_BINDINGS_CACHE``, else ``$XDG_CACHE_HOME/inspectd/bindings``, else
``~/.cache/inspectd/bindings``. It holds the TensorRT Python bindings wheels of both majors
(for the running interpreter and platform) and the pycuda source package; pip downloads them
from whatever package index pip is configured to use. Nothing here runs during a test: the
tests only read the cache and skip, saying why, when it lacks a file.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.emulation.fake_tensorrt import VERSIONS

CACHE_ENV = "INSPECTD_BINDINGS_CACHE"
BINDINGS = {10: "tensorrt-cu12-bindings", 11: "tensorrt-cu13-bindings"}
PYCUDA = ("pycuda", "2026.1")  # the driver wrapper the pycuda emulation follows


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "inspectd" / "bindings"


def _python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


def bindings_wheel(major: int) -> Path | None:
    """The cached bindings wheel of TensorRT ``major`` for this interpreter, if there is one."""
    stem = f"{BINDINGS[major].replace('-', '_')}-{VERSIONS[major]}-{_python_tag()}-"
    found = sorted(cache_dir().glob(f"{stem}*.whl"))
    return found[0] if found else None


def pycuda_sdist() -> Path | None:
    path = cache_dir() / f"{PYCUDA[0]}-{PYCUDA[1]}.tar.gz"
    return path if path.is_file() else None


def missing() -> list[str]:
    """What the cache lacks, one phrase each."""
    gaps = [
        f"{BINDINGS[major]}=={VERSIONS[major]} ({_python_tag()} wheel)"
        for major in sorted(BINDINGS)
        if bindings_wheel(major) is None
    ]
    if pycuda_sdist() is None:
        gaps.append(f"{PYCUDA[0]}=={PYCUDA[1]} (source package)")
    return gaps


def fetch() -> list[str]:
    """pip-download what is missing into the cache; the errors (last line of pip's output each)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(cache_dir())]
    wanted = [
        [*base, "--only-binary", ":all:", f"{BINDINGS[major]}=={VERSIONS[major]}"]
        for major in sorted(BINDINGS)
        if bindings_wheel(major) is None
    ]
    if pycuda_sdist() is None:  # the sdist only: pycuda builds with a CUDA toolkit, never here
        wanted.append([*base, "--no-binary", PYCUDA[0], f"{PYCUDA[0]}=={PYCUDA[1]}"])
    errors = []
    for command in wanted:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
            errors.append(f"{command[-1]}: {lines[-1] if lines else f'pip exited {done.returncode}'}")
    return errors


def unpack_bindings(major: int, dest: Path) -> Path:
    """Extract the wheel's ``tensorrt_bindings`` package under ``dest``; returns ``dest`` (for PYTHONPATH)."""
    wheel = bindings_wheel(major)
    if wheel is None:
        raise FileNotFoundError(f"{BINDINGS[major]}=={VERSIONS[major]} is not in {cache_dir()}")
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.startswith("tensorrt_bindings/")]
        archive.extractall(dest, members)
    return dest


def missing_tools() -> list[str]:
    return [tool for tool in ("gcc", "nm", "readelf") if shutil.which(tool) is None]


def unresolved_symbols(extension: Path) -> list[str]:
    """The extension's unversioned undefined symbols that nothing loaded in this process defines.

    These are exactly what it wants from the TensorRT libraries (the ``create*_INTERNAL`` factories,
    the plugin registries, the parser version); Python's and the C library's symbols resolve.
    """
    listing = subprocess.run(
        ["nm", "-D", "--undefined-only", str(extension)], capture_output=True, text=True, check=True
    ).stdout
    process = ctypes.CDLL(None)
    symbols = []
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[-2] == "U" and "@" not in parts[-1] and not hasattr(process, parts[-1]):
            symbols.append(parts[-1])
    return sorted(symbols)


def needed_tensorrt_libraries(extension: Path) -> list[str]:
    """The TensorRT sonames the extension links against (``libnvinfer.so.10`` ...)."""
    dynamic = subprocess.run(["readelf", "-d", str(extension)], capture_output=True, text=True, check=True).stdout
    return sorted(set(re.findall(r"Shared library: \[(libnv[\w.+-]*)\]", dynamic)))


def build_stubs(extension: Path, dest: Path) -> tuple[Path, list[str]]:
    """Compile one stub library per TensorRT soname, each defining every unresolved symbol as ``return 0``.

    Returns (directory for LD_LIBRARY_PATH, the symbols stubbed). A factory that returns NULL makes
    the real binding raise (pybind11: "factory function returned nullptr") after argument
    conversion, which is all the check needs.
    """
    symbols = unresolved_symbols(extension)
    dest.mkdir(parents=True, exist_ok=True)
    source = dest / "tensorrt_stubs.c"
    source.write_text(
        "/* Stand-ins for the TensorRT libraries: enough for the bindings to import. */\n"
        + "".join(f"void *{name}(void) {{ return 0; }}\n" for name in symbols)
    )
    for soname in needed_tensorrt_libraries(extension):
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-o", str(dest / soname), f"-Wl,-soname,{soname}", str(source)],
            capture_output=True,
            text=True,
            check=True,
        )
    return dest, symbols


def main() -> int:
    gaps = missing()
    if not gaps:
        print(f"real bindings: cached in {cache_dir()}")
        return 0
    errors = fetch()
    for error in errors:
        print(f"real bindings: could not fetch {error}", file=sys.stderr)
    still = missing()
    print(f"real bindings: {'missing ' + ', '.join(still) if still else 'fetched'} in {cache_dir()}")
    return 1 if still else 0


if __name__ == "__main__":
    sys.exit(main())
