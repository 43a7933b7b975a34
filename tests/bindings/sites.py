"""The GPU call sites of the code base, found by walking the AST, so that no call escapes the check.

Modules: every Python file under ``engines/``, ``daemon/``, ``calibration/``, ``benchmarks/`` and
``tests/gpu/`` that imports ``tensorrt`` or ``pycuda`` (or ``import_gpu_modules``, or has pytest
import them). Sites in those modules:

* module-rooted: every public attribute read along an expression that starts at the tensorrt or
  pycuda.driver module: the names ``trt`` and ``cuda`` and whatever is assigned from them
  (``self._trt``, ``trt = self._trt``, the pair ``import_gpu_modules()`` returns, ``self.cuda =
  cuda``): enum members, classes, functions, exceptions, and methods of what they return;
* by name: every call of a method whose name is a TensorRT or pycuda API name and not a method of a
  common Python or numpy type, unless its receiver comes from another imported module (``np``,
  ``cupy`` ...) or from a local assigned from one; and every read of such a name that is not an
  attribute of a common type either, nor one the project defines itself (``engine.num_io_tensors``,
  ``stream.handle``; ``tensor.shape`` is taken for numpy's, ``plan.width`` for a TilePlan's);
* exception classes in ``except`` clauses are read only when something is raised, so those sites
  are marked ``static``: their names are checked against the real modules without a recording.
"""

from __future__ import annotations

import ast
import builtins
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("engines", "daemon", "calibration", "benchmarks", "tests/gpu")
GPU_MODULES = {"tensorrt": "tensorrt", "pycuda.driver": "pycuda.driver", "pycuda": "pycuda.driver"}
CONVENTIONAL_ROOTS = {"trt": "tensorrt", "cuda": "pycuda.driver"}


@dataclass(frozen=True)
class Site:
    path: str  # relative to the repository root
    line: int
    end_line: int
    name: str
    module: str | None  # "tensorrt" / "pycuda.driver" when module-rooted; None when found by name
    static: bool  # an exception class in an except clause
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} {self.text}"


def _imports_gpu(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in ("tensorrt", "pycuda") for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in ("tensorrt", "pycuda"):
                return True
            if any(a.name == "import_gpu_modules" for a in node.names):
                return True
        if isinstance(node, ast.FunctionDef) and node.name == "import_gpu_modules":
            return True
        if _importorskip(node):
            return True
    return False


def _importorskip(node: ast.AST) -> str | None:
    """The GPU module a ``pytest.importorskip("tensorrt" | "pycuda.driver")`` call imports."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "importorskip"):
        return None
    if node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in GPU_MODULES:
        return GPU_MODULES[node.args[0].value]
    return None


def gpu_modules(root: Path = ROOT) -> list[Path]:
    """The files whose TensorRT and pycuda use is checked."""
    found = []
    for folder in SCANNED:
        for path in sorted((root / folder).rglob("*.py")):
            if _imports_gpu(ast.parse(path.read_text(), str(path))):
                found.append(path)
    return found


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return f"self.{node.attr}"
    return None


def _pairs(targets: Iterable[ast.AST], value: ast.AST) -> list[tuple[ast.AST, ast.AST | str]]:
    """(target, value or module name) for an assignment, unpacking tuples element by element."""
    pairs: list[tuple[ast.AST, ast.AST | str]] = []
    for target in targets:
        if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) and len(target.elts) == len(value.elts):
            pairs += zip(target.elts, value.elts, strict=True)
        elif (
            isinstance(target, ast.Tuple)
            and len(target.elts) == 2
            and isinstance(value, ast.Call)
            and getattr(value.func, "id", getattr(value.func, "attr", None)) == "import_gpu_modules"
        ):
            pairs += zip(target.elts, ("tensorrt", "pycuda.driver"), strict=True)
        else:
            pairs.append((target, value))
    return pairs


def _roots(tree: ast.AST) -> dict[str, str]:
    """Names and ``self.x`` attributes that hold the tensorrt or pycuda.driver module."""
    roots = dict(CONVENTIONAL_ROOTS)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in GPU_MODULES and alias.asname:
                    roots[alias.asname] = GPU_MODULES[alias.name]
    assignments = [node for node in ast.walk(tree) if isinstance(node, ast.Assign)]
    changed = True
    while changed:
        changed = False
        for node in assignments:
            for target, value in _pairs(node.targets, node.value):
                name = _dotted(target)
                module = value if isinstance(value, str) else roots.get(_dotted(value) or "") or _importorskip(value)
                if name and module and name not in roots:
                    roots[name], changed = module, True
    return roots


def _chain_root(node: ast.AST) -> ast.AST:
    """The innermost receiver of an attribute/call/subscript chain."""
    while True:
        if isinstance(node, ast.Attribute) and _dotted(node) is None:
            node = node.value
        elif isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Subscript):
            node = node.value
        else:
            return node


def _rooted_module(node: ast.Attribute, roots: dict[str, str]) -> str | None:
    """The GPU module this attribute read starts from, walking through calls and subscripts."""
    current: ast.AST = node.value
    while True:
        dotted = _dotted(current)
        if dotted in roots:
            return roots[dotted]
        if isinstance(current, ast.Attribute):
            current = current.value
        elif isinstance(current, ast.Call):
            current = current.func
        elif isinstance(current, ast.Subscript):
            current = current.value
        else:
            return None


def _imported_names(tree: ast.AST) -> set[str]:
    """Names bound by imports of anything but the GPU modules, and the builtins (``open``)."""
    names = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name.split(".")[0] for a in node.names if a.name not in GPU_MODULES}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] not in ("tensorrt", "pycuda"):
            names |= {a.asname or a.name for a in node.names}
    return names


def _is_foreign(value: ast.AST, foreign: set[str]) -> bool:
    if isinstance(value, ast.ListComp | ast.GeneratorExp | ast.SetComp):
        return _is_foreign(value.elt, foreign)
    if isinstance(value, ast.List | ast.Tuple | ast.Set):
        return bool(value.elts) and all(_is_foreign(e, foreign) for e in value.elts)
    if isinstance(value, ast.BoolOp):
        return any(_is_foreign(v, foreign) for v in value.values)
    if isinstance(value, ast.IfExp):
        return _is_foreign(value.body, foreign) or _is_foreign(value.orelse, foreign)
    root = _chain_root(value)
    return isinstance(root, ast.Name) and root.id in foreign


def _foreign_locals(scope: ast.AST, imported: set[str]) -> set[str]:
    """Imported names plus locals of ``scope`` assigned only from expressions rooted at them."""
    foreign = set(imported)
    for node in ast.walk(scope):
        pairs: list[tuple[ast.AST, ast.AST | str]] = []
        if isinstance(node, ast.Assign):
            pairs = _pairs(node.targets, node.value)
        elif isinstance(node, ast.With | ast.AsyncWith):
            pairs = [(item.optional_vars, item.context_expr) for item in node.items if item.optional_vars]
        for target, value in pairs:
            if isinstance(target, ast.Name) and not isinstance(value, str) and _is_foreign(value, foreign):
                foreign.add(target.id)
    return foreign


def _scopes(tree: ast.Module) -> list[ast.AST]:
    """Each function (innermost) with the module itself last: where a call's locals live."""
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)] + [tree]


