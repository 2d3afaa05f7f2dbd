"""The signed repository on disk: keys, publish, revoke, root rotation, request-path safety."""

from __future__ import annotations

import json
import stat

import pytest

from edgeopt.artifact import (
    GOLDEN,
    REPORT,
    TamperedArtifact,
    file_hashes,
    pack_artifact,
    report_failures,
    unpack_artifact,
)
from edgeopt.errors import UserInputError
from edgeopt.fleet.repository import Repository, parse_expiry

from conftest import run_cli
from repo_helpers import fake_artifact


@pytest.fixture
def repo(tmp_path):
    return Repository.init(tmp_path / "repo", root_keys=3, root_threshold=2)


def test_init_writes_0600_keys_and_a_threshold_root(repo):
    keys = sorted(p.name for p in repo.keys_dir.iterdir())
    assert keys == ["root-1.pem", "root-2.pem", "root-3.pem", "snapshot.pem", "targets.pem", "timestamp.pem"]
    for p in repo.keys_dir.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    root = repo.root_metadata().signed
    assert root.roles["root"].threshold == 2 and len(root.roles["root"].keyids) == 3
    assert root.consistent_snapshot is True
    with pytest.raises(UserInputError, match="already holds a repository"):
        Repository.init(repo.root)
    with pytest.raises(UserInputError, match="threshold 3 must be between 1 and the number of root keys"):
        Repository.init(repo.root.parent / "other", root_keys=2, root_threshold=3)


def test_publish_lists_the_model_with_custom_fields_and_versions_are_immutable(repo, tmp_path):
    art = fake_artifact(tmp_path / "a")
    entry = repo.publish(art, "kws", "1")
    assert entry["target"] == "kws-1.tar" and entry["format"] == "onnx" and entry["version"] == "1"
    stored = repo.targets_dir / f"{entry['sha256']}.kws-1.tar"
    assert stored.stat().st_size == entry["length"]
    assert [m["target"] for m in repo.list_models()] == ["kws-1.tar"]
    ts, snap, targets = repo.current()
    assert (ts.signed.version, snap.signed.version, targets.signed.version) == (2, 2, 2)
    with pytest.raises(UserInputError, match="already published; versions are immutable"):
        repo.publish(art, "kws", "1")
    repo.revoke("kws", "1")
    assert repo.list_models() == []
    with pytest.raises(UserInputError, match="not in the repository"):
        repo.revoke("kws", "1")


def test_publish_refuses_tampered_artifacts_and_bad_names(repo, tmp_path):
    art = fake_artifact(tmp_path / "a")
    (art / "model.onnx").write_bytes(b"changed")
    with pytest.raises(TamperedArtifact, match="model.onnx"):
        repo.publish(art)
    good = fake_artifact(tmp_path / "b")
    for name, version in (("../evil", "1"), ("kws", "1/2"), ("a..b", "1"), ("", "1")):
        with pytest.raises(UserInputError, match="invalid model"):
            repo.publish(good, name, version)


def test_publish_refuses_an_artifact_whose_manifest_names_another_model_or_version(repo, tmp_path):
    art = fake_artifact(tmp_path / "a", "imu", "2")
    for name, version in (("imu", "3"), ("kws", "2"), ("kws", "3"), (None, "3"), ("kws", None)):
        with pytest.raises(UserInputError) as exc:
            repo.publish(art, name, version)
        asked = f"{name or 'imu'}@{version or '2'}"
        assert f"the manifest says imu@2, not {asked}" in str(exc.value) and "\n" not in str(exc.value)
    assert repo.list_models() == []
    res = run_cli("fleet", "publish", art, "--repo", repo.root, "--name", "imu", "--version", "3")
    assert res.code == 2 and res.err.strip().count("\n") == 0 and "Traceback" not in res.err, res.err
    assert "the manifest says imu@2, not imu@3" in res.err and str(art) in res.err
    assert repo.publish(art, "imu", "2")["target"] == "imu-2.tar"
    assert repo.publish(fake_artifact(tmp_path / "b", "imu", "4"))["target"] == "imu-4.tar"  # the manifest's


