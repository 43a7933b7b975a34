"""The TensorRT path checked against the REAL TensorRT 10.x / 11.x and pycuda bindings (no GPU, no TensorRT).

The emulated suites run once more under a recorder (``tests/bindings/recorder.py``) that keeps every
TensorRT and pycuda name the GPU modules read or call: argument types, enum members, what came back.
Each recorded TensorRT call is replayed against the compiled bindings of ``tensorrt-cu12-bindings``
(10.x) and ``tensorrt-cu13-bindings`` (11.x), imported over stub libraries, in forked children
(``tests/bindings/replay.py``), next to negative controls the bindings must refuse; each recorded pycuda
call is checked for name and arity against the driver wrapper in pycuda's source package. An AST walk
(``tests/bindings/sites.py``) asserts that every GPU call site was recorded, so no call escapes. The
emulation itself is compared with the real modules: names, kinds and signatures, enum tables, return
types, ``nptype``, the refusals; what still differs is listed in the emulation's docstrings.

The wheels and the sdist come from a cache outside the repository (``tests/bindings/wheels.py``;
``python -m tests.bindings.wheels`` fetches them, and ``.ci/run`` does); without them the tests that
need them skip and say why.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.bindings import calls, pycuda_source, recorder, sites, wheels
from tests.emulation import fake_pycuda, fake_tensorrt, install, write_toy_graph
from tests.emulation.fake_tensorrt import ENUMS, VERSIONS, make_module

TRT_MAJORS = (10, 11)
# The emulated suites that drive the GPU modules; the site walk proves that together they reach every call.
SUITES = (
    "tests/test_backends.py",
    "tests/test_trt_build.py",
    "tests/test_owner_thread.py",
    "tests/test_select.py",
    "tests/test_emulation.py",
)
# The real bindings name a return type pybind11 had not registered yet by its C++ name.
RETURN_ALIASES = {"nvonnxparser::IParserError": "ParserError"}
FETCH_HINT = "`python -m tests.bindings.wheels` fetches what is missing (pip download; needs the package index)"


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> dict[str, Any]:
    """The emulated suites run once under the recorder (a pytest subprocess); its report, or why there is none."""
    out = tmp_path_factory.mktemp("recording") / "calls.json"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "tests.bindings.recorder", "-p", "no:cacheprovider", *SUITES]
    done = subprocess.run(
        command, cwd=sites.ROOT, env={**os.environ, recorder.ENV: str(out)}, capture_output=True, text=True
    )
    report = json.loads(out.read_text()) if out.is_file() else {}
    if done.returncode != 0 or not out.is_file():  # what was recorded is still replayed
        output = f"{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
        report["failure"] = f"the emulated suites failed under the recorder:\n{output}"
    return report


def records(recording: dict[str, Any]) -> list[dict[str, Any]]:
    """The recorded reads and calls; the test fails (with the suites' output) when the recording did."""
    if "failure" in recording:
        pytest.fail(recording["failure"])
    return recording["records"]


def tensorrt_records(recording: dict[str, Any], major: int) -> list[dict[str, Any]]:
    found = recording.get("records", [])  # without a recording, the real surface is still compared
    return [r for r in found if r["module"] == "tensorrt" and r["major"] == major]


def _replay(major: int, records: list[dict[str, Any]], scratch: Path) -> dict[str, Any]:
    """Import the real bindings over stub libraries in a subprocess; replay ``records`` and the controls."""
    unpacked = wheels.unpack_bindings(major, scratch / "wheel")
    stubs, _ = wheels.build_stubs(unpacked / "tensorrt_bindings" / "tensorrt.so", scratch / "stubs")
    request, answer = scratch / "request.json", scratch / "answer.json"
    request.write_text(json.dumps({"calls": records, "controls": calls.CONTROLS}))
    library_path = os.pathsep.join(filter(None, [str(stubs), os.environ.get("LD_LIBRARY_PATH")]))
    env = {**os.environ, "LD_LIBRARY_PATH": library_path, "PYTHONPATH": f"{unpacked}{os.pathsep}{sites.ROOT}"}
    command = [sys.executable, "-m", "tests.bindings.replay", str(request), str(answer)]
    done = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"replay against the real TensorRT {VERSIONS[major]} bindings failed:\n{done.stderr[-4000:]}")
    return {"records": records, **json.loads(answer.read_text())}


