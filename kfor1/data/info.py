"""What a model needs to know about a data source before seeing any example."""

from __future__ import annotations

import dataclasses

__all__ = ["DatasetInfo"]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Classes and split sizes of a source, so heads and epoch lengths can be set up front.

    ``num_examples`` maps our split names ('train', 'test') to their sizes (-1: unknown);
    ``skipped`` maps a split to the files left out of it because they cannot be decoded
    (``skip_bad_images``).
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    num_examples: dict[str, int]
    skipped: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