def _failed(art, report: dict):
    (art / REPORT).write_text(json.dumps(report))
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"] = file_hashes(art, ["model.onnx", GOLDEN, REPORT])
    (art / "manifest.json").write_text(json.dumps(manifest))
    return art


def test_report_failures():
    assert report_failures({}) == [] and report_failures({"status": "ok", "failures": []}) == []
    assert report_failures({"status": "failed", "failures": ["fit: 3 MiB over"]}) == ["fit: 3 MiB over"]
    assert report_failures({"status": "failed"}) == ["status: failed"]
    assert report_failures({"fit": {"ok": False, "profile": "esp32"}}) == ["does not fit profile esp32"]
    assert report_failures({"fit": {"ok": True}, "status": "ok"}) == []
    assert report_failures([]) == ["report.json is not a JSON object"]


def test_publish_refuses_a_failed_conversion_unless_allowed_and_signs_that_it_was(repo, tmp_path):
    failure = "accuracy drop 4.20 (top1) exceeds --max-accuracy-drop 1.0"
    art = _failed(fake_artifact(tmp_path / "a"), {"status": "failed", "failures": [failure]})
    with pytest.raises(UserInputError, match="report.json: the conversion failed its checks .*--allow-failed"):
        repo.publish(art)
    res = run_cli("fleet", "publish", art, "--repo", repo.root)
    assert res.code == 2 and failure in res.err and "--allow-failed" in res.err and repo.list_models() == []
    res = run_cli("fleet", "publish", art, "--repo", repo.root, "--allow-failed", "--json")
    assert res.code == 0, res.err
    custom = repo.current()[2].signed.targets["kws-1.tar"].custom  # the signed targets metadata
    assert custom["allow_failed"] is True and custom["failed_checks"] == [failure]
    assert res.json()["failed_checks"] == [failure]
    passed = repo.publish(fake_artifact(tmp_path / "b", "kws", "2"))
    assert "allow_failed" not in passed and "failed_checks" not in passed


def test_packing_is_deterministic_and_unpacking_verifies(tmp_path):
    art = fake_artifact(tmp_path / "a")
    pack_artifact(art, tmp_path / "1.tar")
    (art / "model.onnx").touch()  # a new mtime must not change the bytes
    pack_artifact(art, tmp_path / "2.tar")
    assert (tmp_path / "1.tar").read_bytes() == (tmp_path / "2.tar").read_bytes()
    unpacked = unpack_artifact(tmp_path / "1.tar", tmp_path / "out")
    assert unpacked.manifest["name"] == "kws"


def test_unpack_refuses_path_traversal_and_links(tmp_path):
    import io
    import tarfile

    for kind in ("traversal", "symlink"):
        bad = tmp_path / f"{kind}.tar"
        with tarfile.open(bad, "w") as tar:
            info = tarfile.TarInfo("../../escape.txt" if kind == "traversal" else "link")
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = 3
                tar.addfile(info, io.BytesIO(b"bad"))
        with pytest.raises(TamperedArtifact):
            unpack_artifact(bad, tmp_path / f"out-{kind}")
        assert not (tmp_path.parent / "escape.txt").exists()


@pytest.fixture
def tarfile_of_python_3_11_2(monkeypatch):
    """tarfile as Debian bookworm's Python 3.11.2 (Raspberry Pi OS) has it: no extraction filters
    (they came in 3.11.4), so extractall() takes no ``filter`` argument and trusts the archive."""
    import tarfile

    original = tarfile.TarFile.extractall

    def extractall(self, path=".", members=None, *, numeric_owner=False, **unexpected):
        if unexpected:
            raise TypeError(f"TarFile.extractall() got an unexpected keyword argument {next(iter(unexpected))!r}")
        return original(self, path, members, numeric_owner=numeric_owner, filter="fully_trusted")

    monkeypatch.delattr(tarfile, "data_filter")
    monkeypatch.setattr(tarfile.TarFile, "extractall", extractall)