@pytest.fixture(scope="module")
def replays(recording, tmp_path_factory) -> dict[int, dict[str, Any] | str]:
    """Per TensorRT major: the replay's answer, or why there is none."""
    results: dict[int, dict[str, Any] | str] = {}
    for major in TRT_MAJORS:
        if wheels.missing_tools():
            results[major] = f"no {', '.join(wheels.missing_tools())} to build the stub libraries"
        elif wheels.bindings_wheel(major) is None:
            package = f"{wheels.BINDINGS[major]}=={VERSIONS[major]}"
            results[major] = f"{package} is not cached in {wheels.cache_dir()}; {FETCH_HINT}"
        else:
            scratch = tmp_path_factory.mktemp(f"tensorrt{major}")
            results[major] = _replay(major, tensorrt_records(recording, major), scratch)
    return results


@pytest.fixture(scope="module", params=TRT_MAJORS, ids=[f"trt{m}" for m in TRT_MAJORS])
def real(request, replays) -> tuple[int, dict[str, Any]]:
    """(major, the replay's answer) for each TensorRT major whose bindings are cached."""
    answer = replays[request.param]
    if isinstance(answer, str):
        pytest.skip(f"real TensorRT {VERSIONS[request.param]} bindings unavailable: {answer}")
    return request.param, answer


@functools.cache
def cached_driver_api() -> pycuda_source.DriverAPI | None:
    sdist = wheels.pycuda_sdist()
    return None if sdist is None else pycuda_source.load(sdist)


@pytest.fixture(scope="module")
def driver_api() -> pycuda_source.DriverAPI:
    """pycuda's driver API as its source package defines it."""
    api = cached_driver_api()
    if api is None:
        name, version = wheels.PYCUDA
        pytest.skip(f"{name}=={version} source package is not cached in {wheels.cache_dir()}; {FETCH_HINT}")
    return api


# -- names --------------------------------------------------------------------------------
def public(names: Any) -> list[str]:
    return sorted(n for n in names if not n.startswith("_"))


def emulated_names() -> set[str]:
    """Every public name of the emulated modules and of their classes (both majors)."""
    names: set[str] = set()
    driver = fake_pycuda.driver_module()
    for module in (*(make_module(m) for m in TRT_MAJORS), driver):
        for name in public(dir(module)):
            names.add(name)
            value = getattr(module, name)
            if isinstance(value, type):
                names |= set(public(dir(value)))
    return names


def real_names(replays: dict[int, Any]) -> set[str]:
    names: set[str] = set()
    for answer in replays.values():
        if isinstance(answer, dict):
            names |= set(answer["surface"]["module"])
            for cls in answer["surface"]["classes"].values():
                names |= set(cls["members"])
    api = cached_driver_api()
    if api is not None:
        names |= api.names
        for cls in api.classes.values():
            names |= set(cls.methods) | cls.properties
    return names


def where(record: dict[str, Any]) -> str:
    owner = f"{record['owner']}." if record["owner"] else ""
    arguments = [calls.signature(a) for a in record.get("args", [])]
    arguments += [f"{k}={calls.signature(a)}" for k, a in record.get("kwargs", {}).items()]
    call = f"({', '.join(arguments)})" if record["kind"] == "call" else ""
    return f"{record['module']} {owner}{record['name']}{call} at {', '.join(record['sites'])}"


# -- the recording and the call sites ---------------------------------------------------------
def test_recorder_watched_every_gpu_module(recording) -> None:
    """The recorder watched exactly the modules the site walk finds, and the emulated suites passed under it."""
    found = [p.relative_to(sites.ROOT).as_posix() for p in sites.gpu_modules()]
    assert {"engines/tensorrt_backend.py", "engines/trt_build.py", "engines/select.py"} <= set(found)
    recorded = records(recording)
    assert recording["watched"] == sorted(found)
    assert recording["exitstatus"] == 0 and recording["collected"] > 0 and recording["failed"] == 0
    assert {r["major"] for r in recorded if r["module"] == "tensorrt"} == set(TRT_MAJORS)


