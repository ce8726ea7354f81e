"""Regenerates ``docs/results.md``: what kfor1 finds on real data that ships with the project
(``../shared/data/cifar10``, subsets) or with Python packages (scikit-learn's digits), sized for
2 CPU cores (the whole document in under an hour):

1. transfer from ImageNet EfficientNet-Lite0: every patch preset, with ``kfor1 sweep``;
2. multi-task: K = 3 tasks (CIFAR-10 vehicles, CIFAR-10 animals, digits) in one compiled step
   against each task alone, with the backbone frozen and trained jointly;
3. domain adaptation across resolutions: one S/B patch per resolution against one model
   evaluated at resolutions it was not trained at;
4. the statistics patches (``stats``: AdaBN, ``input_stats``: the stem's) against ``logits`` on
   digits as they are and washed out to 5% of their contrast;
5. the paper's claims, one line each, held or not, with the numbers and the seed.

    python -m benchmarks.results                      # docs/results.md, runs in runs/results
    python -m benchmarks.results --tiny --out /tmp/r.md  # seconds: checks the script runs

Every run is a kfor1 run directory under ``--workdir`` and is kept: a rerun reuses finished
runs (delete the directory to start over).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, SHARED_DATA

CIFAR = SHARED_DATA / "cifar10"
VEHICLES = ("airplane", "automobile", "ship", "truck")
ANIMALS = ("bird", "cat", "deer", "dog", "frog", "horse")


@dataclasses.dataclass(frozen=True)
class Budget:
    """The sizes of one regeneration (the defaults: under an hour on 2 cores)."""

    train_per_class: int = 100
    test_per_class: int = 50
    resolution: int = 64
    steps: int = 150
    batch: int = 32
    resolutions: tuple[int, ...] = (64, 96, 128)
    lrs: str = "auto"
    model: str = "efficientnet_lite0"


TINY = Budget(train_per_class=6, test_per_class=4, resolution=32, steps=4, batch=8,
              resolutions=(32, 48), lrs="x1", model="tests.user_model:stem_factory")
STATS_PATCHES = ("logits", "stats+logits", "input_stats+logits")
CONTRASTS = (1.0, 0.05)


def faded_digits(root: Path, contrast: float) -> str:
    """scikit-learn's digits as an ImageFolder of PNGs, every pixel value x made
    ``128 + contrast * (x - 128)`` (0.05: grey 128 +- 6, a washed-out scan); returns the
    ``folder:`` dataset. Written once; an existing folder is reused."""
    from PIL import Image

    from kfor1.data.digits import digits_arrays

    if not (root / "test").is_dir():
        tmp = root.with_name(root.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        for split, (x, y) in digits_arrays().items():
            for i, (image, label) in enumerate(zip(x, y)):
                (tmp / split / str(label)).mkdir(parents=True, exist_ok=True)
                faded = 128 + contrast * (image.astype(np.float32) - 128)
                Image.fromarray(np.round(faded).astype(np.uint8)).save(
                    tmp / split / str(label) / f"{i}.png")
        tmp.rename(root)
    return f"folder:{root}"


def _subset(cifar: Path, root: Path, classes, budget: Budget) -> str:
    """A folder dataset of the first images of ``classes`` (symlinks into the CIFAR-10 copy)."""
    for split, n in (("train", budget.train_per_class), ("test", budget.test_per_class)):
        for c in classes:
            out = root / split / c
            if out.exists():
                continue
            out.mkdir(parents=True)
            for f in sorted(os.listdir(cifar / split / c))[:n]:
                os.symlink(cifar / split / c / f, out / f)
    return f"folder:{root}"


def _config(budget: Budget, datasets, *, patch="scale_bias+logits", resolutions=None,
            names=None, **fields):
    from kfor1.trainer.config import base_config, task

    c = base_config()
    c.model = budget.model
    c.patch = patch
    resolutions = resolutions or [budget.resolution] * len(datasets)
    c.tasks = [task(d, name=(names[i] if names else ""), resolution=resolutions[i])
               for i, d in enumerate(datasets)]
    c.num_steps, c.batch_size = budget.steps, budget.batch
    c.warmup_steps = max(1, budget.steps // 10)
    c.log_every = max(1, budget.steps // 3)
    c.checkpoint_every = budget.steps
    c.eval_batch_size = 40 if budget is not TINY else 8
    c.progress = False
    c.validation = "0.1"
    for key, value in fields.items():
        c[key] = value
    return c


def _train(config, workdir: Path) -> dict:
    from kfor1.trainer.loop import train

    if (workdir / "summary.json").exists():
        return json.loads((workdir / "summary.json").read_text())
    return train(config, str(workdir))


def _accuracy_at(patch_dir: str, dataset: str, resolution: int) -> float:
    """Test accuracy of a patch's model at ``resolution`` (not necessarily its own)."""
    import jax

    from kfor1 import data as kdata
    from kfor1.files.patchfile import load_patched

    model = load_patched(patch_dir)
    pre = model.preprocessing
    ds, _ = kdata.load_source(dataset, "test", class_names=None)
    apply = jax.jit(lambda x: model.model.apply(model.variables, x, train=False))
    correct = count = 0
    for b in kdata.eval_batches(ds, resolution=resolution, mean=pre.mean, std=pre.std,
                                batch_size=50, crop_fraction=pre.crop_fraction):
        hit = np.asarray(apply(b["images"])).argmax(-1) == b["labels"]
        correct += int(hit[b["mask"]].sum())
        count += int(b["mask"].sum())
    return correct / count


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def transfer(budget: Budget, work: Path, data: str) -> tuple[list[str], dict]:
    from kfor1.trainer.sweep import DEFAULT_PATCHES, sweep

    patches = DEFAULT_PATCHES if budget is not TINY else STATS_PATCHES + ("scale_bias+logits",)
    result = sweep(_config(budget, [data]), str(work / "sweep"), patches, budget.lrs)
    md = (work / "sweep" / "sweep.md").read_text().split("\n", 2)[2]
    lines = [f"## 1. Transfer from ImageNet {budget.model}: every patch, `kfor1 sweep`", "",
             f"Data: `{data.split('/')[-1]}`, {budget.resolution} px, {budget.steps} steps of "
             f"{budget.batch} images, learning-rate grid `{budget.lrs}` per patch, seed 0.", "",
             md.replace("## Every run", "### Every run"), "",
             "![accuracy against trainable parameters](results_sweep.png)", ""]
    return lines, {r["patch"]: r for r in result["chosen"]}


