"""pycuda's driver API as its source package defines it: names and arity, read from the wrapper sources.

pycuda builds only against a CUDA toolkit, so it cannot be imported here; its Boost.Python wrapper
(``src/wrapper/wrap_cudadrv.cpp``) says what ``pycuda.driver`` exposes, and the C++ it binds
(``src/cpp/cuda.hpp`` and the wrapper's own helpers) says how many arguments each takes:

* ``py::def("name", target, argspec)``, ``DEF_SIMPLE_FUNCTION(name)``: module functions;
* ``py::class_<X ...>("Name", py::init<...>(argspec) | py::no_init)`` with ``.def("name", target,
  argspec)``, ``.DEF_SIMPLE_METHOD(name)`` (``&cl::name``), ``.staticmethod("name")``,
  ``.add_property("name", ...)``: classes, their constructors, methods, static methods, properties;
* ``DECLARE_EXC(Name, base)``: exceptions;
* the module-level functions ``pycuda/driver.py`` adds in Python.

Arity: a C++ member function takes ``self`` plus its parameters, a free function bound as a method
takes its first parameter as ``self``; Boost.Python ignores C++ default values, so only an argspec's
``=default`` makes a parameter optional, and keyword names exist only where an argspec gives them
(to the trailing parameters).
"""

from __future__ import annotations

import ast
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

_KEYWORDS = {"return", "new", "else", "throw", "case", "delete", "typedef", "using", "goto", "do"}


@dataclass
class Signature:
    params: list[str | None]  # including self for methods; None where no keyword name exists
    required: int

    @property
    def most(self) -> int:
        return len(self.params)

    def accepts(self, positional: int, keywords: list[str]) -> bool:
        """Whether a call with ``positional`` arguments (self included) and these keywords binds."""
        if positional > self.most or any(k not in self.params for k in keywords):
            return False
        named = [self.params.index(k) for k in keywords]
        if any(index < positional for index in named):
            return False  # a keyword for a parameter already given positionally
        bound = set(range(positional)) | set(named)
        return all(index in bound for index in range(self.required))


@dataclass
class ClassAPI:
    init: list[Signature] | None = None  # None: no constructor (py::no_init)
    methods: dict[str, list[Signature]] = field(default_factory=dict)
    static: set[str] = field(default_factory=set)
    properties: set[str] = field(default_factory=set)
    member_bound: set[str] = field(default_factory=set)  # bound to a C++ member: self was added on top


@dataclass
class DriverAPI:
    functions: dict[str, list[Signature]] = field(default_factory=dict)
    classes: dict[str, ClassAPI] = field(default_factory=dict)
    exceptions: set[str] = field(default_factory=set)
    other: set[str] = field(default_factory=set)  # enums and constants: names only

    @property
    def names(self) -> set[str]:
        return set(self.functions) | set(self.classes) | self.exceptions | self.other


# -- C++ text helpers -------------------------------------------------------------------
def _strip(source: str) -> str:
    """Comments and preprocessor lines out (every #if branch kept)."""
    source = re.sub(r"/\*.*?\*/", " ", source, flags=re.S)
    source = re.sub(r"//[^\n]*", "", source)
    return "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("#"))


def _balanced(text: str, start: int, pair: str = "()") -> int:
    """Index just past the bracket that closes the one at ``start``."""
    depth = 0
    for index in range(start, len(text)):
        if text[index] == pair[0]:
            depth += 1
        elif text[index] == pair[1]:
            depth -= 1
            if depth == 0:
                return index + 1
    raise ValueError(f"unbalanced {pair} at {start}")