def test_every_gpu_call_site_was_recorded(recording, replays) -> None:
    """Every TensorRT and pycuda call site in the GPU modules ran under the recorder; except-clause names exist."""
    api_names = emulated_names() | real_names(replays)
    lines: dict[tuple[str, str], set[int]] = {}
    for record in records(recording):
        for place in record["sites"]:
            path, line = place.rsplit(":", 1)
            lines.setdefault((path, record["name"]), set()).add(int(line))
    unrecorded, unknown = [], []
    common, defined = sites.common_names(), sites.project_attributes()
    for path in sites.gpu_modules():
        for site in sites.call_sites(path, api_names, common, defined=defined):
            if site.static:
                known = api_names if site.module is None else module_names(site.module, replays)
                unknown += [] if site.name in known else [str(site)]
            elif not any(site.line <= line <= site.end_line for line in lines.get((site.path, site.name), ())):
                unrecorded.append(str(site))
    assert not unrecorded, "GPU call sites no emulated suite reached (add a test that runs them): " + "; ".join(
        unrecorded
    )
    assert not unknown, "names in except clauses that the GPU modules do not have: " + "; ".join(unknown)


def module_names(module: str, replays: dict[int, Any]) -> set[str]:
    """Public names of the emulated module, and of the real one where it is available."""
    if module == "pycuda.driver":
        api = cached_driver_api()
        return api.names if api else set(fake_pycuda.DRIVER_API)
    names = [set(a["surface"]["module"]) for a in replays.values() if isinstance(a, dict)]
    return set.intersection(*names) if names else set(public(dir(make_module(11))))


def test_a_new_gpu_call_cannot_escape_the_site_walk(tmp_path) -> None:
    """A call added anywhere in a GPU module is a site: module-rooted, by name, or an except clause."""
    package = tmp_path / "engines"
    package.mkdir()
    (package / "new.py").write_text(
        "import numpy as np\n\nfrom engines.tensorrt_backend import import_gpu_modules\n\n\n"
        "def build(config, engine, frame):\n"
        "    trt, cuda = import_gpu_modules()\n"
        "    config.set_flag(trt.BuilderFlag.FP16)\n"
        "    size = engine.device_memory_size\n"
        "    np.zeros(3).copy()\n"
        "    try:\n"
        "        cuda.Stream().synchronize()\n"
        "    except cuda.LogicError:\n"
        "        pass\n"
        "    return size, frame.shape\n"
    )
    (found,) = sites.gpu_modules(tmp_path)
    api = {"set_flag", "BuilderFlag", "FP16", "device_memory_size", "Stream", "synchronize", "copy", "shape"}
    walked = sites.call_sites(found, api, sites.common_names(), root=tmp_path)
    assert {(s.name, s.module, s.static) for s in walked} == {
        ("set_flag", None, False),
        ("BuilderFlag", "tensorrt", False),
        ("FP16", "tensorrt", False),
        ("device_memory_size", None, False),
        ("Stream", "pycuda.driver", False),
        ("synchronize", "pycuda.driver", False),
        ("LogicError", "pycuda.driver", True),
    }


# -- TensorRT: the recorded calls against the real bindings ----------------------------------------
def test_recorded_tensorrt_calls_pass_the_real_bindings(real, recording) -> None:
    """Every TensorRT name the code read exists, and pybind11 converted the arguments of every recorded call."""
    major, answer = real
    assert answer["surface"]["version"] == VERSIONS[major]
    verdicts = zip(answer["records"], answer["calls"], strict=True)
    refused = [f"{where(record)}: {verdict}" for record, verdict in verdicts if not verdict.startswith("accepted")]
    assert not refused, f"refused by TensorRT {VERSIONS[major]}:\n" + "\n".join(refused)
    records(recording)  # and the recording was complete
    assert len(answer["records"]) > 20


