"""How big a patch is: parameter counts and bytes per label group, and the cost of K tasks."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from kfor1.patch.spec import SHARED, is_patch, partition, stats_labels
from kfor1.table import format_table
from kfor1.tree import flatten


@dataclasses.dataclass(frozen=True)
class GroupSize:
    label: str
    leaves: int
    parameters: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class PatchReport:
    """Plain-data summary; ``str()`` renders it as a table.

    Attributes:
      groups: one ``GroupSize`` per label (``label``, ``leaves``, ``parameters``, ``bytes``),
        patch groups first, ``"shared"`` last.
      total_parameters: the model's parameters (BatchNorm statistics not counted).
      patch_parameters: the parameters one task's patch holds.
      patch_bytes: their bytes.
      patch_stat_parameters: the BatchNorm statistics each task holds beside its patch.

    Example:
      >>> r = kfor1.report(base.variables, labels, "scale_bias+logits")
      >>> r.patch_fraction  # p, the patch's share of the model
      >>> r.cost_of_tasks(10)  # ten tasks, in models: (1 - p) + 10 p
      >>> print(r)  # the table
    """

    groups: tuple[GroupSize, ...]
    total_parameters: int
    patch_parameters: int
    patch_bytes: int
    patch_stat_parameters: int

    @property
    def patch_fraction(self) -> float:
        """p: the patch's share of the model's parameters."""
        return self.patch_parameters / max(self.total_parameters, 1)

    def cost_of_tasks(self, k: int) -> float:
        """Parameters of K patched tasks, in models: the shared part once, a patch per task,
        (1 - p) + K x p (a ``full`` patch: K models, as K fine-tuned copies)."""
        return (1 - self.patch_fraction) + k * self.patch_fraction

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["patch_fraction"] = self.patch_fraction
        return data

    def __str__(self) -> str:
        rows = [(g.label, g.leaves, f"{g.parameters:,}",
                 f"{100 * g.parameters / max(self.total_parameters, 1):.2f}", f"{g.bytes:,}")
                for g in self.groups]
        rows.append(("total", "", f"{self.total_parameters:,}", "100.00", ""))
        lines = [format_table(("group", "leaves", "parameters", "% of model", "bytes"), rows)]
        p = self.patch_fraction
        lines.append(
            f"patch: {self.patch_parameters:,} parameters ({100 * p:.2f}%), plus "
            f"{self.patch_stat_parameters:,} BN statistics per task; K tasks cost "
            f"{1 - p:.4f} + K x {p:.4f} models (K=10: {self.cost_of_tasks(10):.2f} instead of 10)"
        )
        return "\n".join(lines)


def report(variables: dict[str, Any], labels: dict[str, Any], spec: Any = None) -> PatchReport:
    """Counts per label group of ``partition(variables, spec[, groups=True])``; ``spec`` says
    which BatchNorm statistics are per task (``stats_labels``).

    Args:
      variables: the model's variables (``{"params": ..., "batch_stats": ...}``) or only its
        parameters (then no statistics are counted); arrays or ``jax.ShapeDtypeStruct``s.
      labels: the parameters' labels (``kfor1.partition``).
      spec: the spec the labels come from (for the ``stats`` preset); None: no ``stats``.

    Returns:
      A ``PatchReport``.

    Example:
      >>> base = kfor1.load_pretrained("efficientnet_lite0")
      >>> labels = kfor1.partition(base.variables, "scale_bias+logits", groups=True)
      >>> print(kfor1.report(base.variables, labels, "scale_bias+logits"))
    """
    params = flatten(variables.get("params", variables))
    flat_labels = flatten(labels)
    sizes: dict[str, list[int]] = {}
    for path, value in params.items():
        entry = sizes.setdefault(flat_labels[path], [0, 0, 0])
        entry[0] += 1
        entry[1] += int(np.size(value))
        entry[2] += int(np.size(value)) * np.dtype(value.dtype).itemsize
    order = sorted(sizes, key=lambda label: (label == SHARED, label))
    groups = tuple(GroupSize(label, *sizes[label]) for label in order)
    stats = variables.get("batch_stats", {}) if "params" in variables else {}
    stat_labels = flatten(stats_labels(stats, labels, spec, params=variables.get(
        "params", variables))) if stats else {}
    flat_stats = flatten(stats) if stats else {}
    return PatchReport(
        groups=groups,
        total_parameters=sum(g.parameters for g in groups),
        patch_parameters=sum(g.parameters for g in groups if is_patch(g.label)),
        patch_bytes=sum(g.bytes for g in groups if is_patch(g.label)),
        patch_stat_parameters=sum(
            int(np.size(v)) for p, v in flat_stats.items() if is_patch(stat_labels[p])
        ),
    )


def model_report(
    model: str, spec: Any, num_classes: int = 1000, head: str | None = None,
    overview: bool = False,
) -> str:
    """The patch report of ``spec`` on a registered ``model`` with ``num_classes`` outputs (and,
    with ``overview``, clu's per-parameter table), from shapes alone: no weights are loaded."""
    import jax
    import jax.numpy as jnp

    from kfor1.models import create

    module = create(model, num_classes=num_classes)
    variables = jax.eval_shape(
        lambda x: module.init(jax.random.key(0), x),
        jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
    )
    text = str(report(variables, partition(variables, spec, groups=True, head=head), spec))
    if overview:
        from clu import parameter_overview

        table = parameter_overview.get_parameter_overview(variables["params"], include_stats=False)
        text = table + "\n\n" + text
    return text
