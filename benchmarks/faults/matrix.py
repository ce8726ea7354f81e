"""Faults thrown at ``kfor1 train`` (``python -m launch.train``), and what became of each run.

    python -m benchmarks.faults [--cases kill9,sigint,...] [--steps 12] [--json OUT]

Every case trains the same small run (EfficientNet-Lite0 at 32 px on scikit-learn's digits, one
process, one CPU device), throws one fault at it, then does what a user would: reruns the same
command (which resumes), or predicts with the patch. An uninterrupted run is the reference.

Faults: ``kill -9`` at random steps and while a checkpoint is being written; SIGINT and SIGTERM
mid-run; a NaN injected into the parameters at a chosen step; bytes flipped in the latest
checkpoint, or one of its files truncated; bytes flipped in a patch file.

Each case counts as a *clean error* (the fault was reported in one ``error:`` line, no
traceback, exit status 2), an *exact resume* (rerun, the run ended with the reference's
metrics and patch arrays, bit for bit), a *silent result* (exit 0 with a result that differs
from the reference, or a corrupt patch that predicted: must be 0) and *files lost* (a
checkpoint written before the fault that is gone without being moved aside, or a run that
ended without its patch: must be 0). Prints the table and the counts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, write_json

CASES = ("kill9_random_step", "kill9_random_step_2", "kill9_random_step_3",
         "kill9_during_checkpoint_write", "sigint", "sigterm", "nan_at_step",
         "checkpoint_bytes_flipped", "checkpoint_file_truncated", "patch_bytes_flipped",
         "checkpoints_deleted_during_write")

# Runs the trainer with every parameter multiplied by NaN after step KFOR1_NAN_AT_STEP (a
# fault, injected where the step function is built; training itself is unchanged).
NAN_RUNNER = """
import os, sys
import jax, jax.numpy as jnp
import kfor1.trainer.loop as t
at = int(os.environ["KFOR1_NAN_AT_STEP"])
build = t.make_train_step
def make(*a, **k):
    step = build(*a, **k)
    def faulty(state, batch, key):
        state, metrics = step(state, batch, key)
        if int(jax.device_get(state.step)) == at:
            state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
        return state, metrics
    return faulty
t.make_train_step = make
from kfor1.trainer.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


PREDICT = "import sys; from kfor1.trainer.cli import main; sys.exit(main(sys.argv[1:]))"


def train_cmd(workdir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "launch.train", "--config",
            "configs/transfer.py:dataset=digits,resolution=32", "--workdir", str(workdir),
            f"--config.num_steps={steps}", "--config.log_every=1",
            "--config.checkpoint_every=3", "--config.batch_size=8",
            "--config.eval_batch_size=50", "--config.max_eval_examples=100",
            "--config.warmup_steps=2", "--config.progress=false"]


def env() -> dict[str, str]:
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def run(cmd: list[str], extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env={**env(), **(extra or {})}, capture_output=True,
                          text=True, timeout=1200)


