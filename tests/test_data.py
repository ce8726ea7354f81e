"""Specifications of kfor1.data: named sources, reproducible training streams, masked eval.

TFDS sources are tested offline with ``tfds.testing.mock_data`` (random examples generated from
the dataset's code) and with a tiny dataset built here from a generator.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_digits

from kfor1.data import (
    Augment,
    DataError,
    DatasetInfo,
    eval_batches,
    load_source,
    multitask_train_batches,
    stack_tasks,
    train_batches,
    validate_folder,
)
from kfor1.data._tf import tf
from kfor1.data.tfds_source import TfdsSpec, parse_tfds

CIFAR10 = Path(__file__).parents[1].parent / "shared/data/cifar10"
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
MOCK = tfds.testing.MockPolicy.USE_CODE

tfds.disable_progress_bar()


# ----------------------------------------------------------------------------- helpers


# One constant colour per class, so a decoded image tells its true label.
COLOURS = {"ant": (200, 30, 60), "bee": (20, 180, 90), "cat": (90, 90, 240)}


def _write_image(path: Path, colour, size) -> None:
    Image.new("RGB", size, colour).save(path, quality=95)


def _make_folder(root: Path, per_class: dict[str, int] | None = None) -> Path:
    """root/{train,test}/<class>/ with constant-colour PNG and JPEG images of varying sizes."""
    counts = per_class or {"train": 4, "test": 2}
    for split, n in counts.items():
        for c, (name, colour) in enumerate(sorted(COLOURS.items(), reverse=True)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                ext = ".png" if i % 2 == 0 else ".JPG"  # Extensions match case-insensitively.
                _write_image(folder / f"{i}{ext}", colour, (10 + 3 * i + c, 14 + i))
    (root / "train" / "ant" / "notes.txt").write_text("not an image")  # Ignored.
    return root


def _label_of(pixels: np.ndarray) -> int:
    """The class whose colour the (uint8, 0..255) pixels have."""
    names = sorted(COLOURS)
    dist = [np.abs(pixels.reshape(-1, 3).mean(0) - COLOURS[n]).max() for n in names]
    assert min(dist) < 4, dist
    return int(np.argmin(dist))


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _indexed_dataset(n: int) -> tf.data.Dataset:
    """Example i is a 4x4 image filled with value i and label i: its identity survives eval."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 3))
    return tf.data.Dataset.from_tensor_slices(
        {"image": np.ascontiguousarray(images), "label": np.arange(n, dtype=np.int64)}
    )


@pytest.fixture
def folder(tmp_path) -> Path:
    return _make_folder(tmp_path / "pets")


# ----------------------------------------------------------------------------- folder sources


def test_folder_source_lists_sorted_classes_and_right_labels(folder):
    ds, info = load_source(f"folder:{folder}", "train")
    assert info == DatasetInfo(
        name=f"folder:{folder}",
        num_classes=3,
        class_names=("ant", "bee", "cat"),
        num_examples={"train": 12, "test": 6},
    )
    examples = list(ds.as_numpy_iterator())
    assert len(examples) == 12
    sizes = set()
    for ex in examples:
        assert ex["image"].dtype == np.uint8 and ex["image"].ndim == 3
        assert ex["image"].shape[-1] == 3
        assert ex["label"].dtype == np.int64
        assert _label_of(ex["image"]) == ex["label"]
        sizes.add(ex["image"].shape)
    assert len(sizes) > 3  # Variable image sizes pass through unchanged.
    assert sorted(int(ex["label"]) for ex in examples) == [0] * 4 + [1] * 4 + [2] * 4


def test_folder_train_order_is_seeded_and_test_order_is_fixed_and_mixed(folder):
    def labels(split, seed):
        ds, _ = load_source(f"folder:{folder}", split, seed=seed, decode=False)
        return [(int(ex["label"]), ex["path"]) for ex in ds.as_numpy_iterator()]

    assert labels("train", 0) == labels("train", 0)
    assert labels("train", 0) != labels("train", 1)
    # The same order whatever the seed, and not class-sorted: a prefix covers the classes.
    assert labels("test", 0) == labels("test", 5) != sorted(labels("test", 0))
    assert sorted(labels("test", 0)) == sorted(labels("test", 5))


