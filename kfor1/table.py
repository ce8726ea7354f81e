"""Plain-text tables for the terminal: the patch report, a run's summary, eval results, the demo.

One helper, so every table kfor1 prints aligns the same way: the first column left-aligned (it
names the row), the others right-aligned (numbers), a dashed rule under the header.
"""

from __future__ import annotations

from collections.abc import Sequence


def printable(text: object) -> str:
    """``str(text)`` safe to print: characters a terminal would act on (a newline, an ANSI
    escape, a carriage return) shown escaped, as ``\\n`` or ``\\x1b``. Class and task names
    come from files others wrote; printed raw, one could forge or hide lines.

    Example::

      >>> printable("red\\x1b[2Jcar")
      'red\\\\x1b[2Jcar'
    """
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def format_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], left: int = 1, indent: str = ""
) -> str:
    """Rows under ``header``, columns padded to their widest cell.

    Args:
      header: column titles.
      rows: one sequence of cells per row (any objects, shown with ``str``).
      left: how many leading columns are left-aligned (names, paths); the rest align right.
      indent: prefix of every line.

    Returns:
      The table as lines joined by newlines, without a trailing newline.

    Example::

      >>> print(format_table(["task", "accuracy"], [["digits", "98.06%"]]))
      task    accuracy
      ------  --------
      digits    98.06%
    """
    cells = [[printable(c) for c in header], *[[printable(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        parts = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in
                 enumerate(zip(row, widths))]
        return indent + "  ".join(parts).rstrip()

    rule = indent + "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:])])


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], left: int = 1
) -> str:
    """The same table as GitHub Markdown (``sweep.md``, ``docs/results.md``): the first
    ``left`` columns left-aligned, the others right-aligned.

    Example::

      >>> print(markdown_table(["task", "accuracy"], [["digits", "98.06%"]]))
      | task | accuracy |
      |:---|---:|
      | digits | 98.06% |
    """
    def line(row: Sequence[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"

    rule = "|" + "|".join(":---" if i < left else "---:" for i in range(len(header))) + "|"
    return "\n".join([line(header), rule, *map(line, rows)])