def multitask(budget: Budget, work: Path, data: dict) -> tuple[list[str], dict]:
    names = list(data)
    sets = list(data.values())
    out = {}
    rows = []
    for joint in (False, True):
        key = "joint" if joint else "frozen"
        together = _train(_config(budget, sets, names=names, train_shared=joint),
                          work / f"mtl_{key}")
        alone = {n: _train(_config(budget, [d], names=[n], train_shared=joint),
                           work / f"alone_{key}_{n}") for n, d in data.items()}
        for n in names:
            a, t = alone[n]["tasks"][n]["accuracy"], together["tasks"][n]["accuracy"]
            rows.append((n, key, _pct(a), _pct(t), f"{100 * (t - a):+.1f}"))
        out[key] = {"alone": float(np.mean([alone[n]["tasks"][n]["accuracy"] for n in names])),
                    "together": together["totals"]["mean_accuracy"],
                    "fraction": together["totals"]["patch_fraction"]}
        out["examples"] = sum(together["tasks"][n]["examples"] for n in names)
    from kfor1.table import markdown_table

    k = len(names)
    lines = [f"## 2. Multi-task: K = {k} tasks in one compiled step", "",
             f"`scale_bias+logits` patches, {budget.resolution} px, {budget.steps} steps of "
             f"{budget.batch} images per task, seed 0. *Frozen*: the ImageNet backbone is "
             "shared and frozen; *joint*: the backbone is trained on the sum of the task "
             "losses (together) or on the task's own loss (alone, i.e. full fine-tuning plus "
             "the patch). Test accuracy.", "",
             markdown_table(("task", "backbone", "alone", f"K={k} together", "points"), rows,
                            left=2), "",
             f"Storage with a frozen backbone: 1 - p + {k}p models for {k} tasks, p = "
             f"{100 * out['frozen']['fraction']:.2f}% of the model; jointly trained: "
             f"1 + {k}p (one new base), against {k} models alone.", ""]
    return lines, out


