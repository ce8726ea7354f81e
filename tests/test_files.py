"""``kfor1.files.atomic``: a run's files are written whole or not at all, with the umask's mode."""

from __future__ import annotations

import os

import pytest

from kfor1.files.atomic import atomic_write


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.json"
    atomic_write(path, "old")

    class Boom:
        def __len__(self):
            raise RuntimeError("disk full")

    with pytest.raises(TypeError):
        atomic_write(path, Boom())
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_atomic_write_gives_files_the_umasks_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", "{}")
        os.umask(0o077)
        atomic_write(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600
