"""How big a patch is: parameter counts and bytes per label group, and the cost of K tasks."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from kfor1.spec import SHARED, flatten, is_patch, stats_labels


@dataclasses.dataclass(frozen=True)
class GroupSize:
    label: str
    leaves: int
    parameters: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class PatchReport:
    """Plain-data summary; ``str()`` renders it as a table."""

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
        """Parameters of K patched tasks, in models: 1 + K x p (the shared base stored once)."""
        return 1 + k * self.patch_fraction

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["patch_fraction"] = self.patch_fraction
        return data

    def __str__(self) -> str:
        rows = [("group", "leaves", "parameters", "% of model", "bytes")]
        for g in self.groups:
            rows.append((
                g.label, str(g.leaves), f"{g.parameters:,}",
                f"{100 * g.parameters / max(self.total_parameters, 1):.2f}", f"{g.bytes:,}",
            ))
        rows.append(("total", "", f"{self.total_parameters:,}", "100.00", ""))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                           enumerate(zip(row, widths))) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        p = self.patch_fraction
        lines.append(
            f"patch: {self.patch_parameters:,} parameters ({100 * p:.2f}%), plus "
            f"{self.patch_stat_parameters:,} BN statistics per task; K tasks cost 1 + K x "
            f"{p:.4f} models (K=10: {self.cost_of_tasks(10):.2f} instead of 10)"
        )
        return "\n".join(lines)


def report(variables: dict[str, Any], labels: dict[str, Any]) -> PatchReport:
    """Counts per label group of ``partition(variables, spec[, groups=True])``."""
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
    stat_labels = flatten(stats_labels(stats, labels)) if stats else {}
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
