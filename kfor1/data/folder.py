"""Images on disk in the ImageFolder layout ``ROOT/{train,test}/<class_name>/*.jpg``, and
optionally ``ROOT/val/`` (or ``ROOT/validation/``): the 'validation' split of
``config.validation='split'``.

The layout is checked up front and every problem is one ``DataError`` that names the fix, so a
mistyped path or a stray empty folder fails in the first second rather than deep inside a
training run. Files are listed here and read lazily in the pipeline.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from kfor1.data._tf import tf
from kfor1.data.decode import decode_example
from kfor1.data.errors import DataError
from kfor1.data.info import DatasetInfo

__all__ = ["IMAGE_EXTENSIONS", "FolderSplit", "list_split", "load_folder", "validate_folder"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
SPLITS = ("train", "test", "validation")
VALIDATION_DIRS = ("val", "validation")  # The 'validation' split's folder, the first found.
_SHOWN = 5  # Names shown in an error message before "and N more".


@dataclasses.dataclass(frozen=True)
class FolderSplit:
    """One split's files and integer labels, in sorted (class, file name) order."""

    class_names: tuple[str, ...]
    files: tuple[str, ...]
    labels: tuple[int, ...]


def _expected(root: Path, split: str = "train") -> str:
    return f"{root}/{split}/<class>/*.jpg"


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" (and {len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")


def _is_image(entry: os.DirEntry) -> bool:
    return entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file()


def _visible(directory: Path) -> list[os.DirEntry]:
    with os.scandir(directory) as entries:
        return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def list_split(root: str | os.PathLike, split: str) -> FolderSplit:
    """Lists ``root/split``: class names are its sorted subfolder names (hidden ones skipped).

    Raises ``DataError`` for a missing folder or split, no class folders, or a class folder
    without images.
    """
    root = Path(root).expanduser()
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if not root.is_dir():
        raise DataError(f"no such dataset folder {root}; expected {_expected(root)}")
    split_dir = root / split
    if split == "validation":
        found = [root / d for d in VALIDATION_DIRS if (root / d).is_dir()]
        if not found:
            raise DataError(f"dataset folder {root} has no val/ folder for the validation split "
                            f"(config.validation='split'); expected {_expected(root, 'val')}, "
                            "or hold a fraction of train out (config.validation=0.1)")
        split_dir = found[0]
    if not split_dir.is_dir():
        raise DataError(
            f"dataset folder {root} has no {split!r} split folder; "
            f"expected {_expected(root, split)}"
        )
    entries = _visible(split_dir)
    class_dirs = [e for e in entries if e.is_dir()]
    if not class_dirs:
        loose = (
            " (it holds images directly: move them into one folder per class)"
            if any(_is_image(e) for e in entries)
            else ""
        )
        raise DataError(
            f"{split_dir} has no class folders{loose}; expected {_expected(root, split)}"
        )
    files: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for label, class_dir in enumerate(class_dirs):
        images = [e.path for e in _visible(Path(class_dir.path)) if _is_image(e)]
        if not images:
            empty.append(class_dir.path)
        files.extend(images)
        labels.extend([label] * len(images))
    if empty:
        raise DataError(
            f"class folders without images ({'/'.join(IMAGE_EXTENSIONS)}): {_names(empty)}; "
            "add images or remove the folders"
        )
    return FolderSplit(tuple(e.name for e in class_dirs), tuple(files), tuple(labels))


def check_classes(
    found: tuple[str, ...], expected: tuple[str, ...], *, where: str, short: str, against: str,
    fix: str, noun: str = "class folders",
) -> None:
    """Raises a ``DataError`` naming the missing and extra classes when ``found`` (those of
    ``where``, called ``short``) differs from ``expected`` (those of ``against``), order
    included: a label is a class's index."""
    if tuple(found) == tuple(expected):
        return
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    order = "" if missing or extra else " (the same names in another order)"
    raise DataError(
        f"{where} and {against} have different {noun}{order}: missing in {short}: "
        f"{_names(missing) or 'none'}; only in {short}: {_names(extra) or 'none'}; {fix}"
    )