def resolutions(budget: Budget, work: Path, data: str) -> tuple[list[str], dict]:
    from kfor1.table import markdown_table

    rs = budget.resolutions
    middle = rs[len(rs) // 2]
    single = _train(_config(budget, [data], names=["single"], resolutions=[middle]),
                    work / f"single_{middle}")
    names = [f"r{r}" for r in rs]
    per = _train(_config(budget, [data] * len(rs), names=names, resolutions=list(rs)),
                 work / "per_resolution")
    rows, out = [], {}
    for name, r in zip(names, rs):
        at_r = _accuracy_at(single["tasks"]["single"]["patch_dir"], data, r)
        own = _accuracy_at(per["tasks"][name]["patch_dir"], data, r)
        rows.append((f"{r} px", _pct(at_r), _pct(own), f"{100 * (own - at_r):+.1f}"))
        out[r] = (at_r, own)
    lines = ["## 3. Domain adaptation across resolutions", "",
             "One backbone, one `scale_bias+logits` patch per resolution ("
             f"{', '.join(map(str, rs))} px, trained in one step), against one "
             f"`scale_bias+logits` model trained at {middle} px and evaluated at each "
             "resolution. Test accuracy, seed 0.", "",
             markdown_table(("evaluated at", f"one model ({middle} px)", "its own patch",
                             "points"), rows), ""]
    return lines, {"middle": middle, "by_resolution": out,
                   "examples": per["tasks"][names[0]]["examples"]}


def statistics(budget: Budget, work: Path) -> tuple[list[str], dict]:
    from kfor1.table import markdown_table

    out, rows = {}, []
    for contrast in CONTRASTS:
        data = faded_digits(work / "data" / f"digits_contrast_{contrast:g}", contrast)
        acc = {}
        for patch in STATS_PATCHES:
            run = _train(_config(budget, [data], patch=patch, names=["digits"],
                                 resolutions=[32]), work / f"stats_{contrast:g}_{patch}")
            acc[patch] = run["tasks"]["digits"]["accuracy"]
            out["examples"] = run["tasks"]["digits"]["examples"]
        out[contrast] = acc
        rows.append((f"{100 * contrast:g}%", *(_pct(acc[p]) for p in STATS_PATCHES)))
    lines = ["## 4. The statistics patches where colour statistics differ from ImageNet's", "",
             f"scikit-learn's digits at 32 px, as they are and washed out (every pixel value x "
             f"made 128 + c (x - 128)); {budget.steps} steps of {budget.batch} images, the "
             "default learning rate for all three, seed 0. `stats` re-estimates every BatchNorm "
             "layer's statistics on the task's images (AdaBN), `input_stats` the stem's only. "
             "Test accuracy.", "",
             markdown_table(("contrast c", *(f"`{p}`" for p in STATS_PATCHES)), rows), "",
             "Why, with converged linear probes layer by layer: `benchmarks/README.md` (\"The "
             "statistics patches, layer by layer\").", ""]
    return lines, out


def _noise(n: int) -> float:
    """Two standard errors of a difference of two accuracies on ``n`` test images each (at the
    worst case, accuracy 50%): differences inside it are not told apart by one seed."""
    return 2 * math.sqrt(2 * 0.25 / max(n, 1))


def _verdict(diff: float, n: int, *, better: bool) -> str:
    """The claim "a beats b" (``better``) or "a is no worse than b", for diff = a - b."""
    noise = _noise(n)
    if diff < -noise:
        return "**did not hold**"
    if diff > noise or (not better and diff >= 0):
        return "**held**"
    return f"**not told apart here** ({100 * diff:+.1f} points, noise ±{100 * noise:.1f})"


def claims(t: dict, m: dict, r: dict, st: dict) -> list[str]:
    lines = ["## The paper's claims, here", "",
             "Each claim in one line, checked against the sections below: *held* / *did not "
             "hold* when the difference exceeds two standard errors of the test accuracies "
             "(one seed, binomial noise), *not told apart* otherwise.", ""]

    transfer_claims = (
        ("A scale-and-bias patch beats training the last layer alone", "scale_bias+logits",
         "logits", True),
        ("Depthwise + S/B + logits is as good as full fine-tuning with under 10% of the "
         "parameters", "depthwise+scale_bias+logits", "full", False),
        ("(AdaBN, cited by the paper) each task's own BatchNorm statistics help a linear head "
         "on CIFAR-10",
         "stats+logits", "logits", True),
    )
    for claim, a_name, b_name, better in transfer_claims:
        if a_name not in t or b_name not in t:
            continue
        a, b = t[a_name], t[b_name]
        diff = a["test_accuracy"] - b["test_accuracy"]
        n = min(a["test_examples"], b["test_examples"])
        lines.append(f"- {claim}: {_verdict(diff, n, better=better)} "
                     f"({_pct(a['test_accuracy'])} against {_pct(b['test_accuracy'])}, for "
                     f"{a['percent_of_model']:.2f}% against {b['percent_of_model']:.2f}% of "
                     "the parameters).")
    faint, low = st[min(CONTRASTS)], min(CONTRASTS)
    for name, what in (("stats+logits", "each task's own BatchNorm statistics (AdaBN)"),
                       ("input_stats+logits", "the task's own statistics of the stem alone")):
        diff = faint[name] - faint["logits"]
        lines.append(f"- {what[0].upper() + what[1:]} help a linear head on digits at "
                     f"{100 * low:g}% contrast: {_verdict(diff, st['examples'], better=True)} "
                     f"({_pct(faint[name])} against {_pct(faint['logits'])}; at full contrast "
                     f"{_pct(st[max(CONTRASTS)][name])} against "
                     f"{_pct(st[max(CONTRASTS)]['logits'])}).")
    f, j = m["frozen"], m["joint"]
    lines.append(f"- K tasks with a frozen backbone in one step lose nothing against each alone "
                 f"(by construction: the step is K independent single-task steps, "
                 f"`tests/test_step.py`; the data order and dropout keys follow a task's index): "
                 f"{_verdict(f['together'] - f['alone'], m['examples'], better=False)} (mean "
                 f"{_pct(f['together'])} together, {_pct(f['alone'])} alone).")
    lines.append(f"- Training the backbone jointly for K tasks is as good as fine-tuning one "
                 f"network per task: "
                 f"{_verdict(j['together'] - j['alone'], m['examples'], better=False)} (mean "
                 f"{_pct(j['together'])} together, {_pct(j['alone'])} alone; 1 + Kp models "
                 "instead of K).")
    others = {res: v for res, v in r["by_resolution"].items() if res != r["middle"]}
    for res, (single, own) in others.items():
        lines.append(f"- A patch of its own at {res} px beats one model trained at "
                     f"{r['middle']} px: {_verdict(own - single, r['examples'], better=True)} "
                     f"({_pct(own)} against {_pct(single)}).")
    return lines + [""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "results"))
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: checks the script")
    parser.add_argument("--cifar", default=str(CIFAR), help="the CIFAR-10 ImageFolder copy")
    args = parser.parse_args(argv)
    cifar_dir = Path(args.cifar)
    budget = TINY if args.tiny else Budget()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if not cifar_dir.is_dir():
        print(f"error: {cifar_dir} is not there: results.md is made from the project's CIFAR-10 "
              "copy", file=sys.stderr)
        return 2
    start = time.perf_counter()
    reused = len(list(work.rglob("summary.json")))
    cifar = _subset(cifar_dir, work / "data" / "cifar10", VEHICLES + ANIMALS, budget)
    vehicles = _subset(cifar_dir, work / "data" / "vehicles", VEHICLES, budget)
    animals = _subset(cifar_dir, work / "data" / "animals", ANIMALS, budget)
    t_lines, t = transfer(budget, work, cifar)
    m_lines, m = multitask(budget, work, {"vehicles": vehicles, "animals": animals,
                                          "digits": "digits"})
    r_lines, r = resolutions(budget, work, cifar)
    s_lines, st = statistics(budget, work)
    minutes = (time.perf_counter() - start) / 60
    record = work / "full_run_minutes.txt"  # What a regeneration from nothing took.
    if not reused:
        record.write_text(f"{minutes:.1f}\n")
    full = f"; from nothing: {float(record.read_text()):.0f} min" if record.exists() else ""
    header = [
        "# What kfor1 finds on real data", "",
        "Regenerated by `python -m benchmarks.results` (this invocation: "
        f"{minutes:.0f} min on {os.cpu_count()} CPU cores"
        + (f", reusing {reused} finished runs of its --workdir" if reused else "") + full
        + "). CIFAR-10 subsets from the project's "
        f"copy: {budget.train_per_class} training and {budget.test_per_class} test images per "
        "class; scikit-learn's digits (1,437 train, 360 test). Every run holds 10% of its "
        "train split out for validation; model choices read it, the test split is read once "
        "per run at its end. One seed (0) throughout.", "",
    ]
    text = "\n".join(header + claims(t, m, r, st) + t_lines + m_lines + r_lines + s_lines)
    text = text.replace("### Every run", "### 1b. Every run of the sweep")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    png = work / "sweep" / "sweep.png"
    shutil.copy(png, Path(args.out).parent / "results_sweep.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