def test_negative_controls_are_refused_by_the_real_bindings(real) -> None:
    """Wrong argument types are refused (else the check could not tell right from wrong)."""
    _, answer = real
    verdicts = {label: verdict for (label, _), verdict in zip(calls.CONTROLS, answer["controls"], strict=True)}
    assert all(v.startswith("rejected: ") for v in verdicts.values()), verdicts


@pytest.mark.parametrize("major", TRT_MAJORS)
def test_negative_controls_are_refused_by_the_emulation(major) -> None:
    """The emulation refuses the same wrong argument types with TypeError, as pybind11 does."""
    trt = make_module(major)
    for label, call in calls.CONTROLS:
        with pytest.raises(TypeError):
            calls.invoke(call, trt)
            pytest.fail(f"the emulation accepted {label}")


def test_recorded_return_types_match_the_real_signatures(real, recording) -> None:
    """What the emulation handed back (Dims, list[Dims], IHostMemory, enum members ...) is what the real one returns."""
    major, answer = real
    records(recording)
    surface, wrong = answer["surface"], []
    for record in answer["records"]:
        expected = expected_types(record, surface)
        for outcome in record["outcomes"]:
            if expected is None or outcome.startswith("raises "):
                continue
            if outcome not in expected and not (outcome == "None" and expected - {"bool", "int", "float", "str"}):
                wrong.append(f"{where(record)}: emulated {outcome}, real {VERSIONS[major]} {sorted(expected)}")
    assert not wrong, "\n".join(wrong)


def expected_types(record: dict[str, Any], surface: dict[str, Any]) -> set[str] | None:
    """The type names the real module gives for this read or call; None where it does not say."""
    owner, name = record["owner"], record["name"]
    if not owner:
        kind = surface["module"].get(name)
        if record["kind"] == "get":
            return {"type"} if kind == "class" else None
        return {name} if kind == "class" else None  # a constructor; functions (nptype) are Python code
    member = surface["classes"].get(owner, {}).get("members", {}).get(name)
    if member is None:
        return None
    if member["kind"] == "enum member":
        return {member["enum"]}
    if member["kind"] == "property" and record["kind"] == "get":
        return {RETURN_ALIASES.get(member["returns"], member["returns"])}
    if member["kind"] in ("method", "static") and record["kind"] == "call":
        return {RETURN_ALIASES.get(s["returns"], s["returns"]) for s in member["signatures"]}
    return None


# -- the emulation against the real TensorRT module --------------------------------------------
def test_emulated_enums_match_the_real_ones(real) -> None:
    """Every emulated enum has exactly the real members and values of its major."""
    major, answer = real
    trt = make_module(major)
    for qualname in ENUMS[major]:
        emulated = {name: int(member) for name, member in calls.resolve(trt, qualname).__members__.items()}
        assert emulated == answer["surface"]["enums"][qualname], qualname


def test_emulated_nptype_matches_the_real_one(real) -> None:
    """nptype gives the same numpy type, or the same TypeError, for every DataType member."""
    major, answer = real
    trt = make_module(major)
    for name, want in answer["surface"]["nptype"].items():
        try:
            got = trt.nptype(trt.DataType[name]).__name__
        except TypeError as exc:
            got = f"TypeError: {exc}"
        assert got == want, name


def test_emulated_tensorrt_is_a_subset_of_the_real_module(real, monkeypatch, tmp_path) -> None:
    """Each emulated name exists in the real module with the same kind and a compatible signature."""
    major, answer = real
    surface, trt = answer["surface"], make_module(major)
    differences = []
    for name in public(dir(trt)):
        value = getattr(trt, name)
        if name not in surface["module"]:
            differences.append(f"tensorrt.{name}: not in the real module")
        elif isinstance(value, type) and not hasattr(value, "__members__"):
            differences += class_differences(value, surface["classes"].get(name), fake_tensorrt.BUILTIN_BASES)
            if hasattr(value, "Severity"):
                differences += [] if "ILogger.Severity" in surface["enums"] else [f"{name}.Severity: not real"]
    for obj in emulated_instances(monkeypatch, tmp_path, major):
        real_members = surface["classes"][type(obj).__qualname__]["members"]
        extra = [k for k in public(getattr(obj, "__dict__", {})) if k not in real_members]
        differences += [f"{type(obj).__qualname__}.{k}: instance attribute the real class lacks" for k in extra]
    assert not differences, "\n".join(differences)


