"""One run at a time in a workdir: a second run is refused with the holder's PID and host, and
the lock of a run killed with ``kill -9`` is taken over. Read as a specification of
``kfor1.trainer.workdir.locked``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kfor1.trainer import cli
from kfor1.trainer.workdir import WorkdirBusyError, locked

REPO = Path(__file__).resolve().parents[1]

HOLD = """
import sys, time
from kfor1.trainer.workdir import locked
with locked(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture()
def holder(tmp_path):
    """A live process that holds the lock of ``tmp_path / 'run'``."""
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield workdir, proc
    proc.kill()
    proc.wait()


def test_a_second_run_into_a_busy_workdir_is_refused_with_the_holders_pid(holder, capsys):
    workdir, proc = holder
    code = cli.main(["train", "--config", "configs/transfer.py:dataset=digits,resolution=32",
                     "--workdir", str(workdir), "--config.batch_size=8",
                     "--config.eval_batch_size=48"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert f"pid {proc.pid} on host {os.uname().nodename}" in err and "in use" in err
    assert sorted(p.name for p in workdir.iterdir()) == ["lock"]  # Nothing else was written.


def test_the_lock_of_a_killed_run_is_taken_over(holder, capsys):
    workdir, proc = holder
    with pytest.raises(WorkdirBusyError), locked(workdir):
        pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with locked(workdir):
        info = json.loads((workdir / "lock").read_text())
        assert info["pid"] == os.getpid()
    assert f"locked by a run that is gone (pid {proc.pid}" in capsys.readouterr().err
    assert (workdir / "lock").read_text() == ""  # Released cleanly: nothing to take over.
    with locked(workdir):
        pass
    assert "gone" not in capsys.readouterr().err


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), locked(tmp_path):
        raise RuntimeError("boom")
    with locked(tmp_path):
        pass
