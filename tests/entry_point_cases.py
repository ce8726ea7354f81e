"""Runs user-error cases through a real entry point, in one process, and records each one's exit
status and stderr: ``python tests/entry_point_cases.py ENTRY CASES.json OUT.json``.

``ENTRY`` is ``kfor1`` (the installed console script's function, as the ``kfor1`` command runs
it) or ``launch.train`` (run as ``python -m launch.train`` runs it). An exception that escapes
the entry point is recorded as its traceback, which the test then reports.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import runpy
import sys
import traceback


def run(entry: str, argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    code: object = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            if entry == "kfor1":
                (script,) = importlib.metadata.entry_points(group="console_scripts",
                                                            name="kfor1")
                sys.argv = ["kfor1", *argv]
                code = script.load()()
            else:
                sys.argv = [entry, *argv]
                runpy.run_module(entry, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code
        except BaseException:  # noqa: BLE001 - recorded for the test to report.
            traceback.print_exc(file=err)
            code = "raised"
    return (code if isinstance(code, int) else -1), err.getvalue()


def main() -> None:
    entry, cases_file, out_file = sys.argv[1:4]
    with open(cases_file, encoding="utf-8") as f:
        cases = json.load(f)
    results = {}
    for name, argv in cases.items():
        code, err = run(entry, argv)
        results[name] = {"code": code, "stderr": err}
    with open(out_file, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
