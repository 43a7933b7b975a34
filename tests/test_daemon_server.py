"""Server phases over real sockets: readiness, signals, drain, reload, systemd notify, a real bundle."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from daemon import cli
from daemon.config import Config
from daemon.server import Server
from daemon.systemd import Notifier
from engines.errors import UserError
from tests.test_daemon_support import Client, FakeInspector, image, make_config, running

REPO = Path(__file__).resolve().parents[1]


def http_status(address: str, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_readyz_is_503_until_the_model_is_loaded_and_sockets_bound() -> None:
    """While the model loads /healthz is 200 and /readyz 503; once serving, both are 200."""
    release = threading.Event()

    def slow_loader(model: str, backend: str) -> FakeInspector:
        release.wait(10)
        return FakeInspector()

    server = Server(make_config(), loader=slow_loader)
    thread = threading.Thread(target=lambda: server.run(install_signals=False), daemon=True)
    thread.start()
    for _ in range(100):
        if "http" in server.endpoints:
            break
        time.sleep(0.02)
    address = server.endpoints["http"]
    assert http_status(address, "/readyz") == 503
    assert http_status(address, "/healthz") == 200
    release.set()
    assert server.ready.wait(10)
    assert http_status(address, "/readyz") == 200
    assert http_status(address, "/nope") == 404
    server.request_stop()
    thread.join(10)
    assert not thread.is_alive()


class WarmableInspector(FakeInspector):
    """A fake with the real Inspector's ``reference_frame``: a frame whose first pixel (42) marks the warm-up."""

    def reference_frame(self) -> np.ndarray:
        return image(42, self.geometry)


def test_the_stage_threads_are_warmed_up_before_ready_and_nothing_is_published_for_it() -> None:
    """By the time the daemon is ready, the warm-up frame went through both prepare threads and the engine; the
    first real frame gets the first (and only) decision."""
    fake = WarmableInspector()
    with running(fake, workers=2) as (server, _), Client(server) as client:
        warm = list(fake.started)
        client.send(1)
        got = client.decisions(2, timeout_s=3)  # asks for one more than may come: the wait is the check
    assert warm == [("prepare", 42), ("prepare", 42), ("infer", 42)]
    assert [(d["frame_id"], d["reason"]) for d in got] == [(1, "ok")]


def test_stop_finishes_in_flight_frames_and_publishes_their_decisions() -> None:
    """Frames in flight when the stop comes are still decided and published before exit."""
    fake = FakeInspector()
    release = fake.hold("infer", 100)
    with running(fake, drain_s=30) as (server, _), Client(server) as client:
        client.send(1)
        client.send(2)
        fake.wait_until(lambda: [stage for stage, _ in fake.started].count("prepare") == 2)  # both admitted
        server.request_stop()
        release.set()
        got = client.decisions(2, timeout_s=30)
    assert [(d["frame_id"], d["reason"]) for d in got] == [(1, "ok"), (2, "ok")]


def start_error(cfg: Config) -> str:
    """The UserError a daemon with ``cfg`` stops with at start ('' if it started: it is then stopped)."""
    errors: list[str] = []

    def run() -> None:
        try:
            server.run(install_signals=False)
        except UserError as exc:
            errors.append(str(exc))

    server = Server(cfg, loader=lambda m, b: FakeInspector())
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)  # a refused start ends at once
    if thread.is_alive():
        server.request_stop()
        thread.join(15)
    return errors[0] if errors else ""


def test_frames_and_decisions_over_ipc_endpoints(tmp_path: Path) -> None:
    """A grabber on the same host may use ipc:// (a Unix socket: no TCP stack for the 26 MB frame). A second
    daemon on the same path is refused as a busy port is (libzmq alone would take the path over silently);
    a socket file left by a killed daemon is taken over; the daemon removes its files when it stops."""
    frames, decisions = f"ipc://{tmp_path}/frames", f"ipc://{tmp_path}/decisions"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "frames"))
    stale.close()  # the file stays, nothing listens: what a killed process leaves
    with running(frames_endpoint=frames, decisions_endpoint=decisions) as (server, _):
        assert (server.endpoints["frames"], server.endpoints["decisions"]) == (frames, decisions)
        modes = {stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("frames", "decisions")}
        assert modes == {0o660}  # the daemon's group may connect, whatever the umask
        for setting, taken in (("frames_endpoint", frames), ("decisions_endpoint", decisions)):
            assert setting in start_error(replace(make_config(), **{setting: taken}))
        with Client(server) as client:  # the first daemon still has both endpoints
            client.send(1)
            client.send(2)
            got = client.decisions(2, timeout_s=30)
    assert [(d["frame_id"], d["reason"]) for d in got] == [(1, "ok"), (2, "ok")]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_drain_timeout_rejects_what_is_left() -> None:
    """Frames that cannot finish within drain_s are rejected (reason error) rather than lost."""
    fake = FakeInspector()
    release = fake.hold("infer", 100)  # never finishes before the stop has given up on it
    with running(fake, drain_s=0.1) as (server, _), Client(server) as client:
        client.send(1)
        fake.wait_until(lambda: ("infer", 100) in fake.started)
        server.request_stop()
        got = client.decisions(1, timeout_s=30)
        release.set()
    assert got[0]["reason"] == "error" and "stopping" in got[0]["detail"]


