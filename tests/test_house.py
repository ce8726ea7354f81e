"""The shape of the code: kfor1's packages are stations in the data's order, each importing only
the ones below it; nothing but the ``python -m kfor1`` entry point imports the trainer; no import
circle (lazy imports inside functions included); no module over 400 lines.

The checks are functions of a package folder, so each is also shown to fail on a small package
that breaks its rule (``tmp_path``), not only to pass on kfor1.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kfor1"
MAX_LINES = 400

# The stations, lowest first: a module may import its own station and those before it. The root
# keeps only what every station shares. A module whose name starts with none of these is an error
# (a new package or root module must be given its place here and in README's map).
STATIONS = (
    ("kfor1.errors", "kfor1.tree", "kfor1.table", "kfor1.images", "kfor1.cpu", "kfor1.microbatch",
     "kfor1.untrusted"),
    ("kfor1.data",),
    ("kfor1.layers",),
    ("kfor1.models",),
    ("kfor1.patch",),
    ("kfor1.multitask",),
    ("kfor1.files",),
    ("kfor1.serve",),
    ("kfor1.trainer",),
    ("kfor1", "kfor1.__main__"),  # The public API, and the `python -m kfor1` entry point.
)
TRAINER = "kfor1.trainer"
ENTRY_POINTS = ("kfor1.__main__",)
MAX_ROOT_MODULES = 8  # Besides __init__ (the public API) and __main__ (python -m kfor1).


def modules(package: Path) -> dict[str, Path]:
    """Every module of ``package`` by dotted name (``kfor1.patch.spec``; a package by its own)."""
    out = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that ``name`` imports anywhere in its file (its own parents
    excluded: importing ``kfor1.patch.spec`` runs ``kfor1/patch/__init__.py`` anyway)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != name and not name.startswith(m + ".")}


def graph(package: Path) -> dict[str, set[str]]:
    known = modules(package)
    root = package.name
    return {m: imports(m, p, known) for m, p in known.items() if m != root}


def circles(package: Path) -> list[str]:
    """Each import circle found, as ``a -> b -> a``."""
    g = graph(package)
    state: dict[str, int] = {}
    found = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                found.append(" -> ".join(stack[stack.index(dep):] + [node, dep]))
            elif not state.get(dep):
                visit(dep, [*stack, node])
        state[node] = 2

    for module in sorted(g):
        if not state.get(module):
            visit(module, [])
    return found


def station(name: str, stations=STATIONS) -> int | None:
    """The index of ``name``'s station: the longest entry of the table it is or lies under."""
    best, length = None, -1
    for index, members in enumerate(stations):
        for member in members:
            # The root package itself ("kfor1") is a station by its exact name only.
            prefix = "." in member and name.startswith(member + ".")
            if (name == member or prefix) and len(member) > length:
                best, length = index, len(member)
    return best


def upward_imports(package: Path, stations=STATIONS) -> list[str]:
    """Each import that runs up the stations, and each module that has no station."""
    problems = []
    for name, deps in sorted(graph(package).items()):
        own = station(name, stations)
        if own is None:
            problems.append(f"{name} belongs to no station")
            continue
        problems += [f"{name} imports {dep}, a later station" for dep in sorted(deps)
                     if (theirs := station(dep, stations)) is not None and theirs > own]
    return problems


def trainer_imports(package: Path, trainer: str = TRAINER,
                    entry_points: tuple[str, ...] = ENTRY_POINTS) -> list[str]:
    """Each module outside the trainer (entry points aside) that imports any part of it."""
    inside = lambda m: m == trainer or m.startswith(trainer + ".")  # noqa: E731
    return [f"{name} imports {dep}" for name, deps in sorted(graph(package).items())
            if not inside(name) and name not in entry_points
            for dep in sorted(deps) if inside(dep)]


def long_modules(package: Path, limit: int = MAX_LINES) -> dict[str, int]:
    return {str(p.relative_to(package)): n for p in package.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > limit}


# kfor1 itself.

def test_no_import_circles():
    assert not circles(PACKAGE)


def test_the_library_never_imports_the_trainer():
    assert not trainer_imports(PACKAGE)


def test_imports_run_down_the_stations():
    assert not upward_imports(PACKAGE)


def test_no_module_over_400_lines():
    assert not long_modules(PACKAGE)


def test_the_root_keeps_only_what_is_shared():
    root = sorted(p.name for p in PACKAGE.glob("*.py")
                  if p.name not in ("__init__.py", "__main__.py"))
    assert len(root) <= MAX_ROOT_MODULES, root
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert {"data", "layers", "models", "patch", "multitask", "files", "serve",
            "trainer"} <= packages


def test_every_package_says_what_it_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc or "may import" in doc, init


# Each check fails on a package that breaks its rule.

def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "kfor1" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in [root / "kfor1", *(p for p in (root / "kfor1").rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    return root / "kfor1"


@pytest.mark.parametrize("lazy", [False, True])
def test_a_library_module_that_imports_the_trainer_fails(tmp_path, lazy):
    body = ("def f():\n    from kfor1.trainer.loop import train\n" if lazy
            else "from kfor1.trainer import loop\n")
    package = _write(tmp_path, {"trainer/loop.py": "", "files/patchfile.py": body,
                                "__main__.py": "from kfor1.trainer.loop import train\n"})
    # __main__, the entry point, may; the library may not, eagerly or inside a function.
    assert trainer_imports(package) == ["kfor1.files.patchfile imports kfor1.trainer.loop"]


def test_a_circle_fails(tmp_path):
    package = _write(tmp_path, {
        "patch/spec.py": "from kfor1.patch import report\n",
        "patch/report.py": "def f():\n    from kfor1.patch.spec import partition\n"})
    assert circles(package) == ["kfor1.patch.report -> kfor1.patch.spec -> kfor1.patch.report"]


def test_an_import_up_the_stations_fails(tmp_path):
    package = _write(tmp_path, {"multitask/state.py": "", "models/registry.py": "",
                                "patch/spec.py": "from kfor1.multitask.state import Task\n"
                                                 "from kfor1.models import registry\n",
                                "stray.py": ""})
    assert upward_imports(package) == [
        "kfor1.patch.spec imports kfor1.multitask.state, a later station",
        "kfor1.stray belongs to no station"]


def test_a_long_module_fails(tmp_path):
    package = _write(tmp_path, {"serve/server.py": "x = 1\n" * (MAX_LINES + 1),
                                "serve/table.py": "x = 1\n" * MAX_LINES})
    assert long_modules(package) == {"serve/server.py": MAX_LINES + 1}
