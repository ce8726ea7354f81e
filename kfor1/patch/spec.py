"""Patch specs: which parameters of a pretrained model a task owns (its *patch*).

Every parameter leaf gets a label: ``"shared"`` (one copy, frozen or jointly trained) or a patch
label (one copy per task). Patch labels are ``"patch"``, or, with ``groups=True``, the name of
the preset that claimed the leaf (``"scale_bias"``, ``"logits"``...), so each group can get its
own optimiser and learning rate. A leaf two presets select goes to the more specific one (in
``PRESETS`` order: the head's bias is ``logits`` in ``bias+logits`` and in ``logits+bias``).

BatchNorm *statistics* are labelled apart (``stats_labels``): a BN layer's moving mean and
variance belong to the patch when its scale or bias does, or, with the ``stats`` preset, for every
BN layer. ``stats`` is AdaBN (Li et al., 2016): each task re-estimates the statistics on its own
data, no parameter of the backbone is trained and no gradient flows through it. ``input_stats``
re-estimates only the input's: the BatchNorm after the convolution over the image, which is where
a task's colour and contrast statistics enter the network (``input_batchnorm``). Both own
statistics only; with ``logits`` they are the cheapest patches there are.

Presets work on any Flax linen model: BatchNorm parameters are found through their matching
``batch_stats`` entries, depthwise kernels by their ``(kh, kw, 1, C)`` shape, and the head as
the last Dense layer (the last module with a 2-D kernel; override with ``head=``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from kfor1.errors import UserError
from kfor1.tree import Flat, flatten, leaf_name, module_path, unflatten

SHARED = "shared"
PATCH = "patch"
STATS_ONLY = ("stats", "input_stats")  # Presets that own BatchNorm statistics, no parameter.
PRESETS = ("logits", "scale_bias", "depthwise", "bias", "full", "stats", "input_stats", "none")
"""The patch presets, joined with ``+`` in a spec: ``logits`` (the head), ``scale_bias``
(BatchNorm scales and biases, with their statistics), ``depthwise`` (depthwise kernels),
``bias`` (every bias), ``full`` (everything), ``stats`` (every BatchNorm layer's statistics, no
parameter: AdaBN), ``input_stats`` (the statistics of the BatchNorm after the convolution over
the image only), ``none``.

Example:
    >>> kfor1.partition(variables, "scale_bias+logits")  # a spec of two presets
