"""What a model needs to know about a data source before seeing any example."""

from __future__ import annotations

import dataclasses

__all__ = ["DatasetInfo"]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Classes and split sizes of a source, so heads and epoch lengths can be set up front.

    ``num_examples`` maps our split names ('train', 'test') to their sizes (-1: unknown).
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    num_examples: dict[str, int]
