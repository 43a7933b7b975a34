"""The `inspectd` command line: one sub-command per module, imported only when it runs.

`inspectd serve` must not pay for (or depend on) the offline stack, so each entry names
the module and functions to load lazily.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from engines.errors import UserError
from engines.version import VERSION

# name -> (module, arguments function, main function, help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "synth": ("calibration.synth", "add_arguments", "main", "write a synthetic MVTec-layout dataset of aligned parts"),
    "fit": ("calibration.commands", "fit_arguments", "fit_main", "fit and calibrate a model bundle from good images"),
    "calibrate": ("calibration.commands", "calibrate_arguments", "calibrate_main", "recalibrate a bundle's threshold"),
    "predict": ("calibration.commands", "predict_arguments", "predict_main", "inspect images, write JSON lines"),
    "evaluate": (
        "calibration.commands",
        "evaluate_arguments",
        "evaluate_main",
        "measure a bundle on a labelled dataset",
    ),
    "build-engine": ("engines.trt_build", "add_arguments", "main", "build a TensorRT FP16 engine for a bundle"),
    "serve": ("daemon.server", "add_arguments", "main", "run the inspection daemon"),
    "send": ("daemon.sender", "add_arguments", "main", "camera simulator: stream images, print decisions"),
    "demo": ("daemon.demo", "add_arguments", "main", "synthesise a line, fit, serve and stream it end to end"),
    "audit": ("daemon.audit", "add_arguments", "main", "list or export the recent rejects of an audit trail"),
}


# Commands that inspect frames. Their process runs numpy's OpenBLAS on one thread: the only BLAS work on
# the frame path is the photometric fit's 9-column normal equations, too small to gain from a second
# thread, and an OpenBLAS worker spins for tens of milliseconds after every call, on the core the
# anomaly map's tile threads (and, in the daemon, the other frames' stages) need: 45-70 ms of CPU per
# 5120 px frame (benchmarks/frame_path.py --daemon, the unnamed "python" threads). A value the user
# sets is kept.
ONE_BLAS_THREAD = ("serve", "predict", "evaluate")


def prepare_environment(command: str) -> None:
    """Settings that must be in the environment before numpy loads (so before the command's module)."""
    if command in ONE_BLAS_THREAD:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inspectd", description="Full-resolution visual inspection of aligned parts.")
    parser.add_argument("--version", action="version", version=f"inspectd {VERSION}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, _, _, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv[:1] == ["--version"]:
        print(f"inspectd {VERSION}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage (or help) or the unknown-command error
        return 2
    name = argv[0]
    module_name, args_fn, main_fn, help_text = COMMANDS[name]
    prepare_environment(name)
    module = importlib.import_module(module_name)
    command = argparse.ArgumentParser(prog=f"inspectd {name}", description=help_text)
    getattr(module, args_fn)(command)
    args = command.parse_args(argv[1:])
    try:
        return int(getattr(module, main_fn)(args) or 0)
    except UserError as exc:
        print(f"inspectd {name}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine's, not a bug: a full disk, a path that is a file, a port in use
        print(f"inspectd {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
