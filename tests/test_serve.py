"""Serving K tasks from one base: a mixed-task batch in one compiled call equals each task's
patch applied alone, patches hot-swap without recompiling, and bad input is one line.

Read as a specification of ``kfor1.serve`` (``table`` and ``server``).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from serve_patches import RESOLUTION, lite0_base, make_patch

from kfor1.files.patchfile import PatchFileError, apply_patch, load_patch, write_patch
from kfor1.serve import PatchServer, PatchTableError, UnknownTaskError
from kfor1.tree import flatten

# Heads of 5, 10 and 102 classes in one table; scale/bias, depthwise, logits-only and mixed.
TASKS = (("flowers", "scale_bias+logits", 102), ("cars", "depthwise+logits", 10),
         ("dtd", "logits", 5), ("pets", "depthwise+scale_bias+logits", 10))


@pytest.fixture(scope="module")
def base():
    return lite0_base()


@pytest.fixture(scope="module")
def patches(base):
    return {name: make_patch(base, spec, n, name, seed=i)
            for i, (name, spec, n) in enumerate(TASKS)}


def _images(n, size=RESOLUTION, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _alone(base, patch, images):
    """The task's probabilities with its patch applied alone: the reference."""
    variables = apply_patch(base.variables, patch)
    model = base.model.clone(num_classes=patch.num_classes)
    logits = jax.jit(model.apply)(variables, base.preprocessing.normalize(images))
    return np.asarray(jax.nn.softmax(logits, axis=-1))


def test_a_mixed_batch_equals_each_patch_alone(base, patches):
    server = PatchServer(base, list(patches.values()))
    assert server.layout.max_classes == 102 and len(server.tasks) == 4
    names = ["flowers", "cars", "dtd", "pets", "cars", "cars", "flowers", "dtd", "pets", "dtd"]
    images = _images(len(names))
    out = server.predict(images, names)
    assert out.probabilities.shape == (10, 102)
    for name, patch in patches.items():
        rows = [i for i, n in enumerate(names) if n == name]
        expected = _alone(base, patch, images[rows])
        for row, want in zip(rows, expected):
            class_names, got = out[row]
            assert class_names == patch.class_names
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
            assert not out.probabilities[row, patch.num_classes:].any()  # Padded: exactly 0.
    # Slots work as task ids too.
    slots = [server.tasks[n].slot for n in names]
    np.testing.assert_array_equal(server.predict(images, slots).probabilities,
                                  out.probabilities)
    top = out.top_k(3)
    assert len(top[2]) == 3 and top[2][0][1].startswith("dtd_")


def test_tasks_at_different_resolutions_are_served_together(base, patches):
    small = make_patch(base, "scale_bias+logits", 5, "small", seed=7)
    large = make_patch(base, "scale_bias+logits", 5, "large", seed=8, resolution=48)
    server = PatchServer(base, [small, large], capacity=4)
    images = [*_images(2, 32, seed=1), *_images(3, 48, seed=2)]
    tasks = ["small", "small", "large", "large", "large"]
    order = [2, 0, 3, 1, 4]  # Interleaved.
    out = server.predict([images[i] for i in order], [tasks[i] for i in order])
    want_small = _alone(base, small, np.stack(images[:2]))
    want_large = _alone(base, large, np.stack(images[2:]))
    want = np.concatenate([want_small, want_large])[order]
    np.testing.assert_allclose(out.probabilities[:, :5], want, atol=1e-5, rtol=0)


def test_statistics_patches_are_served_beside_others(base, patches):
    """``stats`` (every BatchNorm's statistics) and ``input_stats`` (the stem's) patches own
    statistics and no parameter below the head; served in one batch with a scale/bias patch,
    each example gets its own task's statistics."""
    adabn = make_patch(base, "stats+logits", 5, "adabn", seed=11)
    stem = make_patch(base, "input_stats+logits", 3, "stem", seed=12)
    assert {p for p in flatten(stem.variables["batch_stats"])} == {"stem/bn/mean", "stem/bn/var"}
    server = PatchServer(base, [adabn, stem, patches["flowers"]])
    images = _images(5, seed=3)
    out = server.predict(images, ["stem", "adabn", "flowers", "adabn", "stem"])
    for rows, patch in (([0, 4], stem), ([1, 3], adabn), ([2], patches["flowers"])):
        np.testing.assert_allclose(out.probabilities[rows, :patch.num_classes],
                                   _alone(base, patch, images[rows]), atol=1e-5, rtol=0)


