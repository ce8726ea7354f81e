"""What a sweep found, for people: the Pareto front of accuracy against trainable parameters,
the recommendation in one sentence, ``sweep.md`` and ``sweep.png``.

Choices are made on the validation split (the front and the recommendation use validation
accuracy); the test accuracy of each chosen run is reported beside it, never used to choose.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from kfor1.files.atomic import atomic_write
from kfor1.table import markdown_table

Row = Mapping[str, Any]


def pareto_front(chosen: Sequence[Row]) -> list[str]:
    """The patches no other patch beats with as few trainable parameters: for each, no other
    has at most its parameters and a higher validation accuracy (or the same accuracy with
    fewer parameters). Sorted by parameters."""
    front = []
    for r in chosen:
        dominated = any(
            o is not r
            and o["trainable_parameters"] <= r["trainable_parameters"]
            and o["val_accuracy"] >= r["val_accuracy"]
            and (o["trainable_parameters"] < r["trainable_parameters"]
                 or o["val_accuracy"] > r["val_accuracy"])
            for o in chosen
        )
        if not dominated:
            front.append(r)
    return [r["patch"] for r in sorted(front, key=lambda r: r["trainable_parameters"])]


def standard_error(accuracy: float, examples: int | None) -> float | None:
    """The standard error of an accuracy measured on ``examples`` images (binomial:
    ``sqrt(p (1 - p) / n)``); None when the count is unknown."""
    if not examples:
        return None
    return math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / examples)


def inseparable(best: Row, others: Sequence[Row]) -> list[str]:
    """The patches whose validation accuracy is within two standard errors of the difference
    (``sqrt(se_a^2 + se_b^2)``) of ``best``'s: the sweep cannot tell them apart."""
    se_best = standard_error(best["val_accuracy"], best.get("val_examples"))
    if se_best is None:
        return []
    out = []
    for r in others:
        se = standard_error(r["val_accuracy"], r.get("val_examples"))
        if r is not best and se is not None and (
                best["val_accuracy"] - r["val_accuracy"] <= 2 * math.hypot(se_best, se)):
            out.append(r["patch"])
    return out


def grid_edge(row: Row, grid: Sequence[str]) -> str | None:
    """``"lowest"`` or ``"highest"`` when ``row`` chose that end of a learning-rate ``grid``
    (its points in increasing order, two or more): the best rate may lie beyond the grid."""
    if len(grid) < 2 or row["grid_point"] not in (grid[0], grid[-1]):
        return None
    return "lowest" if row["grid_point"] == grid[0] else "highest"


def recommendation(chosen: Sequence[Row], front: Sequence[str]) -> str:
    """One sentence: the patch with the best validation accuracy (the fewest parameters among
    equals), against logits-only (or the smallest patch) when it is another patch, and the
    patches it cannot be told apart from (``inseparable``)."""
    best = max(chosen, key=lambda r: (r["val_accuracy"], -r["trainable_parameters"]))
    base = next((r for r in chosen if r["patch"] == "logits"),
                min(chosen, key=lambda r: r["trainable_parameters"]))
    ties = inseparable(best, chosen)
    caveat = (f"; not separable on validation from {', '.join(f'`{p}`' for p in ties)} "
              "(within two standard errors)" if ties else "")
    if best is base:
        return (f"`{best['patch']}`: the best validation accuracy "
                f"({100 * best['val_accuracy']:.1f}%) with the fewest parameters of the sweep "
                f"({best['percent_of_model']:.2f}% of the model){caveat}")
    gain = 100 * (best["val_accuracy"] - base["val_accuracy"])
    more = best["percent_of_model"] - base["percent_of_model"]
    return (f"`{best['patch']}`: {gain:+.1f} points over {base['patch']} on validation for "
            f"{more:+.2f}% of the parameters (test: {100 * best['test_accuracy']:.1f}% against "
            f"{100 * base['test_accuracy']:.1f}%){caveat}")


def _rates(rates: Mapping[str, float]) -> str:
    return ", ".join(f"{g} {r:.3g}" for g, r in rates.items())


