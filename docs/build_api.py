"""Builds kfor1's API reference from its docstrings with pdoc: one HTML page per public module.

Run it as ``make docs`` (or ``python docs/build_api.py [-o DIR]``); the pages go to ``docs/api/``
(a build output, not committed). Docstrings are read in Google style (``Args:``, ``Returns:``,
``Example:``).

The build fails (exit status 1, one line naming every problem) on anything pdoc reports. pdoc 16
reports through Python's ``warnings``: a module it cannot import, a docstring or an annotation
it cannot parse, a spec that adds a module twice. pdoc logs nothing through ``logging``, but the
Markdown renderer it uses (markdown2, logger ``markdown``) may, so WARNING records of ``pdoc``
and ``markdown`` count too. pdoc does not report a cross-reference it cannot resolve: it renders
it as plain code. Modules are imported before the build, so that what TensorFlow and JAX warn
on import is not taken for pdoc's; a public module that fails to import fails the build too.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

# Before TensorFlow is imported (kfor1.data, kfor1.serve.export): its C++ logs stay off stderr.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "docs" / "api"

# What pdoc is given, one station of the data's order after another. A package without
# ``__all__`` brings every submodule (kfor1.patch brings spec, report and optim; kfor1.trainer
# each of its modules); a package with one brings the submodules it names (``kfor1`` brings
# kfor1.layers, with kfor1.layers.native and kfor1.layers.norm, kfor1.microbatch and
# kfor1.models), and pdoc warns when a module is given twice; kfor1.data and kfor1.serve name
# none, so their submodules with a page of their own are listed here.
MODULES = (
    "kfor1",
    "kfor1.errors",
    "kfor1.images",
    "kfor1.data",
    "kfor1.data.cache",
    "kfor1.patch",
    "kfor1.multitask",
    "kfor1.files",
    "kfor1.serve",
    "kfor1.serve.export",
    "kfor1.trainer",
)
LOGGERS = ("pdoc", "markdown")


class _Records(logging.Handler):
    """Keeps every record at WARNING or above."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _one_line(text: object) -> str:
    """A message on one line: its first line, and its last when there are more (a traceback's
    exception)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return "(empty message)"
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def pages(output_dir: str | os.PathLike) -> list[str]:
    """The modules with a page in a built ``output_dir``, e.g. ``["kfor1", "kfor1.data", ...]``."""
    out = Path(output_dir)
    return sorted(
        ".".join(p.relative_to(out).with_suffix("").parts)
        for p in out.rglob("*.html") if p.name != "index.html" or p.parent != out
    )


def _clear(out: Path) -> None:
    """Empties a previous build in ``out`` (stale pages of removed modules would stay); refuses
    to empty a folder that is not one."""
    if out.exists() and any(out.iterdir()):
        if not (out / "index.html").exists() and not (out / "kfor1.html").exists():
            raise SystemExit(f"docs: {out} is not empty and holds no API reference; "
                             "choose an empty or new folder")
        shutil.rmtree(out)


def build(output_dir: str | os.PathLike = DEFAULT_OUTPUT) -> list[str]:
    """Writes the API reference into ``output_dir``; returns the problems found (pdoc's
    warnings and WARNING log records, and modules that failed to import), one line each."""
    import pdoc
    import pdoc.render

    problems = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised.
            problems.append(f"cannot import {name}: {type(e).__name__}: {_one_line(e)}")
    if problems:
        return problems
    out = Path(output_dir)
    _clear(out)
    pdoc.render.configure(docformat="google", footer_text="kfor1 API reference",
                          show_source=True, search=True)
    handler = _Records()
    loggers = [logging.getLogger(name) for name in LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pdoc.pdoc(*MODULES, output_directory=out)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    problems += [f"{w.category.__name__}: {_one_line(w.message)}" for w in caught]
    problems += [f"{r.name} {r.levelname}: {_one_line(r.getMessage())}"
                 for r in handler.records]
    missing = [m for m in MODULES if m not in pages(out)]
    problems += [f"no page for {m}" for m in missing]
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """``build_api.py [-o DIR]``: builds the reference; 0 if pdoc reported nothing, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output-dir", type=Path, default=DEFAULT_OUTPUT,
                        help=f"where to write the HTML (default: {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    problems = build(args.output_dir)
    if problems:
        print(f"docs: the API reference has {len(problems)} problem(s): " + "; ".join(problems),
              file=sys.stderr)
        return 1
    built = pages(args.output_dir)
    print(f"docs: {len(built)} pages in {args.output_dir} "
          f"({time.perf_counter() - start:.0f} s): {', '.join(built)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