def test_add_and_remove_never_recompile(base, patches):
    first, *rest = patches.values()
    server = PatchServer(base, [first], capacity=8, max_classes=102, max_traces=1,
                         spec="depthwise+scale_bias+logits")
    images = _images(8)
    server.predict(images, ["flowers"] * 8)
    for patch in rest:
        server.add(patch)
        server.predict(images, [patch.meta["task"]] * 4 + ["flowers"] * 4)
    server.remove("cars")
    out = server.predict(images, ["dtd"] * 8)
    server.add(patches["cars"], name="cars again")
    assert server.predict(images, ["cars again"] * 8).probabilities.shape == (8, 102)
    np.testing.assert_allclose(out[0][1], _alone(base, patches["dtd"], images[:1])[0],
                               atol=1e-5, rtol=0)
    assert server._compiled._cache_size() == 1


def test_from_state_serves_a_trained_multitask_state(trained_run):
    from kfor1.trainer.workdir import restore

    workdir, _ = trained_run
    s, state = restore(workdir)
    server = PatchServer.from_state(state, s.base, class_names=[
        list(t.info.class_names) for t in s.tasks])
    images = _images(4)
    out = server.predict(images, ["digits", "colours", "colours", "digits"])
    alone = PatchServer(s.base, [load_patch(workdir / "patches" / "colours")])
    np.testing.assert_allclose(out[1][1], alone.predict(images[1:2], ["colours"])[0][1],
                               atol=1e-5, rtol=0)
    assert out[1][0] == ("blue", "green", "red")


# --- bad input -------------------------------------------------------------------------------


def _table_bytes(server):
    return {p: np.asarray(v).copy() for p, v in server.table.rows.items()}


def test_unknown_tasks_are_named_with_what_is_served(base, patches):
    server = PatchServer(base, [patches["dtd"]])
    with pytest.raises(UnknownTaskError, match=r"example 1: no task 'cats' is served; tasks "
                       r"\(slot: name\) are 0: dtd"):
        server.predict(_images(2), ["dtd", "cats"])
    with pytest.raises(UnknownTaskError, match="example 0: no task 3"):
        server.predict(_images(1), [3])
    with pytest.raises(UnknownTaskError, match="no task 'cats' to remove"):
        server.remove("cats")
    with pytest.raises(ValueError, match="2 images and 1 task ids"):
        server.predict(_images(2), ["dtd"])


def test_an_image_of_the_wrong_resolution_says_which_and_what_size(base, patches):
    server = PatchServer(base, [patches["dtd"]])
    with pytest.raises(ValueError, match=r"example 0 is \(48, 48, 3\) and task 'dtd' takes "
                       r"\(32, 32, 3\)"):
        server.predict(_images(1, 48), ["dtd"])


def test_refused_adds_leave_the_table_as_it_was(base, patches, tmp_path):
    server = PatchServer(base, [patches["dtd"]], capacity=2, spec="scale_bias+logits",
                         max_classes=10)
    before, served = _table_bytes(server), server.tasks

    other = lite0_base()  # Same architecture, other weights.
    other = type(other)(other.name, other.model, jax.tree.map(lambda v: v * 1.01,
                        other.variables), other.preprocessing, other.class_names, "other")
    foreign = make_patch(other, "scale_bias+logits", 5, "foreign", seed=3)
    with pytest.raises(PatchFileError, match=r"patch 'foreign' \(for base 'efficientnet_lite0', "
                       r"here 'efficientnet_lite0'\) was trained on a different base"):
        server.add(foreign)
    with pytest.raises(PatchTableError, match="has 102 classes and this table's heads hold at "
                       "most 10; make the server with max_classes=102"):
        server.add(patches["flowers"])
    with pytest.raises(PatchTableError, match="patches 'params/.*depthwise.*which this table "
                       "does not serve"):
        server.add(patches["cars"])
    with pytest.raises(PatchTableError, match="task 'dtd' is served already"):
        server.add(patches["dtd"])
    corrupt = tmp_path / "corrupt"
    write_patch(patches["dtd"], corrupt)
    (corrupt / "patch.msgpack").write_bytes(b"\x00garbage")
    with pytest.raises(PatchFileError, match="is corrupt.*re-export it"):
        server.add(corrupt)
    with pytest.raises(FileNotFoundError, match="no such patch directory"):
        server.add(tmp_path / "missing")
    assert server.tasks == served
    for path, value in _table_bytes(server).items():
        np.testing.assert_array_equal(value, before[path])

    server.add(make_patch(base, "scale_bias+logits", 5, "second", seed=4))
    with pytest.raises(PatchTableError, match=r"the table is full \(2 tasks: dtd, second\); "
                       "remove one or make the server with a larger capacity="):
        server.add(make_patch(base, "logits", 5, "third", seed=5))


