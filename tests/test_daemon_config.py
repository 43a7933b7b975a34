"""Configuration: defaults, TOML, environment and CLI layered into one validated frozen object."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from daemon.config import Config, ConfigError, load


def test_layers_override_in_order(tmp_path: Path) -> None:
    """TOML beats defaults, the environment beats TOML and command-line options beat everything."""
    toml = tmp_path / "inspectd.toml"
    toml.write_text('model = "bundle"\ncycle_ms = 150\n[frames]\nendpoint = "tcp://*:9000"\nmode = "sub"\n')
    env = {"INSPECTD_CYCLE_MS": "120", "INSPECTD_QUEUE_DEPTH": "6", "UNRELATED": "x"}
    cfg = load(toml, environ=env, overrides={"queue_depth": 3, "backend": None})
    assert cfg.model == str((tmp_path / "bundle").resolve())
    assert (cfg.cycle_ms, cfg.queue_depth, cfg.frames_mode) == (120.0, 3, "sub")
    assert cfg.frames_endpoint == "tcp://*:9000" and cfg.backend == "auto"
    assert cfg.cycle_ns == 120_000_000
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.cycle_ms = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "env", "needle"),
    [
        ('model = "m"\ncycle = 3\n', {}, "unknown key 'cycle'"),
        ('model = "m"\ncycle_ms = "fast"\n', {}, "cycle_ms must be float"),
        ('model = "m"\nbackend = "cuda"\n', {}, "backend: expected one of auto, onnxruntime, tensorrt"),
        ('model = "m"\n', {"INSPECTD_QUEUE_DEPTH": "0"}, "queue_depth: must be between 1"),
        ('model = "m"\n', {"INSPECTD_WORKERS": "2.5"}, "INSPECTD_WORKERS: workers must be int"),
        ('model = "m"\ndecisions_endpoint = "7701"\n', {}, "decisions_endpoint: expected a ZeroMQ endpoint"),
        ('model = "m"\nhttp_listen = "localhost"\n', {}, "http_listen: expected HOST:PORT"),
        ("cycle_ms = 100\n", {}, "model: no model bundle given"),
        ("model = [\n", {}, "not valid TOML"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(tmp_path: Path, text: str, env: dict, needle: str) -> None:
    """Every invalid setting stops the start with one line naming the key and what was expected."""
    toml = tmp_path / "c.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(toml, environ=env)
    assert needle in str(info.value)


def test_missing_file_is_named() -> None:
    """A config path that does not exist is reported with its name."""
    with pytest.raises(ConfigError, match=r"nowhere\.toml: cannot read"):
        load("nowhere.toml", environ={})


def test_defaults_are_valid_once_a_model_is_given() -> None:
    """The built-in defaults pass validation."""
    assert Config(model="m").validate().frames_mode == "pull"
