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


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    import os

    old = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(old)


@pytest.mark.parametrize("mask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640),
                                                      (0o077, 0o700, 0o600)], ids=["022", "027", "077"])
def test_outputs_honour_the_umask(tmp_path, umask, mask, dir_mode, file_mode):
    import stat

    from edgeopt.fsutil import atomic_write_bytes, copy_tree, make_temp_dir

    umask(mask)
    with staged_directory(tmp_path / "art") as stage:
        atomic_write_json(stage / "manifest.json", {"a": 1})
        (stage / "sub").mkdir()
    assert stat.S_IMODE((tmp_path / "art").stat().st_mode) == dir_mode  # not mkdtemp's 0700
    assert stat.S_IMODE((tmp_path / "art" / "manifest.json").stat().st_mode) == file_mode  # not mkstemp's 0600
    source = tmp_path / "private"
    source.mkdir(mode=0o700)
    (source / "model.onnx").write_bytes(b"x")
    (source / "model.onnx").chmod(0o600)
    copy = make_temp_dir(tmp_path, ".copy.", ".partial")
    copy_tree(source, copy)  # the copy's modes come from the umask, not from a 0700 source
    assert stat.S_IMODE(copy.stat().st_mode) == dir_mode
    assert stat.S_IMODE((copy / "model.onnx").stat().st_mode) == file_mode
    atomic_write_bytes(tmp_path / "secret", b"pw", mode=0o600)  # an explicit mode is kept as asked
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600


def test_atomic_write_can_give_the_file_to_another_owner(tmp_path):
    import os

    from edgeopt.fsutil import atomic_write_bytes

    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    atomic_write_bytes(tmp_path / "active", b"a\n", owner=(65534, 65534))
    st = (tmp_path / "active").stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534) and [p.name for p in tmp_path.iterdir()] == ["active"]