def test_a_server_needs_patches_or_a_spec(base):
    with pytest.raises(PatchTableError, match="needs spec="):
        PatchServer(base)
    with pytest.raises(PatchTableError, match="capacity must be a positive"):
        PatchServer(base, spec="logits", capacity=0)


# --- the command line ------------------------------------------------------------------------


def test_predict_serves_tagged_images_of_several_tasks(trained_run, tmp_path, capsys):
    import json

    from PIL import Image

    from kfor1.trainer import cli
    workdir, _ = trained_run
    red, digit = tmp_path / "red.png", tmp_path / "digit.png"
    Image.fromarray(np.full((40, 40, 3), (200, 30, 30), np.uint8)).save(red)
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(digit)
    patches = ["--patch", str(workdir / "patches" / "colours"),
               "--patch", str(workdir / "patches" / "digits")]
    assert cli.main(["predict", *patches, f"colours={red}", f"digits={digit}", "--json"]) == 0
    tagged = json.loads(capsys.readouterr().out)
    assert [r["task"] for r in tagged] == ["colours", "digits"]
    assert len(tagged[0]["top"]) == 3 and len(tagged[1]["top"]) == 5  # Colours has 3 classes.
    assert {p["name"] for p in tagged[0]["top"]} == {"red", "green", "blue"}
    # The same requests from a CSV and a JSON-lines file, paths relative to the file.
    (tmp_path / "requests.csv").write_text("task,path\ncolours,red.png\ndigits,digit.png\n")
    (tmp_path / "requests.jsonl").write_text(
        '{"task": "colours", "path": "red.png"}\n{"task": "digits", "path": "digit.png"}\n')
    for name in ("requests.csv", "requests.jsonl"):
        assert cli.main(["predict", *patches, "--requests", str(tmp_path / name), "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert [[p["probability"] for p in r["top"]] for r in got] == [
            [p["probability"] for p in r["top"]] for r in tagged]
    assert cli.main(["predict", *patches, f"colours={red}"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{red}  [colours]"

    for argv, message in [
        ([str(red)], "tag each image with its task, TASK=PATH (tasks: colours, digits)"),
        ([f"cats={red}"], "no task 'cats'"),
        ([f"colours={tmp_path / 'none.png'}"], "no such image file"),
        (["--requests", str(tmp_path / "none.csv")], "no such request file"),
        ([], "give image files to classify"),
    ]:
        assert cli.main(["predict", *patches, *argv]) == 2
        assert message in capsys.readouterr().err, argv
    (tmp_path / "bad.csv").write_text("colours,red.png,extra\n")
    assert cli.main(["predict", *patches, "--requests", str(tmp_path / "bad.csv")]) == 2
    assert "bad.csv:1: expected 'task,path'" in capsys.readouterr().err
    same = ["--patch", str(workdir / "patches" / "colours")] * 2
    assert cli.main(["predict", *same, f"colours={red}"]) == 2
    assert "two patches are both task 'colours'" in capsys.readouterr().err


def test_the_trainers_evaluation_and_the_served_patches_score_alike(trained_run):
    """Issue 36: the trainer's evaluation resized with TensorFlow's bicubic and ``kfor1
    predict`` / ``PatchServer`` with Pillow's, so the same patch scored 35.0% and 31.7% on
    digits. Now each task's test images, decoded and cropped as a server does and answered by
    the exported patch files, give exactly the accuracy ``evaluate`` reports."""
    from kfor1.data.decode import decode_example
    from kfor1.images import center_crop_resize
    from kfor1.trainer.evaluate import evaluate
    from kfor1.trainer.workdir import restore

    workdir, _ = trained_run
    s, state = restore(workdir)
    results = evaluate(s, state)
    server = PatchServer(s.base, [load_patch(workdir / "patches" / t.task.name)
                                  for t in s.tasks])
    for t in s.tasks:
        limit = int(s.config.max_eval_examples)
        examples = list(t.test.take(limit).map(decode_example).as_numpy_iterator())
        images = np.stack([center_crop_resize(e["image"], t.task.resolution,
                                              s.eval_crop_fraction) for e in examples])
        out = server.predict(images, [t.task.name] * len(images))
        predicted = np.asarray([np.argmax(probabilities) for _, probabilities in out])
        labels = np.asarray([e["label"] for e in examples])
        assert len(labels) == results[t.task.name]["examples"]
        assert np.mean(predicted == labels) == pytest.approx(
            results[t.task.name]["accuracy"], abs=1e-9), t.task.name