def test_reload_swaps_in_a_warmed_model_and_a_failed_reload_keeps_the_old() -> None:
    """request_reload (the SIGHUP path) loads a new model; a loader failure keeps serving the old one."""
    loads: list[str] = []

    def loader(model: str, backend: str) -> FakeInspector:
        loads.append(model)
        if len(loads) == 3:
            raise UserError("bundle/manifest.json: checksum mismatch")
        fake = FakeInspector(bundle_id=f"fake-{len(loads)}")
        fake.activate()
        return fake

    server = Server(make_config(), loader=loader)
    thread = threading.Thread(target=lambda: server.run(install_signals=False), daemon=True)
    thread.start()
    assert server.ready.wait(10)
    first = server.scheduler.engine
    with Client(server) as client:
        client.send(1)
        got = client.decisions(1)
        assert server.reload() is True
        assert first.active is False  # the old model was freed once unused
        client.send(2)
        got += client.decisions(1)
        assert server.reload() is False
        client.send(3)
        got += client.decisions(1)
    server.request_stop()
    thread.join(10)
    assert [d["model"] for d in got] == ["fake-1", "fake-2", "fake-2"]


def test_reload_refuses_a_model_of_another_geometry() -> None:
    """A new bundle with a different image size is refused; the daemon keeps its model."""
    from engines.types import Geometry

    models = iter([FakeInspector(), FakeInspector(geometry=Geometry(64, 64, 1, "uint8"), bundle_id="other")])
    server = Server(make_config(), loader=lambda m, b: next(models))
    thread = threading.Thread(target=lambda: server.run(install_signals=False), daemon=True)
    thread.start()
    assert server.ready.wait(10)
    assert server.reload() is False
    assert server.scheduler.engine.bundle_id == "fake-1"
    server.request_stop()
    thread.join(10)


def test_signals_reload_on_hup_and_drain_on_term() -> None:
    """In a real process SIGHUP reloads the model and SIGTERM drains, publishes and exits 0."""
    options = json.dumps({"infer_s": 0.3})
    code = f"from tests.test_daemon_support import serve_fake; raise SystemExit(serve_fake({options!r}))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        endpoints = json.loads(proc.stdout.readline())
        with Client(endpoints) as client:
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            got: list[dict] = []
            while time.monotonic() < deadline:  # reload happens in the background; probe until it shows
                client.send(len(got))
                got += client.decisions(1, timeout_s=2)
                if got and got[-1]["model"] == "fake-2":
                    break
            assert got[-1]["model"] == "fake-2"
            client.send(100)
            time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            last = client.decisions(1, timeout_s=5)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert last and last[0]["frame_id"] == 100 and last[0]["reason"] == "ok"
    log = proc.stderr.read()
    assert '"event": "reloaded"' in log and '"event": "stopped"' in log


def test_systemd_notifications(tmp_path: Path) -> None:
    """With NOTIFY_SOCKET set the daemon sends READY=1, WATCHDOG=1 and STOPPING=1."""
    path = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(5)
    notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
    server = Server(make_config(), loader=lambda m, b: FakeInspector(), notifier=notifier)
    thread = threading.Thread(target=lambda: server.run(install_signals=False), daemon=True)
    thread.start()
    assert server.ready.wait(10)
    time.sleep(0.3)
    server.request_stop()
    thread.join(10)
    messages = []
    listener.settimeout(0.5)
    try:
        while True:
            messages.append(listener.recv(4096).decode())
    except TimeoutError:
        pass
    listener.close()
    assert messages[0].startswith("READY=1")
    assert "WATCHDOG=1" in messages and messages[-1] == "STOPPING=1"


