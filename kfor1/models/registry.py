"""Model registry: names to architectures, with each model's input preprocessing.

kfor1's own models are registered here; a user's Flax model joins them with ``register`` (from
a library) or by naming its factory in a config, ``model="package.module:factory"`` (from a
config file or the command line), so it trains, exports and serves like a built-in one.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import numpy as np

from kfor1.errors import UserError
from kfor1.models.efficientnet_lite import VARIANTS, efficientnet_lite
from kfor1.models.mobilenet_v2 import mobilenet_v2


class UnknownModelError(UserError, ValueError):
    """A model name that is neither registered nor an importable ``module:factory``."""


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a model expects its pixels: ``(x - mean) / std`` on 0..255 values, at ``resolution``.

    ``crop_fraction`` is the evaluation centre crop: resize the shorter side to
    ``resolution / crop_fraction``, then crop ``resolution`` pixels from the centre.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resolution: int
    crop_fraction: float = 0.875

    def normalize(self, images: Any) -> Any:
        """Maps uint8 (or 0..255 float) NHWC images to the model's input range, as float32."""
        xp = np if isinstance(images, np.ndarray) else _jnp()
        images = xp.asarray(images, dtype=xp.float32)
        if images.shape[-1:] != (3,):
            raise ValueError(
                f"expected NHWC images (channels last, 3 channels), got shape {images.shape}; "
                "transpose NCHW arrays with x.transpose(0, 2, 3, 1)"
            )
        return (images - xp.asarray(self.mean, xp.float32)) / xp.asarray(self.std, xp.float32)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(
            mean=tuple(data["mean"]), std=tuple(data["std"]), resolution=int(data["resolution"]),
            crop_fraction=float(data.get("crop_fraction", 0.875)),
        )


def _jnp():
    import jax.numpy as jnp

    return jnp


# EfficientNet-Lite was trained on (x - 127) / 128; Keras MobileNetV2 on x / 127.5 - 1;
# torchvision on ImageNet mean/std.
LITE_PREPROCESSING = (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)
KERAS_PREPROCESSING = (127.5, 127.5, 127.5), (127.5, 127.5, 127.5)
TORCHVISION_PREPROCESSING = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


# The smallest input kfor1 trains or serves: below it a stride-32 network has no spatial extent
# worth the name (and 1x1 "images" train to nonsense silently).
MIN_RESOLUTION = 16

