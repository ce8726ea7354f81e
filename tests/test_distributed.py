"""The trainer as 2 processes x 2 CPU devices on localhost (``jax.distributed`` with a
coordinator on 127.0.0.1 and Gloo collectives) ends with the metrics and patches of 1 process x
4 devices; ``config.distributed=True`` without a cluster says what to set. Read as a
specification of ``kfor1.trainer.distributed`` and the multi-process paths of
``kfor1.trainer.loop``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kfor1.files.patchfile import load_patch
from kfor1.tree import flatten

REPO = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, "-m", "launch.train", "--config",
         "configs/transfer.py:dataset=digits,resolution=32", "--config.num_steps=4",
         "--config.checkpoint_every=2", "--config.log_every=2", "--config.batch_size=8",
         "--config.eval_batch_size=48", "--config.max_eval_examples=96",
         "--config.warmup_steps=1", "--config.progress=false",
         # SGD, not Adam: a BN shift feeding another BN has a gradient that is zero but for
         # rounding, which Adam's m / sqrt(v) turns into a +-lr step whose sign depends on the
         # order Gloo sums in. SGD keeps it at rounding size, so the comparison can be tight.
         "--config.optimizer=sgd"]


def _env(devices: int) -> dict[str, str]:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(workdir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "images_per_s"} for line in lines]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    port = _free_port()
    cluster = [f"--config.cluster.coordinator_address=127.0.0.1:{port}",
               "--config.cluster.num_processes=2", "--config.distributed=true"]
    logs = [root / f"process_{i}.log" for i in range(2)]
    procs = [subprocess.Popen([*TRAIN, "--workdir", str(root / "two"), *cluster,
                               f"--config.cluster.process_id={i}"], cwd=REPO, env=_env(2),
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
             for i, log in enumerate(logs)]
    for p, log in zip(procs, logs):  # Logs in files: a full pipe would stall its process.
        p.wait(timeout=900)
        assert p.returncode == 0, log.read_text()[-3000:]
    one = subprocess.run([*TRAIN, "--workdir", str(root / "one")], cwd=REPO, env=_env(4),
                         capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    return root / "two", root / "one"


def test_two_processes_end_with_the_metrics_of_one(runs):
    two, one = runs
    a, b = _metrics(two), _metrics(one)
    assert [x["step"] for x in a] == [x["step"] for x in b] == [2, 4, 4]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        np.testing.assert_allclose([x[k] for k in sorted(x)], [y[k] for k in sorted(y)],
                                   rtol=1e-5, atol=1e-6)


def test_two_processes_end_with_the_patches_of_one(runs):
    two, one = runs
    a, b = (flatten(load_patch(w / "patches" / "digits").variables) for w in runs)
    assert a.keys() == b.keys() and a
    for path in a:
        np.testing.assert_allclose(a[path], b[path], rtol=1e-5, atol=1e-6, err_msg=path)
    assert json.loads((two / "summary.json").read_text())["tasks"].keys() == {"digits"}
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == [".kfor1", "2", "4"]


def test_distributed_without_a_cluster_says_what_to_set(tmp_path):
    done = subprocess.run([*TRAIN, "--workdir", str(tmp_path / "run"),
                           "--config.distributed=true"], cwd=REPO, env=_env(1),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "--config.cluster.coordinator_address=HOST:PORT" in done.stderr
    assert "--config.cluster.num_processes=N" in done.stderr
    assert not (tmp_path / "run").exists()
