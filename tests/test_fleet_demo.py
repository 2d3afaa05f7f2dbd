"""The demo's broken version (examples/fleet_demo.py) fails for its behaviour: a consistent imu@3
(manifest, hashes and report all in order) that publishes as imu@3 and that the agent's own
self-test refuses on its golden vectors — not a relabelled copy a device refuses for its version."""

from __future__ import annotations

import json

import pytest

from edgeopt.artifact import open_artifact
from edgeopt.fleet.repository import Repository
from edgeopt.golden_vectors import check_artifact

pytestmark = pytest.mark.slow


def test_the_demo_s_broken_v3_is_consistent_and_fails_its_golden_vectors(imu_model, tmp_path):
    import fleet_demo

    source = imu_model["model"].parent  # examples/imu.py's output: imu_cnn.onnx, preprocessing.json, validation.npz
    v3 = fleet_demo.build_broken_v3(source, tmp_path / "broken-v3")
    artifact = open_artifact(v3)
    artifact.verify()  # every sha256 right
    assert (artifact.manifest["name"], artifact.manifest["version"]) == (fleet_demo.NAME, "3")
    assert artifact.failed_checks() == []
    report = json.loads((v3 / "report.json").read_text())
    assert report["status"] == "ok"
    entry = Repository.init(tmp_path / "repo").publish(v3, fleet_demo.NAME, "3")  # as the demo publishes it
    assert entry["target"] == f"{fleet_demo.NAME}-3.tar" and "allow_failed" not in entry
    verdict = check_artifact(v3)  # the SELF_TEST a real agent runs
    assert not verdict.ok and verdict.reason.startswith("golden vectors: output"), verdict.reason
