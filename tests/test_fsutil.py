from __future__ import annotations

import pytest

from edgeopt.errors import UserInputError
from edgeopt.fsutil import atomic_write_json, staged_directory


def test_staged_directory_appears_only_when_complete(tmp_path):
    dest = tmp_path / "art"
    with staged_directory(dest) as stage:
        (stage / "a.txt").write_text("1")
        assert not dest.exists()
    assert (dest / "a.txt").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_staged_directory_removed_on_error_and_old_version_kept(tmp_path):
    dest = tmp_path / "art"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_directory(dest, force=True) as stage:
        (stage / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert [p.name for p in dest.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_force_replaces_and_refusal_without_it(tmp_path):
    dest = tmp_path / "art"
    dest.mkdir()
    with pytest.raises(UserInputError, match="already exists"), staged_directory(dest):
        pass
    with staged_directory(dest, force=True) as stage:
        (stage / "new.txt").write_text("new")
    assert [p.name for p in dest.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_output_parent_must_exist(tmp_path):
    with pytest.raises(UserInputError, match="parent directory"), staged_directory(tmp_path / "missing" / "art"):
        pass


def test_atomic_write_json_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    atomic_write_json(tmp_path / "x.json", {"a": 2})
    assert (tmp_path / "x.json").read_text().strip().endswith("}")
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
