"""Mixed-task requests from files: what ``kfor1 predict --patch A --patch B`` reads and prints.

A request is ``(task, image path)``: from ``TASK=PATH`` arguments, or a file of them, CSV
(``task,path`` rows, an optional header) or JSON lines (``{"task": ..., "path": ...}``).
Everything is checked (tasks served, files present) before an image is decoded.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from kfor1.errors import UserError, one_line
from kfor1.files.patchfile import load_base_for, load_patch
from kfor1.images import read_images
from kfor1.serve.server import PatchServer


class RequestError(UserError, ValueError):
    """A request that names no served task, no file, or is not ``TASK=PATH``."""


def parse_tagged(items: Sequence[str], tasks: Sequence[str]) -> list[tuple[str, str]]:
    """``TASK=PATH`` arguments as ``(task, path)``; with a single task, a bare ``PATH`` is
    that task's."""
    out = []
    for item in items:
        task, sep, path = item.partition("=")
        if sep and task in tasks:
            out.append((task, path))
        elif len(tasks) == 1:
            out.append((tasks[0], item))
        else:
            raise RequestError(
                f"{item!r}: tag each image with its task, TASK=PATH (tasks: "
                f"{', '.join(tasks)})" + (f"; no task {task!r}" if sep else "")
            )
    return out


def read_requests(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(task, path)`` rows of a CSV (``task,path``) or JSON-lines file; relative image paths
    are relative to the file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise RequestError(f"no such request file: {path}")
    root = os.path.dirname(os.path.abspath(path))
    rows: list[tuple[str, str]] = []
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    if path.endswith((".jsonl", ".json")):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                rows.append((str(item["task"]), str(item["path"])))
            except (ValueError, KeyError, TypeError):
                raise RequestError(f"{path}:{n}: expected {{\"task\": ..., \"path\": ...}}, "
                                   f"got {line.strip()[:60]!r}") from None
    else:
        for n, row in enumerate(csv.reader(text.splitlines()), 1):
            if not row or (n == 1 and [c.strip().lower() for c in row] == ["task", "path"]):
                continue
            if len(row) != 2:
                raise RequestError(f"{path}:{n}: expected 'task,path', got {','.join(row)!r}")
            rows.append((row[0].strip(), row[1].strip()))
    return [(task, p if os.path.isabs(p) else os.path.join(root, p)) for task, p in rows]


def open_server(
    patch_dirs: Sequence[str | os.PathLike], base: str | os.PathLike | None = None,
    weights: str | None = None, capacity: int | None = None, model: str | None = None,
    allow_unverified: bool = False,
) -> PatchServer:
    """A server of the patches in ``patch_dirs`` on the base the first records (or ``base``,
    an exported base directory; ``weights``, a weights file): every patch must fit it.
    ``model`` names a user model the patches record (``load_base_for``); ``allow_unverified``
    loads patches without a content hash."""
    if not patch_dirs:
        raise RequestError("give at least one --patch DIR")
    patches = [load_patch(d, allow_unverified) for d in patch_dirs]
    names = [p.meta.get("task") for p in patches]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise RequestError(f"two patches are both task {repeated[0]!r}; serve one of them")
    pretrained = load_base_for(patches[0], patch_dirs[0], weights, base, model)
    return PatchServer(pretrained, patches, capacity=capacity or max(16, len(patches)))


def predict_requests(server: PatchServer, requests: Sequence[tuple[str, str]], k: int = 5,
                     batch_size: int = 32, skip_unreadable: bool = False) -> list[dict[str, Any]]:
    """Per request, its task, path and top ``k`` classes (``{"index", "name",
    "probability"}``), most probable first. An image that cannot be decoded raises
    ``ImageReadError``, or with ``skip_unreadable`` its entry has ``"error"`` (the message)
    instead of ``"top"`` and the other requests are still served."""
    tasks = server.tasks
    for task, path in requests:
        if task not in tasks:
            raise RequestError(f"request for task {task!r} ({path}): served tasks are "
                               f"{', '.join(tasks)}")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such image file: {path}")
    out = []
    for start in range(0, len(requests), batch_size):
        part = requests[start: start + batch_size]
        images, errors = read_images([p for _, p in part], [tasks[t].resolution for t, _ in part],
                                     [tasks[t].crop_fraction for t, _ in part])
        if errors and not skip_unreadable:
            raise errors[0]
        good = [(r, image) for r, image in zip(part, images) if image is not None]
        tops = iter(server.predict([image for _, image in good],
                                   [t for (t, _), _ in good]).top_k(k) if good else [])
        failed = iter(errors)
        for (task, path), image in zip(part, images):
            if image is None:
                out.append({"task": task, "path": path, "error": one_line(next(failed))})
                continue
            out.append({"task": task, "path": path, "top": [
                {"index": i, "name": name, "probability": float(np.float32(p))}
                for i, name, p in next(tops)]})
    return out