def defined_attributes(tree: ast.AST) -> set[str]:
    """Attribute names code defines: ``x.name = ...`` targets and class-level fields, methods, properties."""
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)}
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        for statement in cls.body:
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                names.add(statement.target.id)
            elif isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(statement.name)
            elif isinstance(statement, ast.Assign):
                names |= {t.id for t in statement.targets if isinstance(t, ast.Name)}
    return names


def project_attributes(root: Path = ROOT) -> set[str]:
    """Attribute names the project's own packages define (a read of ``plan.width`` is of a TilePlan)."""
    names: set[str] = set()
    for folder in ("engines", "daemon", "calibration", "benchmarks"):
        for path in (root / folder).rglob("*.py"):
            names |= defined_attributes(ast.parse(path.read_text(), str(path)))
    return names


def call_sites(
    path: Path, api_names: set[str], common: dict[str, set[str]], root: Path = ROOT, defined: set[str] = frozenset()
) -> list[Site]:
    """Every module-rooted attribute read, by-name API call and distinctive API read in ``path``.

    ``common`` maps "call" and "read" to the names taken for everyday types' methods and attributes;
    ``defined`` are attribute names the project defines itself, not taken for API reads either.
    """
    source = path.read_text()
    tree = ast.parse(source, str(path))
    relative = path.relative_to(root).as_posix()
    roots, imported = _roots(tree), _imported_names(tree)
    in_except = {
        id(node)
        for handler in ast.walk(tree)
        if isinstance(handler, ast.ExceptHandler) and handler.type is not None
        for node in ast.walk(handler.type)
    }
    owner: dict[int, ast.AST] = {}
    scopes = _scopes(tree)
    for scope in [scopes[-1], *scopes[:-1]]:  # module, then functions outside in: the innermost wins
        for node in ast.walk(scope):
            owner[id(node)] = scope
    foreign = {id(scope): _foreign_locals(scope, imported) for scope in _scopes(tree)}

    def site(node: ast.Attribute, module: str | None) -> Site:
        text = (ast.get_source_segment(source, node) or node.attr).splitlines()[0]
        static = id(node) in in_except
        return Site(relative, node.lineno, node.end_lineno or node.lineno, node.attr, module, static, text)

    sites = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or node.attr.startswith("_") or not isinstance(node.ctx, ast.Load):
            continue
        if _dotted(node) in roots:
            continue  # the module itself (self._trt), not a read from it
        module = _rooted_module(node, roots)
        if module is not None:
            sites.append(site(node, module))
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    excluded = {"call": common["call"], "read": common["read"] | defined | defined_attributes(tree)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not isinstance(node.ctx, ast.Load):
            continue
        if node.attr not in api_names or node.attr.startswith("_"):
            continue
        if node.attr in excluded["call" if id(node) in called else "read"]:
            continue
        if _rooted_module(node, roots) is not None or _dotted(node) in roots:
            continue  # already a module-rooted site
        if _is_foreign(node.value, foreign[id(owner[id(node)])]):
            continue
        sites.append(site(node, None))
    return sorted(set(sites), key=lambda s: (s.path, s.line, s.name))


def common_names() -> dict[str, set[str]]:
    """Names of everyday Python and numpy types' methods ("call") and attributes ("read").

    A call or read by one of these names is not taken for a TensorRT or pycuda one.
    """
    import io
    import pathlib
    import queue
    import threading

    import numpy as np

    kinds = (dict, list, tuple, set, frozenset, str, bytes, bytearray, int, float, object, np.ndarray, np.generic)
    kinds += (pathlib.Path, threading.Thread, threading.Event, queue.Queue, io.BufferedWriter, io.TextIOWrapper)
    names = {name for kind in kinds for name in dir(kind)}
    return {"call": {n for kind in kinds for n in dir(kind) if callable(getattr(kind, n, None))}, "read": names}
