"""What each config field means: ``kfor1 train --config FILE --help-config`` prints the table.

The meanings are the comments beside and above each field in ``kfor1.trainer.config.base_config``,
read from its source, so the help and the defaults cannot drift apart: a field added there with a
comment is documented here. A nested field (``learning_rate.logits``, ``augment.crop``) shares
its parent's comment.
"""

from __future__ import annotations

import inspect
import io
import re
import textwrap
import tokenize
from typing import Any

from kfor1.trainer.config_ranges import allowed, leaves

_FIELD = re.compile(r"^\s*c\.(\w+)\s*=")


def field_comments() -> dict[str, str]:
    """``{field: its comment}`` for each top-level field ``base_config`` sets.

    Returns:
      The comment on the field's line, else the comment lines right above it, joined; fields
      without either are absent.

    Example:
      >>> field_comments()["batch_size"]
      'Per task and step.'
    """
    from kfor1.trainer import config
    source = inspect.getsource(config.base_config)
    lines = source.splitlines()
    inline: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            inline[tok.start[0]] = tok.string.lstrip("#").strip()
    comments: dict[str, str] = {}
    above: list[str] = []
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(inline.get(number, ""))
            continue
        match = _FIELD.match(line)
        if match and match.group(1) not in comments:
            text = inline.get(number) or " ".join(above)
            if text:
                comments[match.group(1)] = text
        if stripped or not match:
            above = []
    return comments


def _shown(value: Any, width: int = 72) -> str:
    text = repr(value.to_dict() if hasattr(value, "to_dict") else value)
    if isinstance(value, (list, tuple)):
        text = repr([v.to_dict() if hasattr(v, "to_dict") else v for v in value])
    return text if len(text) <= width else text[: width - 3] + "..."


def describe_config(config: Any, width: int = 100) -> str:
    """The text ``--help-config`` prints: every field with its value in ``config``, and what it
    means under it (a nested group's fields, e.g. ``learning_rate.*``, share one meaning).

    Args:
      config: an ``ml_collections.ConfigDict`` (a config file's, overrides applied).
      width: the column at which meanings wrap.

    Returns:
      ``field = value`` lines, each group's meaning indented under it, then how to set a field.

    Example:
      >>> print(describe_config(kfor1.trainer.config.base_config()))
      augment.crop = 'random_resized'
      ...
    """
    comments = field_comments()
    groups: dict[str, list[tuple[str, Any]]] = {}
    for path, value in leaves(config):
        groups.setdefault(path.split(".")[0], []).append((path, value))
    lines = []
    for name, fields in groups.items():
        for path, value in fields:
            rule = allowed(path)
            lines.append(f"{path} = {_shown(value)}" + (
                f"  ({rule.text})" if rule and not rule.text.startswith("one of True") else ""))
        if comments.get(name):
            lines += textwrap.wrap(comments[name], width, initial_indent="    ",
                                   subsequent_indent="    ")
    lines += ["", "set a field with --config.FIELD=VALUE, e.g. --config.num_steps=500 "
              "--config.learning_rate.logits=0.01"]
    return "\n".join(lines)