def logged_steps(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def run_until(cmd: list[str], ready, sig, timeout: float = 900) -> tuple[int, str, bool]:
    """Starts ``cmd``, sends ``sig`` once ``ready()`` is true (or calls it, if it is a
    function); (exit status, stderr, sent)."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                                stderr=err, text=True)
        sent, start = False, time.time()
        while proc.poll() is None and time.time() - start < timeout:
            if not sent and ready():
                sig() if callable(sig) else proc.send_signal(sig)
                sent = True
            time.sleep(0.002)
        proc.wait()
        err.seek(0)
        return proc.returncode, err.read(), sent


def result(workdir: Path) -> tuple[list[dict], dict[str, bytes]] | None:
    """The run's metrics (timing dropped) and its patch files' bytes, or None if unfinished."""
    patches = workdir / "patches"
    if not (workdir / "summary.json").exists() or not patches.exists():
        return None
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    metrics = [{k: v for k, v in x.items() if k != "images_per_s"} for x in lines]
    arrays = {p.parent.name: p.read_bytes() for p in patches.glob("*/patch.msgpack")}
    return metrics, arrays


def checkpoints(workdir: Path) -> set[str]:
    d = workdir / "checkpoints"
    return {p.name for p in d.iterdir() if p.name.isdigit()} if d.exists() else set()


def moved_aside(workdir: Path) -> set[str]:
    d = workdir / "checkpoints.corrupt"
    return {p.name.split("-")[0] for p in d.iterdir()} if d.exists() else set()


def one_line_error(code: int, stderr: str) -> bool:
    lines = [x for x in stderr.splitlines() if x.strip() and not x.startswith("warning:")
             and not x.startswith("note:")]
    return code == 2 and "Traceback" not in stderr and len(lines) == 1 and lines[0].startswith(
        "error: ")


def largest_file(d: Path) -> Path:
    return max((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def run_case(name: str, root: Path, steps: int, reference, rng: random.Random) -> dict:
    """Throws the fault ``name`` at a fresh run under ``root``; returns its outcome."""
    workdir = root / name
    cmd = train_cmd(workdir, steps)
    out = {"case": name, "clean_error": False, "exact_resume": False, "silent": False,
           "lost": False, "detail": ""}
    if name == "patch_bytes_flipped":
        patch = workdir / "patch"
        shutil.copytree(next((root / "reference" / "patches").iterdir()), patch)
        flip(patch / "patch.msgpack")
        image = root / "digit.png"
        from PIL import Image

        Image.new("RGB", (32, 32), 255).save(image)
        done = run([sys.executable, "-c", PREDICT, "predict", "--patch", str(patch),
                    str(image)])
        out["clean_error"] = one_line_error(done.returncode, done.stderr)
        out["silent"] = done.returncode == 0
        out["detail"] = done.stderr.strip().splitlines()[-1][:110] if done.stderr else ""
        return out

    def writing() -> bool:
        d = workdir / "checkpoints"
        return d.exists() and any("tmp" in p.name for p in d.iterdir())

    if name == "checkpoints_deleted_during_write":  # The run goes on: it must end as usual.
        def delete() -> None:
            while (workdir / "checkpoints").exists():
                shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
        code, err, sent = run_until(cmd, writing, delete)
        lines = [x for x in err.splitlines() if x.strip()]
        out["clean_error"] = (code == 0 and 1 <= len(lines) <= 2 and all(
            x.startswith("warning:") for x in lines))
        got = result(workdir)
        out["exact_resume"] = got == reference
        out["silent"] = code == 0 and got != reference
        out["lost"] = got is None or not checkpoints(workdir)
        out["detail"] = (lines[0][:110] if lines else "no warning") + (
            "" if sent else "; the write was not caught")
        return out

    before: set[str] = set()
    if name.startswith("kill9_random"):
        at = rng.randint(1, steps - 1)
        code, err, sent = run_until(cmd, lambda: logged_steps(workdir) >= at, signal.SIGKILL)
        before = checkpoints(workdir)
        out["detail"] = f"killed after step {at}"
    elif name == "kill9_during_checkpoint_write":
        code, err, sent = run_until(cmd, writing, signal.SIGKILL)
        before = checkpoints(workdir)
        out["detail"] = ("killed while writing a checkpoint" if sent
                         else "the write was not caught")
    elif name in ("sigint", "sigterm"):
        sig = signal.SIGINT if name == "sigint" else signal.SIGTERM
        at = rng.randint(2, steps - 2)
        code, err, sent = run_until(cmd, lambda: logged_steps(workdir) >= at, sig)
        out["clean_error"] = one_line_error(code, err) and "received" in err
        before = checkpoints(workdir)
        out["detail"] = (err.strip().splitlines()[-1][:110] if out["clean_error"]
                         else f"rc {code}, stderr: {err[-400:]!r}")
    elif name == "nan_at_step":
        at = steps // 2 + 1
        done = run([sys.executable, "-c", NAN_RUNNER, *cmd[3:]], {"KFOR1_NAN_AT_STEP": str(at)})
        out["clean_error"] = one_line_error(done.returncode, done.stderr) and (
            f"at step {at}" in done.stderr)
        out["silent"] = done.returncode == 0
        before = checkpoints(workdir)
        out["detail"] = done.stderr.strip().splitlines()[-1][:110] if done.stderr else ""
    else:  # A stopped run, its latest checkpoint damaged.
        done = run([*cmd, f"--stop_at_step={steps // 2 + 2}"])
        latest = max(checkpoints(workdir), key=int)
        target = largest_file(workdir / "checkpoints" / latest)
        if name == "checkpoint_bytes_flipped":
            flip(target)
        else:
            target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        before = checkpoints(workdir)
        out["detail"] = f"step {latest} damaged"

    resumed = run(cmd)
    lost = before - checkpoints(workdir) - moved_aside(workdir)
    # Checkpoints pruned by keep_checkpoints as the rerun went on are not lost files.
    lost = {s for s in lost if int(s) >= min(map(int, checkpoints(workdir) or {"0"}))}
    got = result(workdir)
    out["lost"] = bool(lost) or got is None
    out["exact_resume"] = resumed.returncode == 0 and got == reference
    out["silent"] = out["silent"] or (resumed.returncode == 0 and got != reference)
    if name.startswith("checkpoint_"):
        out["clean_error"] = "warning:" in resumed.stderr and "Traceback" not in resumed.stderr
        if not out["clean_error"]:
            out["detail"] += f"; rerun stderr: {resumed.stderr[-300:]!r}"
    if resumed.returncode:
        out["detail"] += f"; rerun rc {resumed.returncode}: {resumed.stderr[-200:]}"
    return out


def counts(outcomes: list[dict]) -> dict[str, int]:
    return {"cases": len(outcomes),
            "clean errors": sum(o["clean_error"] for o in outcomes),
            "exact resumes": sum(o["exact_resume"] for o in outcomes),
            "silent results": sum(o["silent"] for o in outcomes),
            "files lost": sum(o["lost"] for o in outcomes)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--keep", default=None, help="directory to keep the runs in")
    args = parser.parse_args(argv)
    names = args.cases.split(",")
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    rng = random.Random(args.seed)
    root = Path(args.keep or tempfile.mkdtemp(prefix="kfor1-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    done = run(train_cmd(root / "reference", args.steps))
    if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
        return 1
    reference = result(root / "reference")
    outcomes = []
    for name in names:
        outcome = run_case(name, root, args.steps, reference, rng)
        outcomes.append(outcome)
        print(f"{name:32s} clean={outcome['clean_error']!s:5s} "
              f"exact={outcome['exact_resume']!s:5s} silent={outcome['silent']!s:5s} "
              f"lost={outcome['lost']!s:5s} {outcome['detail']}", flush=True)
    total = counts(outcomes)
    print("  ".join(f"{k}: {v}" for k, v in total.items()))
    write_json(args.json, {"outcomes": outcomes, "counts": total})
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if total["silent results"] == 0 and total["files lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