def test_declared_differences_are_listed_in_the_docstrings() -> None:
    """The builtin bases the comparison tolerates are the ones the emulation's docstrings list."""
    for module in (fake_tensorrt, fake_pycuda):
        for name, base in module.BUILTIN_BASES.items():
            assert f"``{name}``" in module.__doc__ and f"``{base.__name__}``" in module.__doc__, (name, base)


def class_differences(cls: type, real_class: dict[str, Any] | None, builtin_bases: dict[str, type]) -> list[str]:
    """How an emulated class differs from the real one: missing members, other kinds, other signatures."""
    name = cls.__qualname__
    if real_class is None:
        return [f"{name}: not a real class"]
    tolerated = set(dir(builtin_bases[name])) if name in builtin_bases else set()
    differences = []
    for attr in public(dir(cls)):
        if attr in tolerated:
            continue
        real_member = real_class["members"].get(attr)
        if real_member is None:
            differences.append(f"{name}.{attr}: not in the real class")
            continue
        raw = inspect.getattr_static(cls, attr)
        kind = emulated_kind(raw)
        if kind != real_member["kind"]:
            differences.append(f"{name}.{attr}: {kind} here, {real_member['kind']} in the real class")
        elif kind in ("method", "static") and not compatible(raw, real_member["signatures"], kind == "method"):
            differences.append(f"{name}.{attr}{inspect.signature(raw)}: no such real signature")
        elif kind == "data" and real_member["value"] != raw:
            differences.append(f"{name}.{attr} = {raw!r}, real {real_member['value']!r}")
    if "__init__" in vars(cls) and not compatible(cls.__init__, real_class["init"], True):
        differences.append(f"{name}{inspect.signature(cls.__init__)}: no such real constructor")
    return differences


def emulated_kind(raw: Any) -> str:
    if isinstance(raw, property):
        return "property"
    if isinstance(raw, staticmethod):
        return "static"
    if isinstance(raw, type):
        return "class"
    if inspect.isfunction(raw):
        return "method"
    if hasattr(type(raw), "__members__") and hasattr(raw, "name"):
        return "enum member"
    return "data"


def compatible(function: Any, real_signatures: list[dict[str, Any]], bound: bool) -> bool:
    """Whether every way of calling the emulated function is a real overload (same names in order, rest optional)."""
    if isinstance(function, staticmethod):
        function = function.__func__
    params = list(inspect.signature(function).parameters.values())[1 if bound else 0 :]
    names = [p.name for p in params]
    required = sum(p.default is inspect.Parameter.empty for p in params)
    overloads = [[(p["name"], p["default"]) for p in s["params"]][1 if bound else 0 :] for s in real_signatures]

    def takes(theirs: list[tuple[str, bool]], given: int) -> bool:
        return [name for name, _ in theirs[:given]] == names[:given] and all(d for _, d in theirs[given:])

    return all(any(takes(theirs, given) for theirs in overloads) for given in range(required, len(names) + 1))


def emulated_instances(monkeypatch, tmp_path: Path, major: int) -> list[Any]:
    """One of each emulated TensorRT object, made the way the engine code makes them."""
    trt, cuda = install(monkeypatch, major=major)
    logger = trt.Logger()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(write_toy_graph(tmp_path / "g.onnx").read_bytes(), "g.onnx")
    failed = trt.OnnxParser(builder.create_network(0), logger)
    assert not failed.parse(b"not onnx")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = tuple(tensor.shape)
        profile.set_shape(tensor.name, (1, *shape[1:]), (2, *shape[1:]), (2, *shape[1:]))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    cuda.init()
    context = cuda.Device(0).retain_primary_context()
    context.push()
    try:
        execution = engine.create_execution_context()
    finally:
        cuda.Context.pop()
    objects = [logger, builder, network, tensor, parser, failed.get_error(0), config, profile, cache]
    return [*objects, cache.serialize(), plan, engine, execution, engine.get_tensor_shape(tensor.name)]


