"""A full disk is one line, found before a checkpoint is started, and the checkpoints already
written stay intact: the run resumes from them once there is space. Read as a specification of
``kfor1.files.atomic.check_free_space`` and its use in ``kfor1.trainer.checkpoint``."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import jax.numpy as jnp
import pytest

from kfor1.files import atomic as files
from kfor1.files.atomic import DiskFullError, check_free_space, is_disk_full
from kfor1.trainer.checkpoint import SENTINEL, Checkpointer

REPO = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, "-m", "launch.train", "--config",
         "configs/transfer.py:dataset=digits,resolution=32", "--config.num_steps=6",
         "--config.checkpoint_every=2", "--config.log_every=2", "--config.batch_size=8",
         "--config.eval_batch_size=48", "--config.progress=false"]


def _state(n: int):
    return types.SimpleNamespace(step=jnp.int32(2), params={"w": jnp.zeros((n,))},
                                 batch_stats={}, opt_state={})


def test_is_disk_full_knows_oserrors_and_tensorstores_text():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(ValueError("RESOURCE_EXHAUSTED: ... No space left on device [28]"))
    assert not is_disk_full(OSError(errno.EIO, "Input/output error"))


def test_a_checkpoint_that_does_not_fit_is_refused_before_writing(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path / "checkpoints")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(files.shutil, "disk_usage",
                        lambda p: usage._replace(free=3 * 2**20))
    try:
        with pytest.raises(DiskFullError, match=r"checkpoint of step 2 needs about 3\.8 MB .* "
                                                r"3\.0 MB free; free space"):
            ckpt.save(_state(1_000_000))  # 4 MB of float32.
        assert os.listdir(tmp_path / "checkpoints") == [SENTINEL]  # Nothing half-written.
        ckpt.save(_state(1000))  # 4 kB fits.
        ckpt.wait()
        assert ckpt.latest_step() == 2
    finally:
        ckpt.close()


def test_check_free_space_looks_at_the_disk_of_a_directory_not_made_yet(tmp_path):
    check_free_space(str(tmp_path / "not" / "yet"), 1, "a file", "fix")  # No error.
    with pytest.raises(DiskFullError, match="a file needs about"):
        check_free_space(str(tmp_path / "not" / "yet"), 2**62, "a file", "fix")


@pytest.fixture()
def small_disk(tmp_path):
    """A 24 MB tmpfs: room for one checkpoint of the run below (13.5 MB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root (the disk-full path is also tested "
                    "above with a patched disk_usage)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_space(small_disk):
    workdir = small_disk / "run"
    done = subprocess.run([*TRAIN, "--workdir", str(workdir)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert done.stderr.startswith("error: disk full: the checkpoint of step 4 needs about")
    assert "the run resumes from step 2" in done.stderr
    assert sorted(os.listdir(workdir / "checkpoints")) == [SENTINEL, "2"]

    # The checkpoint written before the disk filled is whole: the run resumes from it (a rerun
    # that then trains to the end is what tests/test_train.py's resume tests do).
    from kfor1.trainer.workdir import restore

    _, state = restore(workdir)
    assert int(state.step) == 2
