"""`edgeopt agent install-service` and `install-model` as an operator runs them: a config that is
valid TOML line by line, absolute paths, missing folders created; a model the agent cannot window is
refused before it is installed, and a replaying agent never waits for ever on one."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib

import pytest

from edgeopt.agent.config import SECTIONS, default_config_text, default_value, load_config, parse_config
from edgeopt.agent.statedir import StateDir

from agent_harness import AgentProcess, base_config
from conftest import run_cli


def _uncommented(text: str) -> str:
    """Every '# key = value  # doc' line of the default config turned into 'key = value'."""
    return re.sub(r"^# (\w+ = .*?)  # .*$", r"\1", text, flags=re.M)


def test_every_commented_default_is_valid_toml_giving_that_default():
    text = default_config_text("pi-7", "broker.local")
    assert "_MISSING_TYPE" not in text and "object at 0x" not in text
    config = parse_config(tomllib.loads(_uncommented(text)))
    for cls in SECTIONS:
        section = getattr(config, cls.section)
        for f in dataclasses.fields(cls):
            if (cls.section, f.name) not in (("agent", "device_id"), ("mqtt", "host")):
                assert getattr(section, f.name) == default_value(f), (cls.section, f.name)
    assert config.device_id == "pi-7" and config.mqtt.host == "broker.local"


def test_given_values_are_quoted_as_toml():
    text = default_config_text("pi-7", 'broker"x')
    assert tomllib.loads(text)["mqtt"]["host"] == 'broker"x'


@pytest.fixture
def umask_077():
    old = os.umask(0o077)
    yield
    os.umask(old)


def test_install_service_creates_missing_folders_and_writes_absolute_paths(tmp_path, monkeypatch, umask_077):
    monkeypatch.chdir(tmp_path)
    res = run_cli("agent", "install-service", "--unit-dir", "etc/systemd/system", "--config",
                  "etc/edgeopt/agent.toml", "--device-id", "pi-7")
    assert res.code == 0, res.err
    for folder in ("etc", "etc/systemd", "etc/systemd/system", "etc/edgeopt"):
        assert (tmp_path / folder).stat().st_mode & 0o777 == 0o755, folder
    unit = (tmp_path / "etc/systemd/system/edgeopt-agent.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    exe, flag, config = exec_start.removeprefix("ExecStart=").split()
    assert os.path.isabs(exe) and flag == "--config" and config == str(tmp_path / "etc/edgeopt/agent.toml")
    assert (tmp_path / "etc/edgeopt/agent.toml").stat().st_mode & 0o777 == 0o644
    assert load_config(config).device_id == "pi-7"


def test_install_service_refuses_what_the_service_could_not_use_and_writes_nothing(tmp_path):
    config = tmp_path / "etc" / "agent.toml"
    config.parent.mkdir()
    config.write_text('[mqtt]\nhost = "b"\nusername = "u"\npassword_file = "mqtt.password"\n')
    res = run_cli("agent", "install-service", "--unit-dir", tmp_path / "units", "--config", config)
    assert res.code == 2 and "password_file 'mqtt.password' is a relative path" in res.err
    res = run_cli("agent", "install-service", "--unit-dir", tmp_path / "units", "--config",
                  tmp_path / "new" / "agent.toml", "--device-id", "pi 7")
    assert res.code == 2 and "device_id 'pi 7'" in res.err
    assert not (tmp_path / "units").exists() and not (tmp_path / "new").exists()


@pytest.fixture(scope="module")
def image_artifact(digits_models, tmp_path_factory):
    """The digits CNN: an image model ([N, 1, 8, 8]) with no preprocessing."""
    out = tmp_path_factory.mktemp("image") / "digits"
    assert run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx", "-q").code == 0
    return out


def test_install_model_refuses_a_model_the_agent_cannot_window(image_artifact, tmp_path):
    res = run_cli("agent", "install-model", image_artifact, "--state-dir", tmp_path / "state")
    assert res.code == 2
    assert res.err.strip().splitlines() == [
        f"edgeopt: error: {image_artifact}: the agent cannot window this model: one sample of input 'image' "
        f"[batch, 1, 8, 8] is [1, 8, 8], not a sensor window ([C, T], [T, C] or [T] samples of a stream) and its "
        f"manifest has no preprocessing (convert a sensor model with --preprocessing FILE.json)"]
    assert not (tmp_path / "state").exists()


def test_install_model_checks_the_window_the_config_overrides(imu_model, tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nstate_dir = "{tmp_path / "state"}"\n[preprocessing]\nwindow = 50\n'
                      '[[source]]\ntype = "stdin"\n')
    res = run_cli("agent", "install-model", imu_model["artifact"], "--config", config)
    assert res.code == 2 and "window 50 does not match the model input's 64 samples" in res.err
    config.write_text(config.read_text().replace("window = 50", "window = 64"))
    assert run_cli("agent", "install-model", imu_model["artifact"], "--config", config).code == 0


def test_a_replaying_agent_ends_instead_of_waiting_on_a_model_it_cannot_feed(image_artifact, tmp_path):
    StateDir(tmp_path / "state").install(image_artifact)  # as an older install-model let it in
    (tmp_path / "stream.csv").write_text("ax,ay,az\n" + "0.1,0.2,0.3\n" * 200)
    cfg = base_config(tmp_path, agent={"exit_when_sources_end": True},
                      source=[{"type": "csv", "path": str(tmp_path / "stream.csv"), "replay": "fast"}],
                      sink=[{"type": "jsonl", "path": str(tmp_path / "out.jsonl")}])
    agent = AgentProcess(tmp_path, cfg)
    assert agent.communicate(timeout=30) == 1, agent.err
    assert "the agent cannot window this model" in agent.err and "no update can bring another model" in agent.err
    assert agent.status()["state"]["status"] == "stopped"


def test_a_replaying_agent_with_no_model_ends_too(tmp_path):
    cfg = base_config(tmp_path, agent={"exit_when_sources_end": True}, source=[{"type": "stdin"}])
    agent = AgentProcess(tmp_path, cfg)
    assert agent.communicate(timeout=30) == 1, agent.err
    assert "has no active slot" in agent.err


def test_install_service_force_names_the_credential_of_the_config_it_writes(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(f'[mqtt]\nhost = "b"\nusername = "u"\npassword_file = "{tmp_path / "pw"}"\n'
                      '[[source]]\ntype = "stdin"\n')
    assert run_cli("agent", "install-service", "--unit-dir", tmp_path, "--config", config).code == 0
    assert "LoadCredential=" in (tmp_path / "edgeopt-agent.service").read_text()  # the config is kept
    assert run_cli("agent", "install-service", "--unit-dir", tmp_path, "--config", config, "--force").code == 0
    assert "LoadCredential=" not in (tmp_path / "edgeopt-agent.service").read_text()  # replaced: no password
    assert "password_file" not in tomllib.loads(config.read_text()).get("mqtt", {})