# -- pycuda: the recorded calls and the emulated driver against the source package -----------------
def test_recorded_pycuda_calls_fit_the_driver_wrapper(recording, driver_api) -> None:
    """Every pycuda name the code read exists in pycuda's driver, and every recorded call has a valid arity."""
    problems = []
    for record in (r for r in records(recording) if r["module"] == "pycuda.driver"):
        problem = driver_problem(record, driver_api)
        if problem:
            problems.append(f"{where(record)}: {problem}")
    assert not problems, "\n".join(problems)


def driver_problem(record: dict[str, Any], api: pycuda_source.DriverAPI) -> str | None:
    owner, name = record["owner"], record["name"]
    if not owner:
        if name not in api.names:
            return "pycuda.driver has no such name"
        if record["kind"] == "get":
            return None
        signatures = api.functions.get(name) or (api.classes[name].init if name in api.classes else None)
        positional = len(record["args"])
    else:
        cls = api.classes.get(owner)
        if cls is None or name not in (set(cls.methods) | cls.properties):
            return f"pycuda.driver.{owner} has no {name}"
        if record["kind"] == "get":
            return None
        signatures = cls.methods[name]
        positional = len(record["args"]) + (0 if name in cls.static else 1)
    if not signatures:
        return "pycuda cannot construct it from Python"
    if not any(s.accepts(positional, list(record["kwargs"])) for s in signatures):
        return f"no overload takes {positional} positional argument(s) and {list(record['kwargs'])}: {signatures}"
    return None


def test_emulated_driver_matches_the_wrapper(driver_api) -> None:
    """The emulated pycuda.driver's names, kinds and arities are pycuda's (keyword names where pycuda has them)."""
    differences = []
    for name in fake_pycuda.DRIVER_API:
        value = getattr(fake_pycuda, name)
        if name not in driver_api.names:
            differences.append(f"pycuda.driver.{name}: not in pycuda")
        elif isinstance(value, type) and issubclass(value, Exception):
            differences += [] if name in driver_api.exceptions else [f"{name}: not a pycuda exception"]
        elif isinstance(value, type):
            differences += driver_class_differences(value, driver_api.classes[name])
        elif not arity_matches(value, driver_api.functions[name], bound=False):
            differences.append(f"pycuda.driver.{name}{inspect.signature(value)}: {driver_api.functions[name]}")
    assert not differences, "\n".join(differences)


def driver_class_differences(cls: type, api: pycuda_source.ClassAPI) -> list[str]:
    name = cls.__name__
    tolerated = set(dir(fake_pycuda.BUILTIN_BASES[name])) if name in fake_pycuda.BUILTIN_BASES else set()
    differences = []
    for attr in public(dir(cls)):
        raw = inspect.getattr_static(cls, attr)
        if attr in tolerated:
            continue
        if attr not in api.methods and attr not in api.properties:
            differences.append(f"{name}.{attr}: not in pycuda")
        elif isinstance(raw, staticmethod) != (attr in api.static):
            differences.append(f"{name}.{attr}: static in one, not in the other")
        elif attr in api.methods and not arity_matches(raw, api.methods[attr], bound=False):
            differences.append(f"{name}.{attr}{inspect.signature(raw)}: {api.methods[attr]}")
    if "__init__" in vars(cls):
        if api.init is None:
            differences.append(f"{name}: constructible here, not in pycuda")
        elif not arity_matches(cls.__init__, api.init, bound=True):
            differences.append(f"{name}{inspect.signature(cls.__init__)}: {api.init}")
    return differences


def arity_matches(function: Any, signatures: list[pycuda_source.Signature], bound: bool) -> bool:
    """Same count of parameters and of required ones as some pycuda overload, and its keyword names."""
    if isinstance(function, staticmethod):
        function = function.__func__
    params = list(inspect.signature(function).parameters.values())[1 if bound else 0 :]
    required = sum(p.default is inspect.Parameter.empty for p in params)
    for signature in signatures:
        names_agree = all(n is None or n == p.name for n, p in zip(signature.params, params, strict=False))
        if signature.most == len(params) and signature.required == required and names_agree:
            return True
    return False