def test_undecoded_folder_examples_are_paths(folder):
    ds, _ = load_source(f"folder:{folder}", "train", decode=False)
    assert set(ds.element_spec) == {"path", "label"}
    assert ds.element_spec["path"].dtype == tf.string


@pytest.mark.parametrize("decode", [True, False])
def test_train_batches_shapes_dtypes_and_normalisation(folder, decode):
    ds, _ = load_source(f"folder:{folder}", "train", decode=decode)
    mean, std = (100.0, 110.0, 120.0), (50.0, 60.0, 70.0)
    batches = train_batches(
        ds, resolution=16, mean=mean, std=std, batch_size=5, seed=0, augment=Augment()
    )
    for batch in _take(batches, 3):
        assert set(batch) == {"images", "labels"}
        assert batch["images"].shape == (5, 16, 16, 3) and batch["images"].dtype == np.float32
        assert batch["labels"].shape == (5,) and batch["labels"].dtype == np.int32
        # Constant-colour images stay constant under crops and flips: (colour - mean) / std.
        names = sorted(COLOURS)
        for image, label in zip(batch["images"], batch["labels"]):
            expected = (np.asarray(COLOURS[names[label]]) - mean) / std
            np.testing.assert_allclose(image, np.broadcast_to(expected, image.shape), atol=0.08)


@pytest.mark.parametrize("crop", ["random_resized", "pad", "none"])
def test_each_crop_gives_resolution_squares(crop):
    ds, _ = load_source("digits", "train")
    augment = Augment(crop=crop, flip=False)
    batch = next(
        train_batches(ds, resolution=12, mean=0, std=1, batch_size=4, seed=0, augment=augment)
    )
    assert batch["images"].shape == (4, 12, 12, 3)
    assert batch["images"].min() >= 0 and batch["images"].max() <= 255


def test_pad_crop_shows_the_zero_border_and_none_keeps_the_image():
    ones = tf.data.Dataset.from_tensors(
        {"image": np.full((8, 8, 3), 255, np.uint8), "label": np.int64(0)}
    )
    pad = Augment(crop="pad", flip=False, pad_fraction=0.25)
    images = next(
        train_batches(ones, resolution=8, mean=0, std=1, batch_size=64, seed=0, augment=pad)
    )["images"]
    assert (images == 0).any() and (images == 255).any()
    none = Augment(crop="none", flip=False)
    images = next(
        train_batches(ones, resolution=8, mean=0, std=1, batch_size=4, seed=0, augment=none)
    )["images"]
    assert np.all(images == 255)


def test_eval_batches_pad_the_last_batch_and_mask_it(folder):
    ds, _ = load_source(f"folder:{folder}", "test")  # 6 images.
    batches = list(eval_batches(ds, resolution=8, mean=0, std=1, batch_size=4))
    assert len(batches) == 2
    for batch in batches:
        assert batch["images"].shape == (4, 8, 8, 3) and batch["images"].dtype == np.float32
        assert batch["labels"].dtype == np.int32 and batch["mask"].dtype == np.bool_
    assert batches[0]["mask"].tolist() == [True] * 4
    assert batches[1]["mask"].tolist() == [True, True, False, False]
    assert np.all(batches[1]["images"][2:] == 0)
    real = [
        (image, label)
        for b in batches
        for image, label, m in zip(b["images"], b["labels"], b["mask"])
        if m
    ]
    assert sorted(int(lab) for _, lab in real) == [0, 0, 1, 1, 2, 2]
    assert all(_label_of(im) == lab for im, lab in real)


def test_eval_crop_is_the_prediction_crop():
    """One resize rule (issue 36): the evaluation pipeline's crop is ``center_crop_resize``'s,
    pixel for pixel (TensorFlow's bicubic differed from Pillow's by rounding)."""
    from kfor1.data.transforms import eval_image
    from kfor1.images import center_crop_resize

    image = np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    for resolution, crop_fraction in [(24, 0.875), (64, 0.875), (37, 1.0)]:
        ours = eval_image(tf.constant(image), resolution, crop_fraction).numpy()
        theirs = center_crop_resize(image, resolution, crop_fraction).astype(np.float32)
        np.testing.assert_array_equal(ours, theirs)