# A user model without a preprocessing of its own is fed pixels scaled to [-1, 1], at 224 px.
DEFAULT_PREPROCESSING = Preprocessing(*KERAS_PREPROCESSING, resolution=224)


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A registered architecture: how to build it and what its inputs look like.

    ``load`` (user models only) returns the model's pretrained variables, as
    ``load(model, path)`` with ``path`` the weights file of ``--weights`` or None; a user model
    without ``load`` starts from its own seeded initialisation. ``user`` marks models that
    kfor1 does not define (they take only the model options their factory accepts).
    """

    name: str
    build: Callable[..., nn.Module]
    preprocessing: Preprocessing
    description: str
    load: Callable[[nn.Module, str | None], Any] | None = None
    user: bool = False

    def accepts(self, option: str) -> bool:
        """Whether ``build`` takes the keyword ``option`` (or any keyword)."""
        try:
            parameters = inspect.signature(self.build).parameters.values()
        except (TypeError, ValueError):
            return True
        return any(p.kind is p.VAR_KEYWORD or p.name == option for p in parameters)


def _entries() -> dict[str, ModelEntry]:
    entries = {}
    for variant, (_, _, resolution, _) in VARIANTS.items():
        name = f"efficientnet_lite{variant}"
        entries[name] = ModelEntry(
            name,
            functools.partial(efficientnet_lite, variant),
            Preprocessing(*LITE_PREPROCESSING, resolution=resolution),
            f"EfficientNet-Lite{variant} ({resolution} px)",
        )
    for width in (0.35, 0.5, 0.75, 1.0, 1.3, 1.4):
        suffix = "" if width == 1.0 else f"_{int(round(width * 100)):03d}"
        name = f"mobilenet_v2{suffix}"
        entries[name] = ModelEntry(
            name,
            functools.partial(mobilenet_v2, width),
            Preprocessing(*KERAS_PREPROCESSING, resolution=224),
            f"MobileNetV2, width {width} (Keras flavour; torchvision weights switch it)",
        )
    return entries


MODELS: dict[str, ModelEntry] = _entries()
# The one registry a process has (as flax's and tfds's): ``register`` adds to it.
_USER_MODELS: dict[str, ModelEntry] = {}


def register(
    name: str,
    create_fn: Callable[..., nn.Module],
    load_fn: Callable[[nn.Module, str | None], Any] | None = None,
    preprocessing: Preprocessing | dict[str, Any] | None = None,
    *,
    description: str = "",
) -> ModelEntry:
    """Makes a Flax model that kfor1 does not define usable by name, in configs and the CLI.

    The model must take images NHWC, have a ``num_classes`` field (its head's width: tasks get
    heads of their own size), a ``train`` keyword in ``__call__`` (BatchNorm on batch
    statistics, dropout on) and keep BatchNorm statistics in ``batch_stats``; the presets then
    find its BatchNorm layers, depthwise kernels and head (the last Dense layer).

    Args:
      name: the name configs use (``config.model``); kfor1's own names cannot be replaced.
      create_fn: ``create_fn(num_classes=..., **options) -> nn.Module``; options it accepts
        (``dtype``, ``dropout_rate``, ``bn_momentum``, ``conv_impl``) are set from the config.
      load_fn: ``load_fn(model, path) -> variables`` with the pretrained weights (``path``:
        the ``weights`` file given, or None); None starts from ``model.init`` with seed 0.
      preprocessing: how the model wants its pixels (default: [-1, 1] at 224 px).
      description: one line for reports.

    Returns:
      The entry.

    Example::

      kfor1.models.register("my_net", MyNet, preprocessing=kfor1.models.Preprocessing(
          mean=(127.5,) * 3, std=(127.5,) * 3, resolution=96))
      config.model = "my_net"
    """
    if not isinstance(name, str) or not name or name in MODELS:
        raise ValueError(f"cannot register a model as {name!r}: use a new, non-empty name "
                         f"(kfor1's own are {', '.join(available_models())})")
    if not callable(create_fn) or (load_fn is not None and not callable(load_fn)):
        raise TypeError(f"register({name!r}, ...): create_fn and load_fn must be callables")
    if isinstance(preprocessing, dict):
        preprocessing = Preprocessing.from_dict(preprocessing)
    preprocessing = preprocessing or getattr(create_fn, "preprocessing", DEFAULT_PREPROCESSING)
    if not isinstance(preprocessing, Preprocessing):
        raise TypeError(f"register({name!r}, ...): preprocessing must be a "
                        "kfor1.models.Preprocessing or its dict")
    entry = ModelEntry(name, create_fn, preprocessing,
                       description or f"user model {name}", load_fn, user=True)
    _USER_MODELS[name] = entry
    return entry


def _import(module_name: str, name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not module_name.startswith(e.name):
            raise  # The module exists; something it imports does not.
    # As `python -m` and uvicorn do: a module beside where the command runs is importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is None or not module_name.startswith(e.name):
                raise
    raise UnknownModelError(
        f"model {name!r}: no module {module_name!r} to import; run from the directory that "
        "holds it or add that directory to PYTHONPATH"
    )


def _resolve(name: str) -> ModelEntry:
    """``"package.module:factory"``: imports the module, then takes ``factory`` (a create
    function, a ``ModelEntry``, or a name the module registered)."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise UnknownModelError(f"model {name!r}: write a user model as 'package.module:factory'")
    module = _import(module_name, name)
    obj = getattr(module, attr, None)
    if obj is None:
        if attr in _USER_MODELS:
            return dataclasses.replace(_USER_MODELS[attr], name=name)
        raise UnknownModelError(f"model {name!r}: module {module_name} has no {attr!r}")
    if isinstance(obj, ModelEntry):
        return dataclasses.replace(obj, name=name)
    if not callable(obj):
        raise UnknownModelError(f"model {name!r}: {attr} is a {type(obj).__name__}, not a "
                                "function that returns a Flax module")
    preprocessing = getattr(obj, "preprocessing", DEFAULT_PREPROCESSING)
    if isinstance(preprocessing, dict):
        preprocessing = Preprocessing.from_dict(preprocessing)
    return ModelEntry(name, obj, preprocessing, f"user model {name}",
                      getattr(obj, "load", None), user=True)


