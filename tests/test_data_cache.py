"""``kfor1.data.cache`` and ``config.cache_images``: the decoded cache gives the stream (and the
run) of the uncached pipeline wherever no image needs shrinking, resumes and splits over
processes the same way, shrinks large images once, and is refused up front when it would not
fit in memory."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from kfor1 import data as kdata
from kfor1.data._tf import tf
from kfor1.data.cache import decoded_cache, estimate_bytes, shrink
from kfor1.multitask.state import Task
from kfor1.trainer import cli
from kfor1.trainer.config import ConfigError
from kfor1.trainer.experiment import TaskData, check_cache_fits

MEAN, STD = (127.5,) * 3, (127.5,) * 3


def _batches(ds, n, **kwargs):
    args = dict(resolution=32, mean=MEAN, std=STD, batch_size=8, seed=3,
                augment=kdata.Augment(crop="random_resized", flip=True))
    args.update(kwargs)
    return list(itertools.islice(kdata.train_batches(ds, **args), n))


def _equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["labels"], y["labels"])
        np.testing.assert_array_equal(x["images"], y["images"])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder source of 24 PNGs of different sizes (two classes), undecoded, as train reads it."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(12):
                h, w = (30 + 3 * i, 40 + 2 * i) if label == "a" else (48, 36)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    ds, _ = kdata.load_source(f"folder:{root}", "train", decode=False)
    return ds


def test_shrink_caps_the_shorter_side_at_twice_the_resolution():
    big = tf.zeros((300, 200, 3), tf.uint8)
    assert shrink(big, 50).shape == (150, 100, 3)  # Aspect kept.
    small = tf.constant(np.arange(60 * 80 * 3, dtype=np.uint8).reshape(60, 80, 3))
    out = shrink(small, 50)
    assert out.dtype == tf.uint8 and out.shape == (60, 80, 3)
    np.testing.assert_array_equal(out, small)  # Never enlarged, never resampled.


def test_cached_stream_equals_the_uncached_one(photos):
    """Images up to 2 x resolution are kept as decoded: the same augmented batches."""
    _equal(_batches(photos, 5, cache=True), _batches(photos, 5))


def test_cached_stream_resumes_at_any_step(photos):
    _equal(_batches(photos, 2, cache=True, start_step=3),
           _batches(photos, 5, cache=True)[3:])


def test_cached_stream_splits_over_processes_as_one_process(photos):
    """Each process's rows of a global batch, as without the cache."""
    whole = _batches(photos, 3, cache=True, batch_size=8)
    parts = [_batches(photos, 3, cache=True, batch_size=4, process_index=p, process_count=2)
             for p in range(2)]
    for b, (p0, p1) in enumerate(zip(*parts)):
        np.testing.assert_array_equal(np.concatenate([p0["images"], p1["images"]]),
                                      whole[b]["images"])
    _equal(parts[1], _batches(photos, 3, batch_size=4, process_index=1, process_count=2))


def test_large_images_are_cached_shrunk(photos):
    cached = list(decoded_cache(photos, resolution=16).as_numpy_iterator())
    assert len(cached) == 24
    assert all(min(e["image"].shape[:2]) <= 32 and e["image"].dtype == np.uint8 for e in cached)
    # At 64 px every image is kept whole: the estimate (all 24 sampled) is their exact size.
    sizes = [(30 + 3 * i) * (40 + 2 * i) * 3 for i in range(12)] + [48 * 36 * 3] * 12
    assert estimate_bytes(photos, 64) == sum(sizes)


def test_estimate_bytes_is_the_cached_size():
    images = [np.zeros((40, 50, 3), np.uint8)] * 10 + [np.zeros((100, 60, 3), np.uint8)] * 10
    ds = tf.data.Dataset.from_generator(
        lambda: ({"image": im, "label": 0} for im in images),
        output_signature={"image": tf.TensorSpec((None, None, 3), tf.uint8),
                          "label": tf.TensorSpec((), tf.int64)})
    # At 64 px (up to 128 kept) nothing shrinks; at 16 px the shorter sides go to 32.
    assert estimate_bytes(ds, 64, count=20) == 10 * 40 * 50 * 3 + 10 * 100 * 60 * 3
    assert estimate_bytes(ds, 16, count=20) == 10 * 32 * 40 * 3 + 10 * 53 * 32 * 3
    assert estimate_bytes(ds, 64, count=200, sample=10) == 200 * 40 * 50 * 3  # From the sample.
    assert estimate_bytes(ds.take(0), 64, count=0) == 0


def test_a_cache_that_does_not_fit_is_refused_in_one_line(photos):
    tasks = [TaskData(Task("photos", 2, 64), kdata.DatasetInfo(
        name="photos", num_classes=2, class_names=("a", "b"), num_examples={"train": 24}),
        None, photos)]
    check_cache_fits(tasks, available=10**9)  # About 0.1 MB: fits.
    with pytest.raises(ConfigError, match="config.cache_images=False") as info:
        check_cache_fits(tasks, available=100_000)
    assert "task 'photos'" in str(info.value) and "\n" not in str(info.value)


def test_train_with_the_cache_refused_before_any_step(colours, tmp_path, capsys, monkeypatch):
    import kfor1.data.cache as cache

    monkeypatch.setattr(cache, "available_memory", lambda: 1000)
    code = cli.main(["train", "--config", f"configs/transfer.py:dataset=folder:{colours}",
                     "--workdir", str(tmp_path / "run"), "--config.cache_images=True",
                     "--config.batch_size=8", "--config.eval_batch_size=48"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: config.cache_images:") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_a_cached_run_equals_the_uncached_run(colours, trained_run, tmp_path):
    """The shared tiny run (digits and 20 x 24 squares at 32 px: nothing to shrink) trained
    again with the cache: the same metrics, step by step."""
    from tiny_runs import metrics, run_config

    from kfor1.trainer.loop import train

    reference, _ = trained_run
    train(run_config(colours, cache_images=True), str(tmp_path / "cached"))
    assert metrics(tmp_path / "cached") == metrics(reference)