def test_one_image_is_one_array_in_evaluation_predict_and_serving(tmp_path):
    """The same file gives the same preprocessed array (<= 1e-5) through the evaluation
    pipeline, ``kfor1 predict``'s loader and the servers' (``PatchServer`` and the exported
    SavedModel normalise the same uint8 crop with ``Preprocessing.normalize`` in JAX)."""
    import jax.numpy as jnp

    from kfor1.data import eval_batches
    from kfor1.models import get_entry
    from kfor1.serve.predict import load_batch
    from kfor1.serve.requests import read_images

    path = tmp_path / "photo.jpg"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (61, 83, 3), dtype=np.uint8)).save(path, quality=90)
    pre = dataclasses.replace(get_entry("efficientnet_lite0").preprocessing, resolution=40)
    ds = tf.data.Dataset.from_tensor_slices({"path": [str(path)], "label": [0]})
    evaluated = next(eval_batches(ds, resolution=40, mean=pre.mean, std=pre.std, batch_size=8,
                                  crop_fraction=pre.crop_fraction))["images"][0]
    pixels = load_batch([path], pre)
    served, errors = read_images([str(path)], 40, pre.crop_fraction)
    assert not errors
    np.testing.assert_array_equal(served[0], pixels[0])
    np.testing.assert_allclose(pre.normalize(pixels)[0], evaluated, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(pre.normalize(jnp.asarray(pixels)))[0], evaluated,
                               atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- folder errors


def _remove_tree(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.unlink() if child.is_file() else child.rmdir()
    path.rmdir()


def _missing_folder(root):
    _remove_tree(root)
    return ["no such dataset folder", f"{root}/train/<class>/*.jpg"]


def _missing_test_split(root):
    _remove_tree(root / "test")
    return ["has no 'test' split folder", f"{root}/test/<class>/*.jpg"]


def _no_class_folders(root):
    _remove_tree(root / "train")
    (root / "train").mkdir()
    _write_image(root / "train" / "loose.png", (0, 0, 0), (4, 4))
    return ["has no class folders", "one folder per class"]


def _empty_class_folder(root):
    _remove_tree(root / "test" / "bee")
    (root / "test" / "bee").mkdir()
    (root / "test" / "bee" / "readme.txt").write_text("no images here")
    return ["without images", str(root / "test" / "bee"), "add images or remove"]


def _class_mismatch(root):
    (root / "test" / "cat").rename(root / "test" / "cow")
    return ["different class folders", "missing in test: cat", "only in test: cow"]


def _corrupt_image(root):
    (root / "test" / "ant" / "1.JPG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return ["1 of 6 test images", str(root / "test" / "ant" / "1.JPG"), "remove or re-encode"]


@pytest.mark.parametrize(
    "break_folder",
    [
        _missing_folder,
        _missing_test_split,
        _no_class_folders,
        _empty_class_folder,
        _class_mismatch,
        _corrupt_image,
    ],
)
def test_folder_problems_are_one_line_data_errors_naming_the_fix(folder, break_folder):
    expected = break_folder(folder)
    with pytest.raises(DataError) as error:
        load_source(f"folder:{folder}", "test")
    message = str(error.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_validate_folder_finds_undecodable_files(folder):
    bad = [folder / "train" / "bee" / "0.png", folder / "train" / "cat" / "3.JPG"]
    bad[0].write_bytes(b"")
    good = (folder / "train" / "ant" / "1.JPG").read_bytes()
    bad[1].write_bytes(good[: len(good) // 2])  # Truncated JPEG.
    assert validate_folder(folder, "train") == [str(p) for p in bad]
    assert validate_folder(folder, "test") == []


def test_unchecked_corrupt_images_are_skipped_by_the_pipelines(folder):
    (folder / "test" / "bee" / "1.JPG").write_bytes(b"definitely not a JPEG")
    ds, _ = load_source(f"folder:{folder}", "test", check_images=False)
    batches = list(eval_batches(ds, resolution=8, mean=0, std=1, batch_size=4))
    assert [b["mask"].sum() for b in batches] == [4, 1]
    ds, _ = load_source(f"folder:{folder}", "test", check_images=False, decode=False)
    batch = next(
        train_batches(ds, resolution=8, mean=0, std=1, batch_size=16, seed=0, augment=Augment())
    )
    assert batch["images"].shape == (16, 8, 8, 3)


def test_unknown_source_and_split_are_data_errors():
    with pytest.raises(DataError, match=r"tfds:NAME.*folder:PATH.*digits"):
        load_source("imagenet", "train")
    with pytest.raises(DataError, match="unknown split 'val'; use one of train, test, "
                       "validation"):
        load_source("digits", "val")


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not CIFAR10.is_dir(), reason=f"CIFAR-10 image folders not found at {CIFAR10}")
def test_cifar10_image_folder():
    ds, info = load_source(f"folder:{CIFAR10}", "train")
    assert info.num_classes == 10
    assert info.class_names == CIFAR10_CLASSES
    assert info.num_examples == {"train": 20_000, "test": 5_000}
    assert ds.cardinality() == 20_000
    batch = next(
        train_batches(
            ds,
            resolution=32,
            mean=127.5,
            std=127.5,
            batch_size=32,
            seed=0,
            augment=Augment(crop="pad"),
        )
    )
    assert batch["images"].shape == (32, 32, 32, 3) and batch["labels"].shape == (32,)
    assert batch["images"].min() >= -1.0 and batch["images"].max() <= 1.0
    assert len(set(batch["labels"].tolist())) > 3  # The train files are permuted, not by class.


def test_digits_source():
    digits = load_digits()
    total = np.bincount(digits.target)
    train, info = load_source("digits", "train")
    test, _ = load_source("digits", "test")
    assert info.num_classes == 10 and info.class_names == tuple("0123456789")
    assert info.num_examples == {"train": 1437, "test": 360}
    label_of = {
        np.round(im * 255 / 16).astype(np.uint8).tobytes(): y
        for im, y in zip(digits.images, digits.target)
    }
    counts = {}
    for name, ds in (("train", train), ("test", test)):
        examples = list(ds.as_numpy_iterator())
        assert len(examples) == info.num_examples[name]
        labels = np.array([ex["label"] for ex in examples])
        counts[name] = np.bincount(labels, minlength=10)
        for ex in examples:
            image = ex["image"]
            assert image.shape == (8, 8, 3) and image.dtype == np.uint8
            assert np.array_equal(image[..., 0], image[..., 2])
            assert label_of[image[..., 0].tobytes()] == ex["label"]
    assert np.array_equal(counts["train"] + counts["test"], total)
    np.testing.assert_allclose(counts["test"] / total, 0.2, atol=0.02)  # Stratified.
    assert max(ex["image"].max() for ex in test.as_numpy_iterator()) == 255


# ----------------------------------------------------------------------------- tfds sources


def test_tfds_cifar10_mocked():
    with tfds.testing.mock_data(num_examples=6, policy=MOCK):
        ds, info = load_source("tfds:cifar10", "train")
        examples = list(ds.as_numpy_iterator())
    assert info.name == "tfds:cifar10" and info.num_classes == 10
    # The wheel has no metadata files, so mocked CIFAR-10 class names are '0'..'9'; a prepared
    # dataset carries airplane..truck.
    assert len(info.class_names) == 10
    assert info.num_examples == {"train": 6, "test": 6}
    assert len(examples) == 6
    for ex in examples:
        assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
        assert ex["label"].dtype == np.int64 and 0 <= ex["label"] < 10


def test_tfds_split_mapping_and_variable_sizes_mocked():
    with tfds.testing.mock_data(num_examples=4, policy=MOCK):
        ds, info = load_source("tfds:oxford_flowers102:train+validation:test", "train")
        shapes = [ex["image"].shape for ex in ds.as_numpy_iterator()]
        batch = next(
            train_batches(
                ds,
                resolution=24,
                mean=127.0,
                std=64.0,
                batch_size=3,
                seed=1,
                augment=Augment(),
            )
        )
    assert info.num_classes == 102 and info.class_names[0] == "pink primrose"
    assert all(s[-1] == 3 for s in shapes)
    assert batch["images"].shape == (3, 24, 24, 3)


def test_tfds_grayscale_becomes_rgb_and_undecoded_is_bytes_mocked():
    with tfds.testing.mock_data(num_examples=3, policy=MOCK):
        ds, _ = load_source("tfds:mnist", "test")
        image = next(ds.as_numpy_iterator())["image"]
        raw, _ = load_source("tfds:mnist", "test", decode=False)
        assert raw.element_spec["image"].dtype == tf.string
        batch = next(
            eval_batches(raw, resolution=28, mean=0, std=1, batch_size=4, crop_fraction=1.0)
        )
    assert image.shape == (28, 28, 3)
    assert np.array_equal(image[..., 0], image[..., 1])
    assert batch["mask"].tolist() == [True, True, True, False]
    np.testing.assert_array_equal(batch["images"][0], image)


def test_tfds_dataset_not_prepared_is_an_actionable_data_error(tmp_path):
    with pytest.raises(DataError) as error:
        load_source("tfds:cifar10", "train", data_dir=str(tmp_path))
    message = str(error.value)
    for part in (
        "not prepared",
        str(tmp_path),
        "tfds build cifar10",
        "download_and_prepare",
        "folder:PATH",
    ):
        assert part in message


def test_tfds_unknown_name_is_a_data_error():
    with pytest.raises(DataError, match="unknown tensorflow-datasets name 'no_such_dataset_x'"):
        load_source("tfds:no_such_dataset_x", "train")


def test_tfds_source_parsing():
    assert parse_tfds("cifar10") == TfdsSpec("cifar10")
    spec = parse_tfds("dtd:train[:80%]:train[80%:]")
    assert (spec.name, spec.train_split, spec.test_split) == ("dtd", "train[:80%]", "train[80%:]")
    spec = parse_tfds("imagenet2012:5.1.0:train:validation")
    assert (spec.name, spec.train_split, spec.test_split) == (
        "imagenet2012:5.1.0",
        "train",
        "validation",
    )
    assert parse_tfds("a:b:c:d").validation_split == "d"
    with pytest.raises(DataError, match="cannot parse"):
        parse_tfds("a:b:c:d:e")


class Kfor1TinyGray(tfds.core.GeneratorBasedBuilder):
    """A real, prepared TFDS dataset without a 'test' split, built offline from a generator."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 1)),
                    "label": tfds.features.ClassLabel(names=["zero", "one", "two"]),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6), "validation": self._generate_examples(3)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": np.full((5 + i, 7, 1), 40 * i, np.uint8), "label": i % 3}


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory) -> str:
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    Kfor1TinyGray(data_dir=data_dir).download_and_prepare()
    return data_dir


def test_tfds_prepared_dataset_falls_back_to_validation_for_test(tiny_tfds):
    ds, info = load_source("tfds:kfor1_tiny_gray", "test", data_dir=tiny_tfds)
    assert info.class_names == ("zero", "one", "two")
    assert info.num_examples == {"train": 6, "test": 3}
    examples = list(ds.as_numpy_iterator())
    assert sorted(ex["image"].shape for ex in examples) == [(5, 7, 3), (6, 7, 3), (7, 7, 3)]
    for ex in examples:
        assert ex["label"] == (ex["image"].shape[0] - 5) % 3
        assert np.all(ex["image"] == 40 * (ex["image"].shape[0] - 5))
    _, sliced = load_source(
        "tfds:kfor1_tiny_gray:train[:50%]:train[50%:]", "train", data_dir=tiny_tfds
    )
    assert sliced.num_examples == {"train": 3, "test": 3}
    ds, joined = load_source(
        "tfds:kfor1_tiny_gray:train+validation:validation", "train", data_dir=tiny_tfds
    )
    assert joined.num_examples == {"train": 9, "test": 3} and ds.cardinality() == 9
    with pytest.raises(DataError, match="no split 'bogus'.*train, validation"):
        load_source("tfds:kfor1_tiny_gray:bogus:validation", "train", data_dir=tiny_tfds)


# ----------------------------------------------------------------------------- determinism


def _stream(ds, seed, start_step=0, **kwargs):
    return train_batches(
        ds,
        resolution=12,
        mean=(120, 110, 100),
        std=(60, 60, 60),
        batch_size=8,
        seed=seed,
        augment=Augment(crop="random_resized", min_scale=0.3),
        start_step=start_step,
        shuffle_buffer=64,
        **kwargs,
    )


def _same(a, b) -> bool:
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_train_stream_is_reproducible_and_resumable():
    ds, _ = load_source("digits", "train")
    first = _take(_stream(ds, seed=3), 3)
    assert _same(first, _take(_stream(ds, seed=3), 3))
    assert not _same(first, _take(_stream(ds, seed=4), 3))
    assert _same(first[2:], _take(_stream(ds, seed=3, start_step=2), 1))


def test_train_stream_resumes_exactly_across_epochs_on_undecoded_files(folder):
    ds, _ = load_source(f"folder:{folder}", "train", decode=False)  # 12 files: 1.5 batches.
    first = _take(_stream(ds, seed=0), 5)
    assert _same(first[4:], _take(_stream(ds, seed=0, start_step=4), 1))
    labels = np.concatenate([b["labels"] for b in first[:3]])
    assert np.array_equal(np.bincount(labels), [8, 8, 8])  # Two full epochs: each file twice.


def test_train_processes_read_their_rows_of_the_single_process_batches():
    """P processes feeding B each see exactly the batches one process sees with P * B (the
    run does not depend on the process count), resumed ones too."""
    ds = _indexed_dataset(40)
    for start in (0, 3):
        single = _take(train_batches(
            ds, resolution=12, mean=(120, 110, 100), std=(60, 60, 60), batch_size=16, seed=0,
            augment=Augment(crop="random_resized", min_scale=0.3), start_step=start,
            shuffle_buffer=64), 5)
        parts = [_take(_stream(ds, 0, start_step=start, process_index=p, process_count=2), 5)
                 for p in range(2)]
        for step, whole in enumerate(single):
            for key in ("images", "labels"):
                np.testing.assert_array_equal(
                    np.concatenate([parts[0][step][key], parts[1][step][key]]), whole[key])


def test_eval_shards_are_disjoint_cover_the_set_and_have_equal_length():
    ds = _indexed_dataset(37)
    shards = [
        list(
            eval_batches(
                ds,
                resolution=4,
                mean=0,
                std=1,
                batch_size=8,
                crop_fraction=1.0,
                process_index=p,
                process_count=2,
            )
        )
        for p in range(2)
    ]
    assert [len(s) for s in shards] == [3, 3]  # 19 and 18 examples; equal steps per process.
    ids = []
    for shard in shards:
        real = [
            (int(label), image[0, 0, 0])
            for b in shard
            for image, label, m in zip(b["images"], b["labels"], b["mask"])
            if m
        ]
        assert all(label == value for label, value in real)
        ids.append({label for label, _ in real})
    assert ids[0].isdisjoint(ids[1])
    assert ids[0] | ids[1] == set(range(37))
    with pytest.raises(ValueError, match="process_index"):
        eval_batches(
            ds, resolution=4, mean=0, std=1, batch_size=8, process_index=2, process_count=2
        )


# ----------------------------------------------------------------------------- multi-task


def test_stack_tasks_gives_task_major_arrays():
    batches = [
        {"images": np.full((4, 6, 6, 3), k, np.float32), "labels": np.full((4,), k, np.int32)}
        for k in range(3)
    ]
    stacked = stack_tasks(batches)
    assert stacked["images"].shape == (3, 4, 6, 6, 3) and stacked["labels"].shape == (3, 4)
    assert stacked["labels"][:, 0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="separate groups"):
        stack_tasks([batches[0], {**batches[1], "images": np.zeros((4, 8, 8, 3), np.float32)}])


def test_multitask_train_batches_zip_and_stack_tasks(folder):
    digits, _ = load_source("digits", "train")
    pets, _ = load_source(f"folder:{folder}", "train", decode=False)
    streams = [_stream(digits, 0), _stream(pets, 1)]
    batch = next(multitask_train_batches(streams))
    assert batch["images"].shape == (2, 8, 12, 12, 3) and batch["labels"].shape == (2, 8)


def test_augment_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown crop"):
        Augment(crop="center")
    with pytest.raises(ValueError, match="min_scale"):
        Augment(min_scale=0.0)
