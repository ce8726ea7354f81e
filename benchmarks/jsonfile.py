"""The benchmarks' ``--json`` files: one writer, numpy scalars as numbers."""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def _default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def write_json(path: str | None, value: Any) -> None:
    """Writes ``value`` to ``path`` (indented, with a final newline); None writes nothing."""
    if path is None:
        return
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, default=_default)
        f.write("\n")
