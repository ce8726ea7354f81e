"""The training step's memory is checked from the compiled step before it runs: a run that
cannot fit (issue 31: ``resolution=4096`` compiled, then failed to allocate 72.8 GB with a raw
traceback) is one line with the number and the fix, and nothing of the run is written. Read as
a specification of ``kfor1.trainer.memory``."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import kfor1.trainer.memory as memory
from kfor1.trainer import cli
from kfor1.trainer.config import ConfigError


def test_step_bytes_counts_arguments_outputs_and_temporaries():
    x = jax.ShapeDtypeStruct((512, 512), jnp.float32)  # 1 MiB.
    compiled = jax.jit(lambda a: jnp.tanh(a @ a) @ a).lower(x).compile()
    need = memory.step_bytes(compiled)
    assert need is not None and need >= 2 * 512 * 512 * 4  # The argument and the output.
    donated = jax.jit(lambda a: a * 2, donate_argnums=0).lower(x).compile()
    assert memory.step_bytes(donated) <= 512 * 512 * 4 + 4096  # The output reuses the input.


def test_a_step_that_does_not_fit_is_refused_with_its_size_and_the_fix():
    x = jax.ShapeDtypeStruct((512, 512), jnp.float32)
    compiled = jax.jit(lambda a: a @ a).lower(x).compile()
    assert memory.check_step_memory(compiled, "the step", "lower it",
                                    available=(1 << 40, "plenty")) > 0
    with pytest.raises(ConfigError, match=r"^the step needs about \d+ MB and tiny is 0 MB; "
                                          r"lower it$"):
        memory.check_step_memory(compiled, "the step", "lower it", available=(1000, "tiny"))


def test_available_bytes_on_this_machine():
    have, source = memory.available_bytes()
    assert have > 0 and source == "available host memory"


def test_a_run_that_cannot_fit_stops_before_its_first_step(colours, tmp_path, capsys,
                                                           monkeypatch):
    """The whole run, through ``kfor1 train``: one line naming the step's size, what the
    machine has and the config fields to lower; no metrics and no checkpoint are written."""
    monkeypatch.setattr(memory, "available_bytes",
                        lambda device=None: (50_000_000, "available host memory"))
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    workdir = tmp_path / "run"
    argv = ["train", "--config", f"configs/transfer.py:dataset=folder:{colours},resolution=64",
            "--workdir", str(workdir), "--config.num_steps=2", "--config.batch_size=8",
            "--config.eval_batch_size=8"]
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("error: the training step (1 task(s) x 8 images at 64 px) needs "
                             "about "), err[0]
    assert "available host memory is 50 MB; lower config.batch_size or the tasks' " \
           "resolution" in err[0]
    assert not (workdir / "metrics.jsonl").exists()
    assert not any((workdir / "checkpoints").glob("[0-9]*"))
