"""The wheel and sdist as a user gets them: every module and data file of the source folders is in
the wheel (built from the sdist), nothing else is, and the extras hold what each install needs.

An editable install hides packaging errors (a wheel once lacked ``edgeopt/agent/update/`` while
every other test passed); these tests read the built files. Installing the wheel and running the
device path from it: tests/device/.
"""

from __future__ import annotations

import re
import tarfile
from email.parser import Parser

import pytest
from packaging.requirements import Requirement

from dist_build import ROOT, build_dists, source_files, wheel_files, wheel_metadata


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    return build_dists(tmp_path_factory.mktemp("dist"))


def requirements(metadata: str) -> dict[str, set[str]]:
    """extra ("" for the base install) → the distribution names it requires."""
    out: dict[str, set[str]] = {}
    for line in Parser().parsestr(metadata).get_all("Requires-Dist") or []:
        req = Requirement(line)
        extra = ""
        if req.marker is not None:
            extra = re.search(r'extra == "([^"]+)"', str(req.marker)).group(1)
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        out.setdefault(extra, set()).add(req.name.lower().replace("_", "-") + extras)
    return out


def resolve(reqs: dict[str, set[str]], extra: str) -> set[str]:
    """The names ``pip install 'edgeopt[EXTRA]'`` asks for directly, self-references expanded."""
    names = set(reqs[""])
    todo, seen = [extra], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for name in reqs.get(current, ()):
            if name.startswith("edgeopt["):
                todo += name[len("edgeopt["):-1].split(",")
            else:
                names.add(name)
    return names


def test_the_wheel_holds_every_module_and_data_file_and_nothing_else(dists):
    wheel = dists.wheel
    expected, shipped = set(source_files().values()), wheel_files(wheel)
    assert "edgeopt/agent/update/updater.py" in expected  # the folder the hand-kept list forgot
    assert not expected - shipped, f"missing from the wheel: {sorted(expected - shipped)}"
    assert not shipped - expected, f"in the wheel but not in the source folders: {sorted(shipped - expected)}"
    assert {p.split("/")[0] for p in shipped} == {"edgeopt"}  # no generic top-level names (agent, sdk...)


def discovered_packages(tree) -> list[str]:
    """The packages setup.py finds in ``tree`` (setup() itself replaced by a recorder)."""
    import subprocess
    import sys

    code = ("import sys, setuptools; seen = {}\n"
            "setuptools.setup = lambda **kw: seen.update(kw)\n"
            "exec(open('setup.py').read(), {'__file__': 'setup.py', '__name__': '__main__'})\n"
            "print(','.join(seen['packages']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tree, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(",")


def test_a_new_subpackage_needs_no_edit(tmp_path):
    """Discovery, not a list: folders added under sdk/ and agent/ (with or without __init__.py) are packages."""
    import shutil

    shutil.copy(ROOT / "setup.py", tmp_path)
    for module in ("sdk/__init__.py", "sdk/protocol/__init__.py", "sdk/protocol/messages.py", "agent/__init__.py",
                   "agent/update/deep/fetch.py", "converters/__init__.py", "fleet/__init__.py", "hardware/__init__.py"):
        (tmp_path / module).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / module).write_text("")
    (tmp_path / "sdk/protocol/__pycache__").mkdir()
    (tmp_path / "sdk/protocol/__pycache__/messages.py").write_text("")
    packages = discovered_packages(tmp_path)
    assert {"edgeopt.protocol", "edgeopt.agent.update.deep"} <= set(packages), packages
    assert not [p for p in packages if "pycache" in p]


def test_the_sdist_holds_the_sources_and_the_build_config(dists):
    sdist = dists.sdist
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    expected = set(source_files())
    assert not expected - names, f"missing from the sdist: {sorted(expected - names)}"
    assert {"setup.py", "pyproject.toml", "README.md"} <= names


def test_the_build_prints_no_setuptools_warning(dists):
    log = dists.log
    for warning in ("is deprecated", "Package would be ignored", "absent from the `packages` configuration"):
        assert warning not in log, warning


def test_base_dependencies_are_what_every_part_imports(dists):
    reqs = requirements(wheel_metadata(dists.wheel))
    assert reqs[""] == {"numpy", "click", "rich"}


def test_the_agent_extra_holds_signed_updates_and_no_converter(dists):
    reqs = requirements(wheel_metadata(dists.wheel))
    agent = resolve(reqs, "agent")
    # MQTT, python-tuf, cryptography to verify Ed25519 signatures fast, ONNX Runtime for the default format
    assert {"paho-mqtt", "tuf", "securesystemslib[crypto]", "onnxruntime"} <= agent, agent
    assert not agent & {"onnx", "onnxslim", "onnx-ir", "torch", "apache-tvm", "coremltools", "ai-edge-litert"}, agent
    assert resolve(reqs, "litert") - reqs[""] == {"ai-edge-litert"}  # device-only LiteRT: the interpreter alone


def test_every_target_extra_includes_the_converter_and_all_includes_every_extra(dists):
    reqs = requirements(wheel_metadata(dists.wheel))
    convert = resolve(reqs, "convert")
    assert {"onnx", "onnxruntime", "onnxslim", "onnx-ir"} <= convert
    for extra in ("tflite", "coreml", "tvm", "train"):
        assert convert <= resolve(reqs, extra), extra
    assert {"ai-edge-litert", "flatbuffers", "litert-quantizer"} <= resolve(reqs, "tflite")
    every = set().union(*(resolve(reqs, e) for e in reqs if e))
    assert resolve(reqs, "all") == every