def write_markdown(result: Mapping[str, Any], path: str) -> str:
    """``sweep.md``: the chosen run of each patch (front marked), then every run."""
    front = set(result["pareto"])
    chosen = sorted(result["chosen"], key=lambda r: r["trainable_parameters"])
    rows = [(
        ("★ " if r["patch"] in front else "") + f"`{r['patch']}`", _rates(r["learning_rates"]),
        f"{r['trainable_parameters']:,}", f"{r['percent_of_model']:.2f}%",
        f"{r['patch_file_bytes'] / 1024:,.1f} KiB",
        _with_error(r["val_accuracy"], r.get("val_examples")),
        _with_error(r["test_accuracy"], r.get("test_examples")),
        "" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}",
        "" if r["images_per_s"] is None else f"{r['images_per_s']:.0f}",
    ) for r in chosen]
    every = [(f"`{r['patch']}`", r["grid_point"], _rates(r["learning_rates"]),
              f"{100 * r['val_accuracy']:.2f}%", f"{r['val_loss']:.4f}")
             for r in result["runs"]]
    text = "\n".join([
        f"# kfor1 sweep: {result['task']}",
        "",
        f"**Recommendation:** {result['recommendation']}.",
        "",
        "Each patch at its learning rates chosen on the validation split; ★ marks the Pareto "
        "front (no patch with as few parameters has a higher validation accuracy). Test "
        "accuracy is of the chosen run, evaluated once at the end. ± is one standard error "
        "(binomial, from the split's size).",
        "",
        *_edge_notes(chosen, result.get("grid", [])),
        markdown_table(("patch", "learning rates", "trainable", "% of model", "patch file",
                        "val acc", "test acc", "train s", "img/s"), rows, left=2),
        "",
        "## Every run",
        "",
        markdown_table(("patch", "grid", "learning rates", "val acc", "val loss"), every,
                       left=3),
        "",
    ])
    atomic_write(path, text)
    return text


def _with_error(accuracy: float, examples: int | None) -> str:
    se = standard_error(accuracy, examples)
    return f"{100 * accuracy:.2f}%" + ("" if se is None else f" ± {100 * se:.1f}")


def _edge_notes(chosen: Sequence[Row], grid: Sequence[str]) -> list[str]:
    """A warning per patch whose chosen rate is at an end of the grid, with the grid to try."""
    notes = []
    for r in chosen:
        edge = grid_edge(r, grid)
        if edge:
            notes.append(f"- ⚠ `{r['patch']}` chose the {edge} point of the grid "
                         f"({r['grid_point']}): its best rate may lie beyond it; extend --lrs "
                         f"{'below' if edge == 'lowest' else 'above'} {r['grid_point']}.")
    return [*notes, ""] if notes else []


def plot(result: Mapping[str, Any], path: str) -> Any:
    """``sweep.png``: validation accuracy (filled) and test accuracy (hollow) of each patch
    against its trainable parameters (log x), the validation Pareto front drawn. Returns the
    figure (closed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = result["chosen"]
    by_patch = {r["patch"]: r for r in chosen}
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    x = [r["trainable_parameters"] for r in chosen]
    ax.scatter(x, [100 * r["val_accuracy"] for r in chosen], s=36, zorder=3,
               label="validation (chooses)")
    ax.scatter(x, [100 * r["test_accuracy"] for r in chosen], s=36, zorder=3,
               facecolors="none", edgecolors="tab:gray", label="test (chosen run)")
    front = [by_patch[p] for p in result["pareto"]]
    ax.step([r["trainable_parameters"] for r in front],
            [100 * r["val_accuracy"] for r in front], where="post", color="tab:orange",
            marker="D", markersize=10, fillstyle="none", zorder=2,
            label="Pareto front (validation)")
    for r in chosen:  # Patches of equal size share an x: each point carries its name.
        ax.annotate(r["patch"], (r["trainable_parameters"], 100 * r["val_accuracy"]),
                    textcoords="offset points", xytext=(5, -3), fontsize=7)
        ax.annotate(r["patch"], (r["trainable_parameters"], 100 * r["test_accuracy"]),
                    textcoords="offset points", xytext=(-5, -3), fontsize=6, color="tab:gray",
                    ha="right")  # Test names on the left, validation names on the right.
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters per task (log)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"kfor1 sweep: {result['task']}")
    ax.grid(True, which="both", alpha=0.3)
    # Beside the axes: inside, it covered the Pareto line of some sweeps.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return fig