def _split(text: str) -> list[str]:
    """Top-level comma-separated parts (ignoring commas inside (), [], {}, <>)."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "([{<":
            depth += 1
        elif char in ")]}>":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    tail = "".join(current).strip()
    return [*parts, tail] if tail else parts


def _param_count(params: str) -> int:
    params = params.strip()
    return 0 if params in ("", "void") else len(_split(params))


def _definitions(text: str, name: str, endings: str) -> list[int]:
    """Parameter counts of the definitions of ``name`` in ``text`` (not calls of it)."""
    counts = []
    for match in re.finditer(rf"(?<![\w.>:]){re.escape(name)}\s*(<[^;{{()]*>)?\s*\(", text):
        before = text[: match.start()].rstrip()
        previous = re.search(r"(\w+|[>*&])$", before)
        if not previous or previous.group(1) in _KEYWORDS:
            continue
        close = _balanced(text, match.end() - 1)
        after = text[close:].lstrip()
        after = after[5:].lstrip() if after.startswith("const") else after
        if after[:1] and after[0] in endings:
            counts.append(_param_count(text[match.end() : close - 1]))
    return counts


def _class_body(text: str, cpp_class: str) -> tuple[str, list[str]]:
    """(the declarations at the class's own brace level, its base classes)."""
    match = re.search(rf"\b(?:class|struct)\s+{re.escape(cpp_class)}\b([^;{{]*)\{{", text)
    if not match:
        return "", []
    bases = re.findall(r"(?:public|protected|private)\s+([\w:]+)", match.group(1))
    end = _balanced(text, match.end() - 1, "{}")
    body, depth, kept = text[match.end() : end - 1], 0, []
    for char in body:  # member bodies reduced to "{}": what is left are the declarations
        if char == "{":
            depth += 1
            kept += "{" if depth == 1 else ""
        elif char == "}":
            depth -= 1
            kept += "}" if depth == 0 else ""
        elif depth == 0:
            kept.append(char)
    return "".join(kept), [b.split("::")[-1] for b in bases]


class _Sources:
    def __init__(self, wrapper: str, headers: str) -> None:
        self.wrapper, self.all = wrapper, wrapper + "\n" + headers

    def member(self, cpp_class: str, name: str) -> list[int]:
        body, bases = _class_body(self.all, cpp_class)
        counts = _definitions(body, name, "{;:")
        for base in bases if not counts else ():
            counts = self.member(base, name)
            if counts:
                break
        return counts

    def free(self, name: str) -> list[int]:
        return _definitions(self.all, name, "{")


# -- argspecs and targets -----------------------------------------------------------------
def _argspec(extras: str) -> list[tuple[str, bool]]:
    """(name, has default) for each ``py::arg("x")[=v]`` / ``py::args("a", "b")[=v]`` in order."""
    spec = []
    for match in re.finditer(r"\bargs?\s*\(([^()]*)\)\s*(=)?", extras):
        names = re.findall(r'"(\w+)"', match.group(1))
        spec += [(n, False) for n in names[:-1]] + ([(names[-1], bool(match.group(2)))] if names else [])
    return spec


def _signatures(counts: list[int], spec: list[tuple[str, bool]], self_first: bool) -> list[Signature]:
    """Signatures for C++ parameter counts (self included when ``self_first``), named by the argspec."""
    if not counts:
        counts = [len(spec) + (1 if self_first and not (spec and spec[0][0] == "self") else 0)]
    signatures = []
    for total in counts:
        params: list[str | None] = [None] * total
        defaults = 0
        for offset, (name, has_default) in enumerate(reversed(spec[-total:] if spec else []), 1):
            params[total - offset] = name
            defaults = offset if has_default and defaults == offset - 1 else defaults
        signatures.append(Signature(params, total - defaults))
    return signatures


def _target_counts(target: str, cpp_class: str | None, sources: _Sources) -> tuple[list[int], bool]:
    """(parameter counts, whether a C++ member: self comes on top) of what ``.def`` binds."""
    target = target.strip()
    cast = re.match(r"\(\s*[^()]*\(\s*(\w+::)?\*\s*\)\s*\(([^()]*)\)\s*\)\s*&", target)
    if cast:
        return [_param_count(cast.group(2))], bool(cast.group(1))
    member = re.match(r"&\s*(\w+)::(\w+)", target)
    if member:
        owner = cpp_class if member.group(1) == "cl" else member.group(1)
        return sources.member(owner or "", member.group(2)), True
    free = re.match(r"&?\s*([\w:]+)\s*(<.*>)?$", target)
    if free:
        return sources.free(free.group(1).split("::")[-1]), False
    return [], False


# -- the wrapper --------------------------------------------------------------------------
def _defs(chain: str) -> list[tuple[str, list[str]]]:
    """(method, arguments) of every ``.method(...)`` in a Boost.Python class_ chain."""
    calls = []
    for match in re.finditer(r"\.\s*(\w+)\s*\(", chain):
        close = _balanced(chain, match.end() - 1)
        calls.append((match.group(1), _split(chain[match.end() : close - 1])))
    return calls


def _parse_class(name: str, head: list[str], chain: str, cpp_class: str | None, sources: _Sources) -> ClassAPI:
    api = ClassAPI()
    for arg in head[1:]:
        init = re.match(r"(?:py::)?init\s*<(.*)>\s*\((.*)\)$", arg, flags=re.S)
        if init:
            types = _split(init.group(1))
            optional = sum(len(_split(t[t.index("<") + 1 : -1])) for t in types if "optional" in t)
            total = sum(len(_split(t[t.index("<") + 1 : -1])) if "optional" in t else 1 for t in types if t)
            spec = _argspec(init.group(2))
            signature = _signatures([total], spec, self_first=False)[0]
            signature.required = min(signature.required, total - optional)
            api.init = [signature]
        elif re.match(r"(?:py::)?init\s*<", arg):
            api.init = [Signature([None] * len(_split(arg[arg.index("<") + 1 : arg.rindex(">")])), 0)]
    if not any("no_init" in arg for arg in head) and api.init is None:
        api.init = [Signature([], 0)]
    for method, args in _defs(chain):
        if method in ("DEF_SIMPLE_METHOD", "DEF_SIMPLE_METHOD_WITH_ARGS"):
            counts, _ = _target_counts(f"&cl::{args[0]}", cpp_class, sources)
            spec = _argspec(",".join(args[1:]))
            api.methods[args[0]] = _signatures([c + 1 for c in counts], spec, self_first=True)
            api.member_bound.add(args[0])
        elif method == "def" and args and args[0].startswith('"'):
            python_name, target, extras = args[0].strip('"'), args[1] if len(args) > 1 else "", ",".join(args[2:])
            constructor = re.search(r"make_constructor\s*\(\s*([\w:]+)", target)
            if python_name == "__init__" and constructor:
                counts = sources.free(constructor.group(1).split("::")[-1])
                api.init = (api.init if api.init and api.init[0].most else []) + _signatures(counts, [], False)
                continue
            if python_name.startswith("__") or target.startswith("py::self") or "pure_virtual" in target:
                continue
            counts, is_member = _target_counts(target, cpp_class, sources)
            counts = [c + 1 for c in counts] if is_member else counts
            api.methods[python_name] = _signatures(counts, _argspec(extras), self_first=True)
            if is_member:
                api.member_bound.add(python_name)
        elif method == "staticmethod":
            static = args[0].strip('"')
            api.static.add(static)
            if static in api.member_bound:  # a static C++ member: no self after all
                api.methods[static] = [Signature(s.params[1:], max(0, s.required - 1)) for s in api.methods[static]]
        elif method in ("add_property", "def_readonly", "def_readwrite", "add_static_property"):
            api.properties.add(args[0].strip('"'))
        elif method in ("DEF_SIMPLE_RO_MEMBER", "DEF_SIMPLE_RW_MEMBER"):
            api.properties.add(args[0])
    return api


def parse_wrapper(wrapper: str, headers: str) -> DriverAPI:
    text = _strip(wrapper)
    sources = _Sources(text, _strip(headers))
    api = DriverAPI()
    for match in re.finditer(r"\bclass_\s*<", text):
        close = _balanced(text, match.end() - 1, "<>")
        rest = re.match(r"\s*(\w+)?\s*\(", text[close:])
        if not rest:
            continue
        open_paren = close + rest.end() - 1
        head_end = _balanced(text, open_paren)
        head = _split(text[open_paren + 1 : head_end - 1])
        if not head or not head[0].startswith('"'):
            continue
        name = head[0].strip('"')
        statement_end = text.index(";", head_end)
        chain = text[head_end:statement_end]
        if rest.group(1):  # `py::class_<...> wrp("Name", ...); wrp.def(...)...;`
            follow = re.match(rf"\s*{re.escape(rest.group(1))}\b([^;]*);", text[statement_end + 1 :])
            chain += follow.group(1) if follow else ""
        typedef = re.findall(r"typedef\s+([\w:]+)\s+cl\s*;", text[: match.start()])
        cpp_class = typedef[-1].split("::")[-1] if typedef else None
        api.classes[name] = _parse_class(name, head, chain, cpp_class, sources)
    for match in re.finditer(r"\b(?:py::|boost::python::)?def\s*\(\s*\"(\w+)\"", text):
        if text[: match.start()].rstrip().endswith("."):
            continue  # a method of a class_ chain
        close = _balanced(text, text.index("(", match.start()))
        args = _split(text[text.index("(", match.start()) + 1 : close - 1])
        counts, _ = _target_counts(args[1], None, sources)
        api.functions[match.group(1)] = _signatures(counts, _argspec(",".join(args[2:])), self_first=False)
    for match in re.finditer(r"\bDEF_SIMPLE_FUNCTION(_WITH_ARGS)?\s*\(\s*(\w+)\s*(,(.*?))?\)\s*;", text, flags=re.S):
        counts = sources.free(match.group(2))
        api.functions[match.group(2)] = _signatures(counts, _argspec(match.group(4) or ""), self_first=False)
    api.exceptions = set(re.findall(r"\bDECLARE_EXC\s*\(\s*(\w+)", text))
    api.other = set(re.findall(r"\benum_\s*<[^>]*>\s*\(\s*\"(\w+)\"", text))
    return api


def add_python_layer(api: DriverAPI, driver_py: str) -> None:
    """Module-level functions of ``pycuda/driver.py`` (pure Python, exact signatures)."""
    for node in ast.parse(driver_py).body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            args = node.args
            names = [a.arg for a in args.posonlyargs + args.args]
            api.functions[node.name] = [Signature(list(names), len(names) - len(args.defaults))]
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            api.classes.setdefault(node.name, ClassAPI(init=[Signature([], 0)]))


def load(sdist: Path) -> DriverAPI:
    """The driver API of a pycuda source package (``.tar.gz``), read without building anything."""
    wanted = {"src/wrapper/wrap_cudadrv.cpp", "src/cpp/cuda.hpp", "src/wrapper/wrap_helpers.hpp", "pycuda/driver.py"}
    texts: dict[str, str] = {}
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            relative = member.name.split("/", 1)[-1]
            if relative in wanted:
                texts[relative] = archive.extractfile(member).read().decode("utf-8", "replace")
    missing = wanted - set(texts)
    if missing:
        raise ValueError(f"{sdist}: no {', '.join(sorted(missing))} (not a pycuda source package?)")
    api = parse_wrapper(texts["src/wrapper/wrap_cudadrv.cpp"], texts["src/cpp/cuda.hpp"])
    add_python_layer(api, texts["pycuda/driver.py"])
    return api