def check_named_by_file(name: Any, what: str, named_by_user: str | None = None) -> str:
    """The model a file names (a patch's ``base.model``, a base's or a run's ``model``), if it
    may be loaded: kfor1's own or registered in this process; a user model (``module:factory``)
    only when the user names the same one themselves (``named_by_user``: ``--model``,
    ``model=``).

    Why: files are shared and downloaded. A patch whose ``base.model`` is ``"evil:run"``,
    unpacked beside an ``evil.py`` (the working directory is on the import path), would
    otherwise run that file; ``"os:abort"`` would kill the process and ``"builtins:input"`` hang
    it. kfor1 imports a module only because a person named it, never because a file did.

    Args:
      name: the model name the file records.
      what: how the message names the file (``"patch runs/a/patches/x (patch.json)"``).
      named_by_user: the model the user named for this file, or None.

    Returns:
      ``name``, safe to pass to ``get_entry`` / ``load_pretrained``.

    Raises:
      UnknownModelError: ``name`` is not a string, or names a user model the user did not
        name, or the user named another model than the file records.

    Example:
      >>> check_named_by_file("efficientnet_lite0", "patch.json")
      'efficientnet_lite0'
    """
    if not isinstance(name, str) or not name:
        raise UnknownModelError(f"{what} names no model ({name!r})")
    if named_by_user is not None:
        if named_by_user != name:
            raise UnknownModelError(
                f"{what} records model {name!r}, not {named_by_user!r} (--model, model=); name "
                "the model it records, or leave it out for kfor1's own models")
        return name
    if name in MODELS or name in _USER_MODELS:
        return name
    raise UnknownModelError(
        f"{what} names the user model {name!r}, and kfor1 never imports code because a file "
        f"names it; if you trust it, name it yourself (--model {name}, or model={name!r} in "
        "the API) or kfor1.models.register it first")


def available_models() -> list[str]:
    return sorted(MODELS) + sorted(_USER_MODELS)


def get_entry(name: str) -> ModelEntry:
    """The entry of a kfor1 model, a registered user model or a ``module:factory``."""
    if not isinstance(name, str):
        raise UnknownModelError(f"model must be a name, got {type(name).__name__}")
    if name in MODELS:
        return MODELS[name]
    if name in _USER_MODELS:
        return _USER_MODELS[name]
    if ":" in name:
        return _resolve(name)
    raise UnknownModelError(
        f"unknown model {name!r}; known models: {', '.join(available_models())} (or a user "
        "model as 'package.module:factory')"
    )


def create(name: str, num_classes: int | None = 1000, **kwargs: Any) -> nn.Module:
    """Builds a registered model (random weights); ``num_classes=None`` keeps a user model's own
    head width.

    The architecture alone, for training from scratch or checking shapes: ``model.init`` makes
    its variables; ``load_pretrained`` builds the same module with its ImageNet weights.

    Args:
      name: a name of ``available_models()`` (``"efficientnet_lite0"`` to
        ``"efficientnet_lite4"``, ``"mobilenet_v2"``, ``"mobilenet_v2_035"``, ...), a user
        model that ``register`` added, or ``"package.module:factory"``.
      num_classes: the head's width (kfor1's models: 0 returns the pooled features instead of
        logits); None: a user model's own width, 1000 for kfor1's models.
      **kwargs: model fields the factory takes, such as ``dtype``, ``dropout_rate``,
        ``bn_momentum`` or ``conv_impl`` (``"auto"``, ``"xla"``, ``"fast_cpu"``,
        ``"portable"``); MobileNetV2 also ``flavor`` (``"keras"`` or ``"torchvision"``).

    Returns:
      The unbound ``flax.linen`` module (an ``InvertedResidualNet`` for kfor1's models): it maps
      normalised float32 images ``(N, H, W, 3)`` to logits ``(N, num_classes)``, with
      ``train=True`` on batch statistics and dropout.

    Raises:
      UnknownModelError: ``name`` is not a model, or a user model's factory cannot take these
        arguments or returns no Flax module with a ``num_classes`` field.

    Example:
      >>> model = kfor1.create("efficientnet_lite0", num_classes=10)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
      >>> sorted(variables)
      ['batch_stats', 'params']
      >>> model.apply(variables, jnp.zeros((2, 224, 224, 3))).shape
      (2, 10)
      >>> kfor1.create("mobilenet_v2_050", dtype=jnp.bfloat16).num_classes
      1000
    """
    entry = get_entry(name)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    elif not entry.user:
        kwargs["num_classes"] = 1000
    try:
        module = entry.build(**kwargs)
    except TypeError as e:
        if not entry.user:
            raise
        raise UnknownModelError(f"model {name!r}: its factory cannot be called with "
                                f"{', '.join(kwargs) or 'no arguments'}: {e}") from None
    if not isinstance(module, nn.Module) or not hasattr(module, "num_classes"):
        raise UnknownModelError(
            f"model {name!r}: its factory returned a {type(module).__name__}; it must return a "
            "Flax module with a num_classes field (tasks get heads of their own width)"
        )
    return module


def unregister(name: str) -> None:
    """Removes a user model ``register`` added (tests, notebooks that re-run a cell)."""
    _USER_MODELS.pop(name, None)
