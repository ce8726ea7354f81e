"""The notebooks in notebooks/: valid, committed without outputs, and executed top to bottom.

Each notebook runs through a real Jupyter kernel (nbclient + ipykernel, as Jupyter and Colab
run it) in its fast mode (``KFOR1_NOTEBOOK_FAST=1``: the same cells on smaller inputs with
fewer steps); its last cells assert what it found (the patched model beats logits-only, the
served mixed batch equals the per-task results, ...), so a notebook that stops teaching the
truth fails here. The structural checks use the standard library's ``json`` only.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import sys
import time

import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = (
    "01_transfer_with_patches.ipynb",
    "02_multitask.ipynb",
    "03_patch_files_and_serving.ipynb",
    "04_bring_your_own_model.ipynb",
)
CELL_TYPES = {"code", "markdown", "raw"}
# Each notebook's fast mode runs in about a minute on 2 cores; the acceptance bound is 3.
FAST_MODE_SECONDS = 180


def _source(cell: dict) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def _load(path: pathlib.Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _setup_cell(nb: dict) -> dict:
    """The code cell tagged ``parameters`` (papermill's convention): the install cell."""
    tagged = [c for c in nb["cells"]
              if c["cell_type"] == "code" and "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


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


def test_the_four_notebooks_are_there():
    assert tuple(p.name for p in NOTEBOOKS) == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_structure(path):
    nb = _load(path)
    assert nb.get("nbformat") == 4, f"{path.name}: expected nbformat 4, got {nb.get('nbformat')}"
    assert isinstance(nb.get("nbformat_minor"), int)
    assert nb["metadata"]["kernelspec"]["name"] == "python3", "Colab and CI run 'python3'"
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
    last_code = [c for c in cells if c["cell_type"] == "code"][-1]
    assert "assert " in _source(last_code), (
        f"{path.name}: its last code cell should assert what the notebook found")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    """Outputs of a fast run would be stale and misleading; they are cleared before a commit."""
    for i, cell in enumerate(_load(path)["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, (
                f"{path.name} code cell {i} was saved with outputs; clear them "
                "(Jupyter: Edit > Clear outputs of all cells) before committing")


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


def test_every_notebook_has_the_same_setup_cell():
    """One install cell, copied into each notebook: a fix to one is a fix to all."""
    setups = {p.name: _source(_setup_cell(_load(p))) for p in NOTEBOOKS}
    first = setups[EXPECTED[0]]
    assert "<org>" not in first and "KFOR1_SOURCE" in first
    for name, source in setups.items():
        assert source == first, f"{name}'s setup cell differs from {EXPECTED[0]}'s"


def _install_command():
    """``kfor1_install_command`` from the setup cell, run here as a plain function (its cell
    also installs, which a test must not)."""
    tree = ast.parse(_source(_setup_cell(_load(NOTEBOOKS[0]))))
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
            or (isinstance(n, ast.FunctionDef) and n.name == "kfor1_install_command")]
    namespace: dict = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup cell", "exec"), namespace)
    return namespace["kfor1_install_command"]


def test_setup_cell_uses_the_checkout_when_run_from_one(tmp_path):
    (tmp_path / "kfor1").mkdir()
    (tmp_path / "kfor1" / "__init__.py").write_text("")
    (tmp_path / "notebooks").mkdir()
    assert _install_command()("", tmp_path / "notebooks") is None
    assert _install_command()("https://example.org/kfor1.git", tmp_path / "notebooks") is None


def test_setup_cell_installs_from_the_source_or_a_wheel_beside_the_notebook(tmp_path):
    command = _install_command()
    pip = command("kfor1 @ git+https://example.org/kfor1", tmp_path)
    assert pip[:5] == [sys.executable, "-m", "pip", "install", "-q"]
    assert pip[5] == "kfor1 @ git+https://example.org/kfor1"
    for version in ("0.1.0", "0.2.0"):
        (tmp_path / f"kfor1-{version}-py3-none-any.whl").write_text("")
    assert command("", tmp_path)[5] == str(tmp_path / "kfor1-0.2.0-py3-none-any.whl")


def test_setup_cell_without_a_source_says_what_to_set(tmp_path):
    with pytest.raises(RuntimeError, match="set KFOR1_SOURCE") as info:
        _install_command()("", tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_in_fast_mode(path, monkeypatch):
    """Top to bottom through an ipykernel, in the notebook's folder, as a user runs it."""
    import nbclient  # the dev extra installs it; a missing one is a red test, not a skip
    import nbformat

    monkeypatch.setenv("KFOR1_NOTEBOOK_FAST", "1")
    # The kernel is a user's process: one CPU device, not the suite's eight simulated ones.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", "").strip())
    # Jupyter's inline backend, as a user gets: a figure becomes an image/png output.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=FAST_MODE_SECONDS, kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed in fast mode: {str(e)[-3000:]}")
    seconds = time.perf_counter() - start
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for o in outputs), f"{path.name} drew no figure"
    assert seconds < FAST_MODE_SECONDS, f"{path.name} took {seconds:.0f} s in fast mode"
