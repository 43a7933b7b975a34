"""The inspectd version, from one source of truth: the installed package's metadata (pyproject.toml).

The CLI (``inspectd --version``), the daemon's startup log line, the ``inspectd_build_info``
metric, every published decision and every bundle's manifest all read it from here.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def inspectd_version() -> str:
    """The version pip installed ("0+unknown" when running from a tree that was never installed)."""
    try:
        return version("inspectd")
    except PackageNotFoundError:
        return "0+unknown"


VERSION = inspectd_version()