"""


class PatchSpecError(UserError, ValueError):
    """A patch spec that cannot be applied to a model, with what to change.

    A ``UserError`` and a ``ValueError``; ``partition`` and ``PatchSpec.parse`` raise it.

    Args:
      *args: the message (what is wrong, and what to write instead).

    Example:
      >>> try:
      ...     kfor1.partition(variables, "scale_bias+head")
      ... except kfor1.PatchSpecError as e:
      ...     print(e)  # unknown patch preset 'head'; use one of logits, scale_bias, ...
    """


def is_patch(label: str) -> bool:
    return label != SHARED


@dataclasses.dataclass(frozen=True)
class PatchSpec:
    """Presets joined by '+' (``"scale_bias+logits"``), or ordered ``(regex, label)`` rules.

    Rules are matched with ``re.fullmatch`` against ``a/b/c`` parameter paths; the first rule
    that matches a leaf labels it; labels are ``"shared"``, ``"patch"`` or ``"patch:<group>"``.

    Build one with ``PatchSpec.parse`` (a preset string or a list of rules) or
    ``PatchSpec.from_text`` (a command line's text); every function that takes a ``spec``
    accepts any of these forms.

    Attributes:
      presets: the presets (``PRESETS``), in the order they claim leaves; empty with rules.
      rules: ``(regex, label)`` pairs, tried in order; empty with presets.
      head: the classifier's module path for ``logits``; None: the last Dense layer.

    Example:
      >>> kfor1.PatchSpec.parse("scale_bias+logits").presets
      ('scale_bias', 'logits')
      >>> rules = kfor1.PatchSpec.parse([("head/.*", "patch:head"), (".*", "shared")])
      >>> labels = kfor1.partition(variables, rules, groups=True)  # head leaves: "head"
    """

    presets: tuple[str, ...] = ()
    rules: tuple[tuple[str, str], ...] = ()
    head: str | None = None

    @classmethod
    def parse(cls, spec: Any, head: str | None = None) -> PatchSpec:
        if isinstance(spec, PatchSpec):
            return spec if head is None else dataclasses.replace(spec, head=head)
        if isinstance(spec, str):
            presets = tuple(p.strip() for p in spec.split("+") if p.strip())
            unknown = [p for p in presets if p not in PRESETS]
            if unknown or not presets:
                raise PatchSpecError(
                    f"unknown patch preset {unknown[0] if unknown else spec!r}; use one of "
                    f"{', '.join(PRESETS)}, joined with '+' (e.g. 'scale_bias+logits'), or a "
                    "list of (regex, label) rules"
                )
            return cls(presets=presets, head=head)
        if isinstance(spec, Sequence) and all(
            isinstance(r, Sequence) and not isinstance(r, str) and len(r) == 2 for r in spec
        ):
            rules = tuple((str(p), str(lab)) for p, lab in spec)
            for pattern, label in rules:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise PatchSpecError(
                        f"malformed regex {pattern!r} in patch rules: {e}"
                    ) from None
                # 'patch:shared' would become the group 'shared', i.e. frozen, with groups=True.
                if label == f"{PATCH}:{SHARED}" or (
                    label not in (SHARED, PATCH) and not re.fullmatch(r"patch:\w+", label)
                ):
                    raise PatchSpecError(
                        f"rule ({pattern!r}, {label!r}): the label must be 'shared', 'patch' or "
                        "'patch:<group>' (a group other than 'shared')"
                    )
            if not rules:
                raise PatchSpecError("empty list of patch rules; give at least one (regex, label)")
            return cls(rules=rules, head=head)
        raise PatchSpecError(
            f"a patch spec is a preset string like 'scale_bias+logits' or a list of "
            f"(regex, label) pairs, got {spec!r}"
        )

    @classmethod
    def from_text(cls, text: str, head: str | None = None) -> PatchSpec:
        """A spec typed on a command line: presets (``scale_bias+logits``) or rules as a JSON
        list (``'[["head/.*", "patch"], [".*", "shared"]]'``)."""
        if text.lstrip().startswith("["):
            try:
                rules = json.loads(text)
            except json.JSONDecodeError as e:
                raise PatchSpecError(f"patch rules {text!r} are not a JSON list of [regex, "
                                     f"label] pairs ({e})") from None
            return cls.parse(rules, head=head)
        return cls.parse(text, head=head)

    @property
    def owns_all_stats(self) -> bool:
        """True with the ``stats`` preset: every BatchNorm layer's statistics are per task."""
        return "stats" in self.presets

    @property
    def estimates_stats(self) -> bool:
        """True with ``stats`` or ``input_stats``: statistics the patch owns without owning
        their layer's scale and bias, so they are estimated on the task's images before
        training (``kfor1.trainer.adabn``) rather than followed during it."""
        return bool(set(STATS_ONLY) & set(self.presets))

    def describe(self) -> str | list[list[str]]:
        """JSON-friendly form, stored with exported patches."""
        return "+".join(self.presets) if self.presets else [list(r) for r in self.rules]


def batchnorm_modules(params: Flat, batch_stats: Flat | None) -> set[str]:
    """Module paths of BatchNorm layers: those with ``batch_stats`` (or, without statistics,
    modules whose only parameters are 1-D ``scale`` and ``bias``)."""
    if batch_stats is not None:
        return {module_path(p) for p in batch_stats}
    by_module: dict[str, dict[str, Any]] = {}
    for path, value in params.items():
        by_module.setdefault(module_path(path), {})[leaf_name(path)] = value
    return {
        m for m, leaves in by_module.items()
        if set(leaves) == {"scale", "bias"} and all(np.ndim(v) == 1 for v in leaves.values())
    }


def _dense_modules(params: Flat) -> list[str]:
    return [module_path(p) for p in params if leaf_name(p) == "kernel" and np.ndim(params[p]) == 2]


def head_module(params: Flat, head: str | None = None) -> str:
    """The classifier: ``head`` if given, else the last module with a 2-D ``kernel``."""
    if head is not None:
        head = head.strip("/")
        if not any(module_path(p) == head for p in params):
            raise PatchSpecError(
                f"head {head!r} is not a module of this model; Dense layers are: "
                f"{_dense_modules(params)}"
            )
        return head
    dense = _dense_modules(params)
    if not dense:
        raise PatchSpecError(
            "the model has no Dense layer (2-D 'kernel'), so the 'logits' preset has no head; "
            "pass head='<module path>' or use rules"
        )
    return dense[-1]


def _preset_selectors(
    presets: Sequence[str], params: Flat, batch_stats: Flat | None, head: str | None
) -> dict[str, Callable[[str], bool]]:
    bn = batchnorm_modules(params, batch_stats)
    classifier = head_module(params, head) if "logits" in presets else None
    selectors: dict[str, Callable[[str], bool]] = {
        "scale_bias": lambda p: module_path(p) in bn and leaf_name(p) in ("scale", "bias"),
        "depthwise": lambda p: (
            np.ndim(params[p]) == 4
            and np.shape(params[p])[2] == 1
            and np.shape(params[p])[0] * np.shape(params[p])[1] > 1
        ),
        "bias": lambda p: leaf_name(p) == "bias",
        "full": lambda p: True,
        "none": lambda p: False,
        "stats": lambda p: False,  # BN statistics only: see stats_labels.
        "input_stats": lambda p: False,
        "logits": lambda p: module_path(p) == classifier,
    }
    return selectors


def partition(
    params: Mapping[str, Any],
    spec: Any,
    *,
    batch_stats: Mapping[str, Any] | None = None,
    head: str | None = None,
    groups: bool = False,
) -> dict[str, Any]:
    """Labels every parameter leaf ``"shared"`` or as patch; returns a tree like ``params``.

    ``params`` may be the full variables dict (``{"params": ..., "batch_stats": ...}``), from
    which BatchNorm layers are recognised. With ``groups=True`` patch leaves are labelled by
    the preset (or ``patch:<group>`` rule) that claimed them, for per-group learning rates.

    Args:
      params: the parameter tree, or the full variables (then ``batch_stats`` is read there).
      spec: a preset string (``"scale_bias+logits"``), ``(regex, label)`` rules or a
        ``PatchSpec``.
      batch_stats: the BatchNorm statistics, which mark BatchNorm layers; None: layers whose
        only parameters are 1-D ``scale`` and ``bias``.
      head: the classifier's module path for ``logits``; None: the last Dense layer.
      groups: label patch leaves by group (``"scale_bias"``, ``"logits"``) instead of
        ``"patch"``.

    Returns:
      A tree shaped like the parameters with one string label per leaf.

    Raises:
      PatchSpecError: an unknown preset, a rule that matches nothing, a leaf no rule covers.

    Example:
      >>> base = kfor1.load_pretrained("efficientnet_lite0")
      >>> labels = kfor1.partition(base.variables, "scale_bias+logits", groups=True)
      >>> labels["head"]["logits"]["kernel"], labels["stem"]["conv"]["kernel"]
      ('logits', 'shared')
    """
    if "params" in params and isinstance(params["params"], Mapping):
        batch_stats = params.get("batch_stats", batch_stats)
        params = params["params"]
    spec = PatchSpec.parse(spec, head)
    flat = flatten(params)
    stats = flatten(batch_stats) if batch_stats is not None else None
    labels: dict[str, str] = {}
    if "input_stats" in spec.presets:  # Refused here, before anything is built on the labels.
        if stats is None:
            raise PatchSpecError("input_stats needs the model's BatchNorm statistics; pass the "
                                 "full variables ({'params': ..., 'batch_stats': ...})")
        input_batchnorm(params, stats)
    if spec.presets:
        selectors = _preset_selectors(spec.presets, flat, stats, spec.head)
        by_priority = sorted(spec.presets, key=PRESETS.index)  # A spec is a set (see above).
        for path in flat:
            label = SHARED
            for preset in by_priority:
                if selectors[preset](path):
                    label = preset if groups else PATCH
                    break
            labels[path] = label
    else:
        used = [False] * len(spec.rules)
        uncovered = []
        for path in flat:
            for i, (pattern, label) in enumerate(spec.rules):
                if re.fullmatch(pattern, path):
                    used[i] = True
                    if label.startswith("patch:"):
                        label = label.split(":", 1)[1] if groups else PATCH
                    labels[path] = label
                    break
            else:
                uncovered.append(path)
        if uncovered:
            raise PatchSpecError(
                f"{len(uncovered)} parameters match no rule, e.g. {uncovered[:3]}; add a "
                "catch-all rule such as ('.*', 'shared') at the end"
            )
        unused = [spec.rules[i][0] for i, u in enumerate(used) if not u]
        if unused:
            # The model's own paths nearest the rule (a typo's), else its first ones.
            like = difflib.get_close_matches(unused[0], list(flat), n=2, cutoff=0.3)
            like = like or list(flat)[:2]
            raise PatchSpecError(
                f"patch rule {unused[0]!r} matches no parameter (or only ones an earlier rule "
                f"took); this model's paths look like {', '.join(map(repr, like))}"
            )
    return unflatten(labels)


def input_batchnorm(params: Mapping[str, Any], batch_stats: Mapping[str, Any]) -> str:
    """The module path of the BatchNorm that normalises the convolution over the image.

    That convolution is the one 4-D kernel with 2 to 4 input channels (RGB, RGBA) and more
    than one output channel. (A grayscale model's stem, one input channel, has the shape of a
    depthwise kernel and is not told apart from them: such a model is refused.) Its
    BatchNorm is the one BatchNorm layer in the same module (``stem/conv`` -> ``stem/bn``, as in
    kfor1's models). Its input depends on the image alone, so its statistics are the task's
    colour and contrast statistics as the network sees them. A model whose layers all sit in one
    module is refused rather than guessed at: nothing in the variables says which of its
    BatchNorm layers comes first.

    Args:
      params: the parameter tree.
      batch_stats: the BatchNorm statistics.

    Returns:
      The module path, e.g. ``"stem/bn"``.

    Raises:
      PatchSpecError: no such convolution, several, or no BatchNorm beside it.

    Example:
      >>> kfor1.patch.spec.input_batchnorm(base.variables["params"], base.variables["batch_stats"])
      'stem/bn'
    """
    flat = flatten(params)
    convs = [p for p, v in flat.items() if leaf_name(p) == "kernel" and np.ndim(v) == 4
             and 1 < np.shape(v)[2] <= 4 and np.shape(v)[3] > 1]
    if len(convs) != 1:
        raise PatchSpecError(
            f"input_stats needs the one convolution over the image (a 4-D kernel with 2 to 4 "
            f"input channels); this model has {len(convs)} ({convs[:3]}); use 'stats' or "
            "scale_bias rules instead")
    parent = module_path(module_path(convs[0]))
    beside = [m for m in dict.fromkeys(module_path(p) for p in flatten(batch_stats))
              if module_path(m) == parent]
    if len(beside) != 1:
        raise PatchSpecError(
            f"input_stats needs one BatchNorm beside the convolution over the image, "
            f"{module_path(convs[0])!r}, in its module {parent or '(the top level)'!r}; it has "
            f"{len(beside)} ({sorted(beside)[:3]}); put that convolution and its BatchNorm in a "
            "module of their own (a stem), or use 'stats'")
    return beside[0]


def stats_labels(
    batch_stats: Mapping[str, Any], labels: Mapping[str, Any], spec: Any = None,
    params: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Labels of the BatchNorm statistics, a tree like ``batch_stats``.

    A BN layer's statistics belong to the patch when its scale or bias does (the scale-and-bias
    patch owns its moving statistics), every layer's do when ``spec`` has the ``stats`` preset
    (AdaBN), and the input's BatchNorm's do with ``input_stats`` (``input_batchnorm``). Patch
    statistics are re-estimated on each task's data during training.

    Args:
      batch_stats: the model's BatchNorm statistics (``variables["batch_stats"]``).
      labels: the parameters' labels (``partition``).
      spec: the patch spec; only its ``stats`` and ``input_stats`` presets matter here. None:
        neither.
      params: the parameters, which ``input_stats`` needs to find the input's BatchNorm.

    Returns:
      A tree shaped like ``batch_stats``: ``"patch"`` (per task) or ``"shared"`` per leaf.

    Example:
      >>> labels = kfor1.partition(base.variables, "logits")
      >>> stats = kfor1.stats_labels(base.variables["batch_stats"], labels, "stats+logits")
      >>> stats["stem"]["bn"]["mean"]  # with "logits" alone: 'shared'
      'patch'
    """
    spec = PatchSpec.parse(spec) if spec is not None else None
    own_all = spec is not None and spec.owns_all_stats
    flat_labels = flatten(labels)
    patched = {module_path(p) for p, label in flat_labels.items() if is_patch(label)}
    if spec is not None and "input_stats" in spec.presets:
        if params is None:
            raise ValueError("stats_labels needs params= to find the input_stats BatchNorm")
        patched.add(input_batchnorm(params, batch_stats))
    return unflatten({
        p: (PATCH if own_all or module_path(p) in patched else SHARED)
        for p in flatten(batch_stats)
    })