def test_unpacking_on_a_python_without_tar_filters_works_and_stays_safe(tmp_path, tarfile_of_python_3_11_2):
    """Found by the emulated board (tests/device/): every update failed at STAGED with a TypeError there."""
    import io
    import stat
    import tarfile

    art = fake_artifact(tmp_path / "a")
    (art / "model.onnx").chmod(0o4777)
    pack_artifact(art, tmp_path / "1.tar")
    unpacked = unpack_artifact(tmp_path / "1.tar", tmp_path / "out")
    assert unpacked.manifest["name"] == "kws"
    assert stat.S_IMODE((tmp_path / "out" / "model.onnx").stat().st_mode) & 0o7022 == 0
    for name in ("../../escape.txt", "/tmp/escape.txt"):
        bad = tmp_path / "bad.tar"
        with tarfile.open(bad, "w") as tar:
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
        with pytest.raises(TamperedArtifact, match="not a relative path"):
            unpack_artifact(bad, tmp_path / "out-bad")
        assert not (tmp_path.parent / "escape.txt").exists()


def test_request_paths_cannot_escape_the_repository(repo):
    assert repo.file_for("metadata/timestamp.json") is not None
    for evil in ("metadata/../keys/root-1.pem", "keys/root-1.pem", "targets/../../etc/passwd", "/etc/passwd",
                 "metadata/", "metadata/a/b.json", "targets/..", 42):
        assert repo.file_for(evil) is None


def test_root_rotation_is_signed_by_old_and_new_thresholds(repo):
    v = repo.rotate_root(new_root_keys=2, threshold=2)
    assert v == 2
    new = json.loads((repo.metadata_dir / "2.root.json").read_text())
    old_root = repo._load("1.root.json").signed
    new_root = repo._load("2.root.json")
    assert len(new["signatures"]) == 3 + 2  # every old key that was available, and both new ones
    old_root.verify_delegate("root", new_root.signed_bytes, new_root.signatures)  # old threshold
    new_root.signed.verify_delegate("root", new_root.signed_bytes, new_root.signatures)  # new threshold


def test_parse_expiry():
    e = parse_expiry("targets=30d,timestamp=6h")
    assert e["targets"].days == 30 and e["timestamp"].seconds == 6 * 3600 and e["root"].days == 365
    with pytest.raises(UserInputError):
        parse_expiry("timestamp=soon")


def test_cli_keys_publish_models_revoke(tmp_path):
    repo = tmp_path / "repo"
    res = run_cli("keys", "init", repo, "--root-keys", "2", "--root-threshold", "2", "--expiry", "timestamp=6h")
    assert res.code == 0, res.err
    assert run_cli("keys", "init", repo).code == 2
    art = fake_artifact(tmp_path / "a", "kws", "7")
    res = run_cli("fleet", "publish", art, "--repo", repo, "--json")
    assert res.code == 0, res.err
    assert res.json()["version"] == "7"
    assert [m["version"] for m in run_cli("fleet", "models", "--repo", repo, "--json").json()] == ["7"]
    assert run_cli("fleet", "revoke", "kws@7", "--repo", repo).code == 0
    assert run_cli("fleet", "models", "--repo", repo, "--json").json() == []
    res = run_cli("fleet", "revoke", "kws-7", "--repo", repo)
    assert res.code == 2 and "NAME@VERSION" in res.err
    res = run_cli("fleet", "publish", art, "--repo", tmp_path / "nope")
    assert res.code == 2 and "not an edgeopt repository" in res.err
    assert json.loads(run_cli("keys", "rotate-root", repo, "--root-keys", "1").out)["root_version"] == 2


def test_key_with_loose_permissions_is_refused(tmp_path):
    from edgeopt.errors import EnvironmentFault

    repo = Repository.init(tmp_path / "repo")
    (repo.keys_dir / "targets.pem").chmod(0o644)
    with pytest.raises(EnvironmentFault, match="chmod 600"):
        repo.publish(fake_artifact(tmp_path / "a"))
