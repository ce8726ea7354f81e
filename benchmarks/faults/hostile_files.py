"""Hostile patch files given to ``kfor1 predict --patch``, and what became of each.

    python -m benchmarks.faults.hostile_files --patch runs/demo/patches/digits [--json OUT]
    python -m benchmarks.faults.hostile_files            # trains a 2-step digits patch first

Patches are shared and downloaded (issue 31): every case copies one good patch, makes it hostile
the way a sender could (a model name that runs code, a link to ``/dev/zero``, a hash removed, a
path out of the folder, ...), re-hashing the file where the case is about something the content
hash does not cover, and runs ``kfor1 predict`` on it in a fresh process (standard input closed,
so ``builtins:input`` cannot hang it; a time limit, so nothing can). A marker module sits in the
working directory, as a file unpacked beside a patch would: importing it writes a file.

Each case counts as a *clean error* (exit 2, one ``error:`` line naming the patch, no
traceback), a *safe result* (a case that should predict did, its output escaped), a *silent
result* (exit 0 where a refusal was due: must be 0), *code run* (the marker appeared: must be 0)
or a *crash* (a traceback, another exit status or the time limit: must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, write_json

MARKER = "kfor1_hostile_marker"


def _rewrite(patch: Path, edit: Callable[[dict], None]) -> None:
    """Edits patch.json and re-hashes it: only the check under test stands in the way."""
    from kfor1.files.patchfile import Patch, load_patch, write_patch

    loaded = load_patch(patch)
    meta = json.loads(json.dumps(loaded.meta))
    edit(meta)
    write_patch(Patch(loaded.variables, meta), patch)


def _raw(patch: Path, edit: Callable[[dict], None]) -> None:
    meta = json.loads((patch / "patch.json").read_text())
    edit(meta)
    (patch / "patch.json").write_text(json.dumps(meta))


def _link(patch: Path, name: str, target: str) -> None:
    (patch / name).unlink()
    os.symlink(target, patch / name)


def _base(key: str, value: object) -> Callable[[Path], None]:
    return lambda p: _rewrite(p, lambda m: m["base"].update({key: value}))


def _unhashed(meta: dict) -> None:
    meta.update(format_version=1)
    meta.pop("content_sha256")
    meta["class_names"] = meta["class_names"][1:] + meta["class_names"][:1]


def _flip(patch: Path) -> None:
    data = bytearray((patch / "patch.msgpack").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (patch / "patch.msgpack").write_bytes(bytes(data))


# name -> (how the patch is made hostile, whether predict should refuse it)
CASES: dict[str, tuple[Callable[[Path], None], bool]] = {
    "model_names_a_file_beside_it": (_base("model", f"{MARKER}:factory"), True),
    "model_os_abort": (_base("model", "os:abort"), True),
    "model_builtins_input": (_base("model", "builtins:input"), True),
    "model_this_import": (_base("model", "this:x"), True),
    "hash_removed_classes_rotated": (lambda p: _raw(p, _unhashed), True),
    "bytes_flipped": (_flip, True),
    "msgpack_truncated": (lambda p: (p / "patch.msgpack").write_bytes(
        (p / "patch.msgpack").read_bytes()[:100]), True),
    "msgpack_links_to_dev_zero": (lambda p: _link(p, "patch.msgpack", "/dev/zero"), True),
    "json_links_out_of_folder": (lambda p: _link(p, "patch.json", "/etc/passwd"), True),
    "json_nested_100000_deep": (lambda p: (p / "patch.json").write_text(
        "[" * 100_000 + "]" * 100_000), True),
    "json_17_MiB": (lambda p: (p / "patch.json").write_text(" " * (17 << 20) + "{}"), True),
    "weights_path_named": (_base("weights", "/etc/passwd"), True),
    "base_dir_escapes": (lambda p: _rewrite(p, lambda m: m["base"].update(
        trained=True, dir="../../../../etc")), True),
    "task_name_escapes": (lambda p: _rewrite(p, lambda m: m.update(task="../../x")), True),
    "class_names_terminal_escapes": (lambda p: _rewrite(p, lambda m: m.update(class_names=[
        f"c{i}\x1b[2J\n" for i in range(len(m["class_names"]))])), False),
}


def run_case(name: str, good: Path, image: Path, workdir: Path,
             timeout: float = 300) -> dict[str, object]:
    """Makes ``good`` hostile as case ``name`` in ``workdir`` and runs ``kfor1 predict``."""
    make, refuse = CASES[name]
    case = workdir / name
    patch = Path(shutil.copytree(good, case / "patch"))
    marker = case / "IMPORTED"
    (case / f"{MARKER}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n"
        "def factory(**kwargs):\n    raise SystemExit('factory called')\n")
    make(patch)
    cmd = [sys.executable, "-c", "import sys; from kfor1.trainer.cli import main; "
           "sys.exit(main(sys.argv[1:]))", "predict", "--patch", str(patch), str(image)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(case)])}
    try:
        done = subprocess.run(cmd, cwd=case, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
        rc, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired:
        rc, out, err = None, "", f"timed out after {timeout:.0f} s"
    lines = [line for line in err.splitlines() if line.strip()]
    clean = (rc == 2 and len(lines) == 1 and lines[0].startswith("error: ")
             and "Traceback" not in err)
    code_run = marker.exists()
    safe = rc == 0 and not refuse and "\x1b" not in out
    return {"case": name, "refuse": refuse, "rc": rc, "clean error": clean, "safe result": safe,
            "silent result": rc == 0 and refuse, "code run": code_run,
            "crash": not (clean or safe or (rc == 0 and refuse)),
            "detail": (lines[-1] if lines else out.strip().splitlines()[0] if out.strip()
                       else "")[:110]}


def counts(outcomes: Sequence[dict]) -> dict[str, int]:
    keys = ("clean error", "safe result", "silent result", "code run", "crash")
    return {"cases": len(outcomes), **{k: sum(bool(o[k]) for o in outcomes) for k in keys}}


def _train_patch(root: Path) -> Path:
    """A digits patch from a 2-step run at 32 px (what the cases start from)."""
    from kfor1.trainer.config import base_config, task
    from kfor1.trainer.loop import train

    c = base_config()
    c.tasks = [task("digits", resolution=32)]
    c.num_steps, c.batch_size, c.warmup_steps, c.eval_batch_size = 2, 8, 1, 50
    c.max_eval_examples, c.progress, c.log_every = 50, False, 1
    train(c, str(root / "run"))
    return root / "run" / "patches" / "digits"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patch", help="a good patch to start from (default: train one)")
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated case names (default: all)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    names = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="kfor1_hostile_") as tmp:
        root = Path(tmp)
        good = Path(args.patch) if args.patch else _train_patch(root)
        image = root / "image.png"
        Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(image)
        outcomes = []
        for name in names:
            outcome = run_case(name, good, image, root)
            outcomes.append(outcome)
            print(f"{name:32s} rc={outcome['rc']!s:4s} clean={outcome['clean error']!s:5s} "
                  f"safe={outcome['safe result']!s:5s} silent={outcome['silent result']!s:5s} "
                  f"code={outcome['code run']!s:5s} {outcome['detail']}", flush=True)
    total = counts(outcomes)
    print("  ".join(f"{k}: {v}" for k, v in total.items()))
    write_json(args.json, {"outcomes": outcomes, "counts": total})
    bad = total["silent result"] + total["code run"] + total["crash"]
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