def undecodable(files: list[str] | tuple[str, ...]) -> list[str]:
    """The files that the input pipeline's decoder rejects, in the given order.

    Decodes every file with the pipeline's own decoder (``kfor1.images.decode_bytes``) in a
    parallel tf.data pipeline, so what passes here also passes in training.
    """
    if not files:
        return []
    paths = tf.data.Dataset.from_tensor_slices(list(files))
    ok = paths.map(
        lambda path: (path, tf.shape(decode_example({"path": path, "label": 0})["image"])),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    ).ignore_errors()
    readable: set[str] = set()
    for batch in ok.map(lambda path, _: path).batch(4096).as_numpy_iterator():
        readable.update(path.decode() for path in batch)
    return [path for path in files if path not in readable]


def validate_folder(path: str | os.PathLike, split: str) -> list[str]:
    """Files of ``path/split`` that cannot be decoded (empty, truncated, not an image).

    About 1 s for 25,000 small JPEGs on two CPU cores; decoding dominates, so folders of large
    photos take longer. Raises ``DataError`` for a malformed layout.
    """
    return undecodable(list_split(path, split).files)


def load_folder(
    path: str | os.PathLike,
    split: str,
    *,
    name: str,
    seed: int = 0,
    check_images: bool = True,
    skip_bad_images: bool = False,
    decode: bool = True,
    class_names: tuple[str, ...] | None = None,
) -> tuple[tf.data.Dataset, DatasetInfo]:
    """An ImageFolder split as ``{"image", "label"}`` (or ``{"path", "label"}`` undecoded).

    Both splits are listed, and must have the same class folders, unless ``class_names`` (a
    trained run's classes) is given: then only ``split`` is read, and its classes must be those.

    A listing is sorted by class, so both splits come permuted: the train split by ``seed`` (a
    finite shuffle buffer would not mix a sorted listing), the test split by a fixed permutation,
    so that its first N images (``config.max_eval_examples``) cover every class and are the
    same N in every run. With ``check_images`` every file of the split is decoded once up front and
    undecodable ones are reported as a ``DataError`` — or, with ``skip_bad_images``, left out of
    the listing and named in ``DatasetInfo.skipped`` (so that every run of the folder sees the
    same files, and resumes stay exact). Without ``check_images`` they surface when read, and
    the input pipeline skips them with a warning.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    root = Path(path).expanduser()
    chosen = list_split(root, split)
    if class_names is None and split == "validation":
        class_names = list_split(root, "train").class_names
    if class_names is None:
        other = list_split(root, "test" if split == "train" else "train")
        train, test = (chosen, other) if split == "train" else (other, chosen)
        check_classes(test.class_names, train.class_names, where=f"{root}/test", short="test",
                      against=f"{root}/train", fix="both splits need the same class folders")
        class_names = train.class_names
        sizes = {"train": len(train.files), "test": len(test.files)}
    else:
        if split == "validation":
            check_classes(chosen.class_names, tuple(class_names),
                          where=str(Path(chosen.files[0]).parent.parent), short="validation",
                          against="the train split",
                          fix="the validation folder needs a folder of images for every class "
                          "of train")
        check_classes(chosen.class_names, tuple(class_names), where=f"{root}/{split}",
                      short=split, against="the run's classes",
                      fix="restore the class folders the run was trained on")
        sizes = {split: len(chosen.files)}
    bad: list[str] = undecodable(chosen.files) if check_images else []
    if bad and not skip_bad_images:
        raise DataError(
            f"{len(bad)} of {len(chosen.files)} {split} images in {root} cannot be decoded: "
            f"{_names(bad)}; remove or re-encode them, or set config.skip_bad_images=True "
            "(--config.skip_bad_images=true) to train without them"
        )
    dropped = set(bad)
    keep = [i for i, f in enumerate(chosen.files) if f not in dropped]
    if not keep:
        raise DataError(f"none of the {len(chosen.files)} {split} images in {root} can be "
                        f"decoded ({_names(bad)}); re-encode them")
    files = np.asarray(chosen.files)[keep]
    labels = np.asarray(chosen.labels, dtype=np.int64)[keep]
    if dropped:
        sizes[split] = len(files)
    order = np.random.default_rng(seed if split == "train" else 0).permutation(len(files))
    files, labels = files[order], labels[order]
    ds = tf.data.Dataset.from_tensor_slices({"path": files, "label": labels})
    if decode:
        ds = ds.map(decode_example, num_parallel_calls=tf.data.AUTOTUNE)
    info = DatasetInfo(
        name=name,
        num_classes=len(class_names),
        class_names=tuple(class_names),
        num_examples=sizes,
        skipped={split: tuple(bad)} if bad else {},
    )
    return ds, info
