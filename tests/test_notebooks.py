"""The notebooks in notebooks/ are valid and their code is valid Python.

They are not executed here (a run trains models for minutes); this catches broken JSON, a
malformed notebook structure, syntax errors and saved error outputs. Parsed with the standard
library's ``json``, so nbformat is not needed.
"""

from __future__ import annotations

import json
import pathlib

import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TYPES = {"code", "markdown", "raw"}


def _source(cell: dict) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def _load(path: pathlib.Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def python_source(code: str) -> str | None:
    """The cell as Python: IPython line magics (``%pip``) and shell escapes (``!ls``) become
    ``pass`` at their indentation, so blocks around them stay valid; a cell magic (``%%bash``)
    makes the whole cell non-Python (None)."""
    if code.lstrip().startswith("%%"):
        return None
    lines = []
    for line in code.splitlines():
        stripped = line.lstrip()
        if stripped.startswith(("%", "!")):
            line = line[: len(line) - len(stripped)] + "pass"
        lines.append(line)
    return "\n".join(lines) + "\n"


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_structure(path):
    nb = _load(path)
    assert nb.get("nbformat") == 4, f"{path.name}: expected nbformat 4, got {nb.get('nbformat')}"
    assert isinstance(nb.get("nbformat_minor"), int)
    assert isinstance(nb.get("metadata"), dict)
    cells = nb.get("cells")
    assert isinstance(cells, list) and cells, f"{path.name} has no cells"
    for i, cell in enumerate(cells):
        where = f"{path.name} cell {i}"
        assert cell.get("cell_type") in CELL_TYPES, f"{where}: cell_type {cell.get('cell_type')!r}"
        assert isinstance(cell.get("metadata"), dict), f"{where}: metadata must be a dict"
        source = cell.get("source")
        assert isinstance(source, str) or (
            isinstance(source, list) and all(isinstance(s, str) for s in source)
        ), f"{where}: source must be a string or a list of strings"
        if cell["cell_type"] == "code":
            assert isinstance(cell.get("outputs"), list), f"{where}: code cells need outputs"
            assert "execution_count" in cell, f"{where}: code cells need execution_count"
            errors = [o for o in cell["outputs"] if o.get("output_type") == "error"]
            assert not errors, (
                f"{where} was saved with an error output ({errors[0].get('ename')}: "
                f"{errors[0].get('evalue')}); fix it, or clear the outputs"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_code_compiles(path):
    code_cells = [c for c in _load(path)["cells"] if c["cell_type"] == "code"]
    assert code_cells, f"{path.name} has no code cells"
    for i, cell in enumerate(code_cells):
        source = python_source(_source(cell))
        if source is not None:
            compile(source, f"{path.name}:code cell {i}", "exec")


def test_python_source_strips_magics():
    code = "%pip install -q kfor1\nif True:\n    !ls\nx = 1  # 100% not a magic\n"
    assert python_source(code) == "pass\nif True:\n    pass\nx = 1  # 100% not a magic\n"
    assert python_source("%%bash\necho hi\n") is None
    with pytest.raises(SyntaxError):
        compile(python_source("x = (\n"), "cell", "exec")
