"""K tasks exported to an existing serving engine: one TensorFlow SavedModel (loaded by plain
TensorFlow, in a process without kfor1 or JAX) and one TFLite flatbuffer (run in LiteRT, as a
phone would) reproduce kfor1's probabilities on a mixed-task batch.

Read as a specification of ``kfor1.serve.export`` and ``kfor1 export --format``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from serve_patches import lite0_base, make_patch

from kfor1.files.patchfile import write_patch
from kfor1.serve import PatchServer
from kfor1.serve.export import ExportError, export
from kfor1.trainer import cli

TASKS = (("flowers", "scale_bias+logits", 102), ("cars", "depthwise+scale_bias+logits", 10),
         ("dtd", "logits", 5))

# Runs in a fresh interpreter with JAX and kfor1 made unimportable (TensorFlow imports parts of
# JAX when it is installed, and must do without it here): plain TensorFlow, or LiteRT.
RUNNER = textwrap.dedent("""
    import sys
    for blocked in ("jax", "jaxlib", "kfor1"):
        sys.modules[blocked] = None  # `import jax` now raises ImportError.
    import numpy as np
    kind, path, data, out = sys.argv[1:]
    batch = np.load(data)
    images, ids = batch["images"], batch["task_ids"]
    if kind == "savedmodel":
        import tensorflow as tf
        serve = tf.saved_model.load(path).signatures["serving_default"]
        probs = serve(images=tf.constant(images), task_ids=tf.constant(ids))["probabilities"]
        probs = probs.numpy()
    else:
        from ai_edge_litert.interpreter import Interpreter
        runner = Interpreter(model_path=path).get_signature_runner("serving_default")
        probs = runner(images=images, task_ids=ids)["probabilities"]
    assert not any(m.startswith(("jax.", "jaxlib.", "kfor1.")) for m in sys.modules), "imported"
    np.save(out, probs)
""")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = lite0_base()
    patches = [make_patch(base, spec, n, name, seed=i) for i, (name, spec, n) in enumerate(TASKS)]
    server = PatchServer(base, patches, capacity=4)
    out = tmp_path_factory.mktemp("exported")
    paths = export(server, out)
    return server, paths


def _run(kind, path, images, ids, tmp_path):
    data, out = tmp_path / "batch.npz", tmp_path / "probs.npy"
    np.savez(data, images=images, task_ids=ids)
    result = subprocess.run([sys.executable, "-c", RUNNER, kind, str(path), str(data), str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out)


@pytest.mark.parametrize("kind", ["savedmodel", "tflite"])
def test_the_exported_model_reproduces_kfor1_on_a_mixed_batch(exported, kind, tmp_path):
    server, paths = exported
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    ids = np.asarray([0, 1, 2, 1, 0, 2, 2], np.int32)
    expected = server.predict(images, ids.tolist()).probabilities
    got = _run(kind, paths[kind], images, ids, tmp_path)
    assert got.shape == (7, 102)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))
    assert not got[2, 5:].any()  # dtd's padded classes: probability exactly 0.


def test_tasks_json_names_every_task_id(exported):
    server, paths = exported
    with open(f"{paths['savedmodel']}/tasks.json", encoding="utf-8") as f:
        record = json.load(f)
    assert [t["name"] for t in record["tasks"]] == ["flowers", "cars", "dtd"]
    assert record["resolution"] == 32 and record["max_classes"] == 102
    assert record["tasks"][2]["class_names"] == [f"dtd_{i}" for i in range(5)]


def test_export_refuses_tasks_of_two_resolutions(tmp_path):
    base = lite0_base()
    server = PatchServer(base, [make_patch(base, "logits", 5, "a", seed=0),
                                make_patch(base, "logits", 5, "b", seed=1, resolution=48)])
    with pytest.raises(ExportError, match="images of 32, 48 px; one exported signature has "
                       "one image size"):
        export(server, tmp_path)
    with pytest.raises(ExportError, match="unknown export format 'onnx'"):
        export(server, tmp_path, formats=("onnx",))


def test_cli_exports_a_runs_tasks_to_tflite(trained_run, tmp_path, capsys):
    workdir, _ = trained_run
    assert cli.main(["export", "--format", "tflite", "--workdir", str(workdir),
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"tflite: {tmp_path / 'model.tflite'}" in out
    assert "task id 0: colours (3 classes)" in out and "task id 1: digits (10 classes)" in out
    assert not (tmp_path / "savedmodel").exists()
    with open(tmp_path / "tasks.json", encoding="utf-8") as f:
        assert [t["name"] for t in json.load(f)["tasks"]] == ["colours", "digits"]


def test_cli_refuses_patches_of_another_base(tmp_path, capsys):
    base = lite0_base()
    dirs = []
    for i, (name, spec, n) in enumerate(TASKS[1:]):
        dirs += ["--patch", write_patch(make_patch(base, spec, n, name, seed=i), tmp_path / name)]
    # The patches' base is a random Lite0 (no weights file): refused on the packaged one.
    code = cli.main(["export", "--format", "savedmodel", *dirs, "--out", str(tmp_path / "o")])
    assert code == 2
    assert "was trained on a different base" in capsys.readouterr().err
    assert cli.main(["export", "--format", "tflite", *dirs]) == 2
    assert "needs --out DIR" in capsys.readouterr().err


def test_task_ids_number_the_served_tasks_after_a_removal(exported):
    import tensorflow as tf

    from kfor1.serve.export import tasks_record, tf_module

    server, _ = exported
    base = server.base
    small = PatchServer(base, [make_patch(base, spec, n, name, seed=i)
                               for i, (name, spec, n) in enumerate(TASKS)], capacity=4)
    small.remove("flowers")
    record = tasks_record(small)
    assert [(t["id"], t["name"]) for t in record["tasks"]] == [(0, "cars"), (1, "dtd")]
    images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    got = tf_module(small).serve(tf.constant(images), tf.constant([1, 0, 1], tf.int32))
    want = small.predict(images, ["dtd", "cars", "dtd"]).probabilities
    np.testing.assert_allclose(got["probabilities"].numpy(), want, atol=1e-4, rtol=0)
