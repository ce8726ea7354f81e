"""Checkpoints are verified when restored: flipped bytes or a truncated file never restore
silently; the latest falls back to the previous (with a warning) and the run still ends exactly
where an uninterrupted one does; a step asked for by number is refused by name; a frozen
backbone that differs from the base is refused. And a resume leaves no duplicate steps in
TensorBoard's event files. Read as a specification of ``kfor1.trainer.checkpoint``."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow as tf
from tiny_runs import metrics, run_config

from kfor1.trainer import cli
from kfor1.trainer.checkpoint import CheckpointCorruptError, Checkpointer
from kfor1.trainer.loop import train
from kfor1.trainer.workdir import restore
from kfor1.tree import flatten, unflatten


def _largest_chunk(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip(path: Path, offset: int = 1000, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def stopped_run(colours, tmp_path_factory):
    """``run_config`` stopped at step 4 (checkpoints at 2 and 4)."""
    workdir = tmp_path_factory.mktemp("stopped")
    train(run_config(colours), str(workdir), stop_at_step=4)
    return workdir


@pytest.fixture(scope="module")
def resumed_past_a_flipped_checkpoint(stopped_run, colours, tmp_path_factory):
    """The stopped run with 64 flipped bytes in its latest checkpoint, resumed to the end;
    ``(workdir, stderr)``."""
    import contextlib
    import io

    workdir = tmp_path_factory.mktemp("flipped") / "run"
    shutil.copytree(stopped_run, workdir)
    _flip(_largest_chunk(workdir / "checkpoints" / "4"))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        train(run_config(colours), str(workdir))
    return workdir, err.getvalue()


def test_flipped_bytes_in_the_latest_checkpoint_fall_back_to_the_previous_with_a_warning(
        resumed_past_a_flipped_checkpoint, trained_run):
    workdir, err = resumed_past_a_flipped_checkpoint
    assert "the checkpoint at step 4" in err and "is corrupt" in err
    assert "using the checkpoint at step 2 instead" in err
    corrupt = list((workdir / "checkpoints.corrupt").iterdir())
    assert [p.name.split("-")[0] for p in corrupt] == ["4"]  # Moved aside, not deleted.
    # Resumed from step 2, the run ends exactly where the uninterrupted one did.
    assert metrics(workdir) == metrics(trained_run[0])


def test_a_resume_leaves_no_duplicate_steps_in_tensorboard_events(
        resumed_past_a_flipped_checkpoint):
    workdir, _ = resumed_past_a_flipped_checkpoint
    steps = Counter()
    for events in workdir.glob("events.out.tfevents.*"):
        for record in tf.data.TFRecordDataset(str(events)).as_numpy_iterator():
            event = tf.compat.v1.Event.FromString(record)
            for value in event.summary.value:
                steps[(value.tag, event.step)] += 1
    assert steps, "no scalars were written"
    assert max(steps.values()) == 1, [k for k, n in steps.items() if n > 1][:5]
    assert {s for (tag, s) in steps if tag.startswith("train/loss")} == {2, 4, 6}


def test_eval_of_a_truncated_checkpoint_names_the_corrupt_step(stopped_run, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(stopped_run, workdir)
    chunk = _largest_chunk(workdir / "checkpoints" / "4")
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    code = cli.main(["eval", "--workdir", str(workdir), "--step", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert "the checkpoint at step 4" in err and "truncated?" in err


def test_a_truncated_latest_checkpoint_falls_back_before_tensorstore_reads_it(
        stopped_run, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(stopped_run, workdir)
    chunk = _largest_chunk(workdir / "checkpoints" / "4")
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    _, state = restore(workdir)
    err = capsys.readouterr().err
    assert int(state.step) == 2 and "truncated?" in err and "step 2 instead" in err
    assert "Traceback" not in err  # The file manifest caught it: TensorStore never read it.


def test_every_checkpoint_corrupt_is_one_error(stopped_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(stopped_run, workdir)
    for step in ("2", "4"):
        _flip(_largest_chunk(workdir / "checkpoints" / step))
    with pytest.raises(CheckpointCorruptError, match="every checkpoint .* is corrupt"):
        restore(workdir)


def test_a_frozen_backbone_that_differs_from_the_base_is_refused(stopped_run):
    s, state = restore(stopped_run)
    template = s.init_state()
    flat = flatten(template.params)
    frozen = sorted(template.layout.shared_paths())
    flat[frozen[0]] = flat[frozen[0]] + 1.0  # As if config.weights named other weights.
    other_base = template.replace(params=unflatten(flat))
    ckpt = Checkpointer(stopped_run / "checkpoints")
    try:
        with pytest.raises(CheckpointCorruptError, match="frozen backbone that differs"):
            ckpt.restore(other_base, 4, frozen=frozen)
        # The same checkpoint on its own base restores, and equals the run's state.
        ok = ckpt.restore(template, 4, frozen=frozen)
        jax.tree.map(np.testing.assert_array_equal, ok.params, state.params)
    finally:
        ckpt.close()


def test_checkpoints_deleted_while_the_run_saves_cost_one_warning_each_and_the_run_ends(
        colours, tmp_path, monkeypatch, capfd):
    """Issue 31: deleting ``checkpoints/`` during a run printed ~860 lines of orbax and asyncio
    tracebacks. Now each deletion is one warning naming the directory and the lost step; the
    run ends with its patches, and its last checkpoint is on disk and restores."""
    original = Checkpointer.save

    def save_then_delete(self, state, force=False):
        original(self, state, force)
        if int(state.step) in (3, 5):  # 3: while its save is in flight; 5: again, once more.
            while Path(self.directory).exists():
                shutil.rmtree(self.directory, ignore_errors=True)

    monkeypatch.setattr(Checkpointer, "save", save_then_delete)
    workdir = tmp_path / "run"
    config = run_config(colours, num_steps=8, checkpoint_every=1)
    train(config, str(workdir))
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 2, err
    for line, step in zip(lines, (3, 5)):
        assert line.startswith(f"warning: {workdir / 'checkpoints'} was deleted"), line
        assert f"step {step} is lost" in line
    assert (workdir / "summary.json").exists()
    _, state = restore(str(workdir))
    assert int(state.step) == 8


def test_the_quieted_noise_is_only_the_failed_saves(tmp_path, monkeypatch, caplog):
    """``OrbaxNoise`` drops closed-event-loop callbacks only while a save is failing, and
    asyncio records only if they name the checkpoint directory: other errors still print."""
    import logging
    import sys
    import types

    from kfor1.trainer.orbax_noise import OrbaxNoise

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: seen.append(str(info.exc_value)))
    failing = {"now": False}
    noise = OrbaxNoise(str(tmp_path), lambda: failing["now"])
    noise.install()

    def unraisable(message):
        return types.SimpleNamespace(exc_value=RuntimeError(message), exc_type=RuntimeError,
                                     exc_traceback=None, err_msg=None, object=None)
    try:
        sys.unraisablehook(unraisable("Event loop is closed"))  # Not failing: passed on.
        failing["now"] = True
        sys.unraisablehook(unraisable("Event loop is closed"))  # Failing: dropped.
        sys.unraisablehook(unraisable("something else"))  # Passed on.
        with caplog.at_level(logging.ERROR):
            log = logging.getLogger("asyncio")
            log.error("Future exception was never retrieved: %s", tmp_path / "3")
            log.error("Future exception was never retrieved: /elsewhere")
    finally:
        noise.remove()
    assert seen == ["Event loop is closed", "something else"]
    assert [r.getMessage() for r in caplog.records] == [
        "Future exception was never retrieved: /elsewhere"]
    assert sys.unraisablehook != noise._unraisable