def test_busy_port_and_bad_bundle_are_one_line_user_errors(tmp_path: Path) -> None:
    """A port already in use and a missing bundle stop the start with a clear message (exit 2 in the CLI)."""
    with running() as (server, _):
        taken = replace(make_config(), frames_endpoint=server.endpoints["frames"])
        with pytest.raises(UserError, match="frames_endpoint"):
            Server(taken, loader=lambda m, b: FakeInspector()).run(install_signals=False)
    code = cli.main(["serve", "--model", str(tmp_path / "missing"), "--http", "", "--frames", "tcp://127.0.0.1:*"])
    assert code == 2


# -- with a real fitted bundle -------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny synthetic line (256 px) and a template bundle fitted on it."""
    from calibration.datasets import load_dataset
    from calibration.synth import SynthConfig, write_dataset
    from calibration.template_fit import FitConfig, fit_template

    root = tmp_path_factory.mktemp("line")
    synth = SynthConfig(size=256, train=8, test_good=2, per_kind=1, kinds=("dot", "missing"), workers=1)
    write_dataset(root / "data", synth, progress=False)
    fit_template(
        load_dataset(root / "data").train_good, root / "bundle", config=FitConfig(core=128, folds=4), progress=False
    )
    return root / "data", root / "bundle"


def test_real_bundle_decisions_match_offline_inspection(bundle: tuple[Path, Path]) -> None:
    """The daemon's verdicts and scores equal Inspector.inspect on the same images."""
    from daemon.server import load_engine
    from engines.decode import read_image
    from engines.inspector import Inspector

    data, model = bundle
    paths = sorted((data / "test").rglob("*.png"))
    images = [read_image(p) for p in paths]
    with Inspector.load(model, backend="onnxruntime") as offline:
        expected = [offline.inspect(img) for img in images]
    # Every frame admitted and none near its deadline, however loaded the machine: the check is the verdicts.
    cfg = replace(make_config(), model=str(model), backend="onnxruntime", queue_depth=64, cycle_ms=600_000)
    server = Server(cfg, loader=load_engine)
    thread = threading.Thread(target=lambda: server.run(install_signals=False), daemon=True)
    thread.start()
    assert server.ready.wait(60)
    try:
        with Client(server) as client:
            for i, img in enumerate(images):
                client.send(i, img, width=img.shape[1], height=img.shape[0])
                time.sleep(0.02)
            got = client.decisions(len(images), timeout_s=120)
    finally:
        server.request_stop()
        thread.join(20)
    assert [d["frame_id"] for d in got] == list(range(len(images)))
    assert [d["reason"] for d in got] == [r.reason for r in expected]
    assert [d["score"] for d in got] == pytest.approx([r.score for r in expected], abs=1e-3)
    assert {d["model"] for d in got} == {server.scheduler.engine.bundle_id}
    assert os.path.basename(paths[0].parent) in ("dot", "good", "missing")


# -- the version, everywhere ------------------------------------------------------------------------
def test_the_version_is_in_the_cli_the_startup_log_metrics_and_every_decision(capsys) -> None:
    """`inspectd --version`, the "starting" log line, inspectd_build_info and every decision carry the version."""
    import importlib.metadata

    from structlog.testing import capture_logs

    from tests.test_daemon_metrics import scrape

    version = importlib.metadata.version("inspectd")
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"inspectd {version}"
    run = subprocess.run([sys.executable, "-m", "daemon.cli", "--version"], capture_output=True, text=True, cwd=REPO)
    assert (run.returncode, run.stdout.strip()) == (0, f"inspectd {version}")
    with capture_logs() as logs, running() as (server, _), Client(server) as client:
        client.send(1)
        client.send_parts(b"{not json", b"")  # unreadable: no decision
        client.send_parts(json.dumps({"v": 1, "frame_id": 2, "camera_id": "cam1"}).encode(), b"x")  # a bad_frame
        decisions = client.decisions(2)
        samples = scrape(f"http://{server.endpoints['http']}/metrics")
    assert [(d["reason"], d["version"], d["v"]) for d in decisions] == [("ok", version, 1), ("bad_frame", version, 1)]
    starting = [e for e in logs if e["event"] == "starting"]
    assert len(starting) == 1 and starting[0]["version"] == version
    build = [dict(labels) for (name, labels), value in samples.items() if name == "inspectd_build_info" and value == 1]
    assert len(build) == 1 and build[0]["version"] == version and build[0]["python"] == sys.version.split()[0]
