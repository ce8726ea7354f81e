"""The API reference: every public name documented, and ``make docs`` building without a warning.

What a name's docstring must hold is read from pdoc's own view of the package (the docstrings it
renders, variables' included), in Google style:

- a function: ``Args:`` when it takes arguments, ``Returns:`` (or ``Yields:``) when it returns
  something, and ``Example:``;
- a class: ``Example:``, and ``Args:`` or ``Attributes:`` when it is built from fields or
  arguments (an exception class: its message is the argument);
- a module: a summary and ``Example:``;
- a variable (``PRESETS``, ``__version__``): a docstring.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest

import kfor1

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
import build_api  # noqa: E402


def _sections(doc: str) -> set[str]:
    """The Google-style section headers of a docstring (``Args``, ``Returns``, ...)."""
    return {line.strip()[:-1] for line in doc.splitlines()
            if line.strip().endswith(":") and line.strip()[:-1] in
            {"Args", "Returns", "Yields", "Raises", "Example", "Examples", "Attributes"}}


def _takes_arguments(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name not in ("self", "cls") for p in params)


def _returns_something(fn) -> bool:
    try:
        annotation = inspect.signature(fn).return_annotation
    except (TypeError, ValueError):
        return True
    return annotation not in (None, "None", type(None))


def docstring_problems(module=kfor1) -> list[str]:
    """What each name in ``module.__all__`` lacks, one line per name (empty: all documented)."""
    import pdoc.doc

    page = pdoc.doc.Module(module)
    problems = []
    for name in module.__all__:
        obj = getattr(module, name)
        member = page.get(name)
        doc = (member.docstring if member is not None else inspect.getdoc(obj)) or ""
        found = _sections(doc)
        need: list[str] = []
        if not doc.strip():
            problems.append(f"{name}: no docstring")
            continue
        if inspect.ismodule(obj):
            need = ["Example"]
        elif inspect.isclass(obj):
            need = ["Example"]
            if issubclass(obj, BaseException):
                pass
            elif "Args" not in found and "Attributes" not in found:
                need.append("Args or Attributes")
        elif callable(obj):
            need = ["Example"]
            if _takes_arguments(obj):
                need.append("Args")
            if _returns_something(obj) and "Yields" not in found:
                need.append("Returns")
        missing = [n for n in need
                   if not any(part in found or (part == "Example" and "Examples" in found)
                              for part in n.split(" or "))]
        if missing:
            problems.append(f"{name}: no {', '.join(missing)} section")
    return problems


def test_every_public_name_is_documented():
    problems = docstring_problems()
    assert not problems, "undocumented in kfor1.__all__:\n" + "\n".join(problems)


def test_the_checker_finds_what_is_missing():
    """The check above can fail: a module with a bare function, class and variable."""
    import types

    fake = types.ModuleType("fake_api", "A module without an example.")

    def bare(x: int) -> int:
        """Doubles x."""
        return 2 * x

    class Bare:
        """A class."""

        def __init__(self, size: int) -> None:
            self.size = size

    bare.__module__ = Bare.__module__ = "fake_api"
    fake.bare, fake.Bare, fake.child = bare, Bare, types.ModuleType("fake_api.child")
    fake.__all__ = ["bare", "Bare", "child"]
    sys.modules["fake_api"] = fake
    try:
        problems = docstring_problems(fake)
    finally:
        del sys.modules["fake_api"]
    assert problems == ["bare: no Example, Args, Returns section",
                        "Bare: no Example, Args or Attributes section",
                        "child: no docstring"], problems


def test_docs_build_without_a_warning(tmp_path):
    """``make docs``: every module listed has a page, and pdoc reported nothing."""
    out = tmp_path / "api"
    problems = build_api.build(out)
    assert not problems, "\n".join(problems)
    built = build_api.pages(out)
    assert set(build_api.MODULES) <= set(built), set(build_api.MODULES) - set(built)
    html = (out / "kfor1.html").read_text()
    for name in ("make_train_step", "patch_optimizer", "load_patched"):
        assert f'id="{name}"' in html, name


def test_docs_build_refuses_to_empty_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds no API reference"):
        build_api.build(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_version_is_the_packages():
    """``kfor1.__version__`` (what ``kfor1 --version`` prints) is the one the wheel is built as."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert kfor1.__version__ == project["version"]
