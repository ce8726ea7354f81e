"""Training checkpoints through orbax's ``CheckpointManager``, verified when restored.

Checkpoints are written atomically (a temporary directory renamed when complete), so a crash
while saving never corrupts the latest good checkpoint; only ``keep`` are kept.

Why hashes as well: orbax's files are compressed chunks without checksums, so flipped bytes
restore silently into other weights (a run then trains to other metrics, exit 0), and a
truncated file fails deep inside TensorStore. Each save records the SHA-256 of the state in the
step's metadata, and once the step is on disk a manifest of its files' sizes and hashes; a
restore checks the files first (before TensorStore reads a broken one), then re-hashes what it
read and checks the frozen backbone against the base it was trained on. A corrupt latest
checkpoint falls back to the previous one with a warning (and is moved aside, so the step can
be saved again); a corrupt checkpoint asked for by step is an error naming it.

A checkpoint directory deleted while the run writes into it (to free space, by a cleanup job)
loses the save in flight and nothing else: a warning says so, the directory is made again and
the next save (or the end of the run) writes a checkpoint there; what orbax and TensorStore
print about the failed save is dropped (``kfor1.trainer.orbax_noise``).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from kfor1.errors import UserError
from kfor1.files.atomic import DiskFullError, atomic_write, check_free_space, is_disk_full
from kfor1.multitask.state import MultiTaskState
from kfor1.trainer.orbax_noise import OrbaxNoise
from kfor1.tree import flatten

DIGEST_KEY = "kfor1_sha256"
SENTINEL = ".kfor1"  # In the checkpoint directory: gone if the directory was deleted.
FILES = "kfor1_files.json"  # In each finished step's directory: its files' sizes and hashes.


class CheckpointCorruptError(UserError, RuntimeError):
    """A checkpoint whose files do not hold what was saved (flipped bytes, a truncated file)."""


def _as_tree(state: MultiTaskState) -> dict[str, Any]:
    return {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
    }


def _host(leaf: Any) -> np.ndarray | None:
    """A leaf's value on this host, or None for an array sharded across processes (each
    process then holds only a part; the digest leaves it out rather than gather it)."""
    if isinstance(leaf, jax.Array):
        if leaf.is_fully_addressable:
            return np.asarray(leaf)
        if leaf.is_fully_replicated:
            return np.asarray(leaf.addressable_data(0))
        return None
    return np.asarray(leaf)


def digest(tree: Any) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes (``tree`` as saved)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        value = _host(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        if value is None:
            h.update(b"<sharded>")
            continue
        h.update(f"{value.dtype.str}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def _mismatch(error: BaseException) -> bool:
    """orbax's errors for a tree of another structure or shape (the config changed), as
    opposed to unreadable files."""
    text = str(error)
    return isinstance(error, ValueError) and (
        "structures do not match" in text or "not compatible with the stored shape" in text
        or "dtype" in text.split("\n")[0].lower())


class Checkpointer:
    """Saves and restores ``MultiTaskState``s under ``directory``."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        self.directory = os.path.abspath(os.fspath(directory))
        self._keep = keep
        self._unsealed: set[int] = set()  # Steps this checkpointer saved, not yet sealed.
        self._abandoned: list[ocp.CheckpointManager] = []  # Managers of a deleted directory.
        self._manager = self._open()
        self._failed = False  # A save was lost to a deleted directory (its noise may follow).
        self._noise = OrbaxNoise(self.directory, lambda: self._failed or self._deleted())
        self._noise.install()

    def _deleted(self) -> bool:
        """Whether the directory was deleted (and maybe made again) since it was opened."""
        return not os.path.exists(os.path.join(self.directory, SENTINEL))

    def _open(self) -> ocp.CheckpointManager:
        manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True),
        )
        # An inode number is reused by a directory made again; a file inside it is not.
        with contextlib.suppress(OSError):  # A read-only workdir: only restores follow.
            open(os.path.join(self.directory, SENTINEL), "a", encoding="utf-8").close()
        return manager

    def _finish_pending(self) -> bool:
        """Waits for the saves in flight and seals them. Returns False when the directory was
        deleted under them: they are lost (``_recover``)."""
        try:
            self._manager.wait_until_finished()
            self._seal()
        except Exception as e:
            if is_disk_full(e) or not self._deleted():
                raise
        return self._recover() if self._deleted() else True

    def _recover(self) -> bool:
        """After the directory was deleted: a new manager (and directory), and a warning that
        names the lost steps. Returns False if a save was lost."""
        lost = sorted(self._unsealed)
        self._unsealed.clear()
        # Not closed: its failed save's TensorStore callbacks would land on a closed event loop.
        self._abandoned.append(self._manager)
        self._failed = True
        self._noise.failed()
        self._manager = self._open()
        what = (f"the checkpoint of step {', '.join(map(str, lost))} is lost" if lost
                else "its earlier checkpoints are gone")
        print(f"warning: {self.directory} was deleted while the run wrote into it; {what}, "
              "and checkpoints are written there again from the next save", file=sys.stderr)
        return not lost

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: MultiTaskState, force: bool = False) -> None:
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return
        tree = _as_tree(state)
        resume = self.latest_step()
        fix = ("free space, lower config.keep_checkpoints, or train in a --workdir on another "
               "disk; " + (f"the run resumes from step {resume}" if resume is not None
                           else "no checkpoint was written"))
        what = f"the checkpoint of step {step}"
        with _disk_full_as_one_line(self.directory, what, fix):
            # The previous save's bytes must be on disk before the free space means anything.
            self._finish_pending()
            try:
                check_free_space(self.directory, _nbytes(tree), what, fix)
                self._manager.save(step, args=ocp.args.StandardSave(tree), force=force,
                                   custom_metadata={DIGEST_KEY: digest(tree)})
                self._unsealed.add(step)
            except Exception as e:
                if is_disk_full(e) or isinstance(e, DiskFullError) or not self._deleted():
                    raise
                self._unsealed.add(step)
                self._recover()

    def restore(
        self, template: MultiTaskState, step: int | None = None, *,
        frozen: Iterable[str] = (), quarantine: bool = False,
    ) -> MultiTaskState:
        """Restores into the structure, dtypes and shardings of ``template``, verified.

        Args:
          template: a state of this run (``Setup.init_state()``).
          step: the checkpoint to restore; None: the latest that is intact, falling back past
            corrupt ones with a warning.
          frozen: ``params`` paths the run never trains (its frozen backbone): restored, they
            must equal ``template``'s (the pretrained base).
          quarantine: move a corrupt checkpoint that was fallen back from to
            ``<directory>.corrupt/`` (a resuming run: it will save that step again).

        Raises:
          CheckpointCorruptError: the checkpoint asked for, or every one, is corrupt.
        """
        steps = sorted(self._manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step is not None and step not in steps:
            raise FileNotFoundError(
                f"no checkpoint at step {step} in {self.directory}; it keeps steps "
                f"{', '.join(map(str, steps))} (older ones are pruned: config.keep_checkpoints)"
            )
        candidates = [step] if step is not None else steps[::-1]
        for i, candidate in enumerate(candidates):
            try:
                return self._restore(template, candidate, set(frozen))
            except CheckpointCorruptError as e:
                if step is not None:
                    raise
                if i + 1 == len(candidates):
                    raise CheckpointCorruptError(
                        f"every checkpoint in {self.directory} is corrupt (latest: {e}); "
                        "train in a new --workdir") from None
                print(f"warning: {e}; using the checkpoint at step {candidates[i + 1]} "
                      "instead", file=sys.stderr)
                if quarantine:
                    self._quarantine(candidate)
        raise AssertionError("unreachable")

    def _restore(self, template: MultiTaskState, step: int, frozen: set[str]) -> MultiTaskState:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _as_tree(template))
        where = f"the checkpoint at step {step} in {self.directory}"
        self._verify_files(step, where)
        try:
            tree = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # noqa: BLE001 - orbax/TensorStore raise bare Exceptions.
            if _mismatch(e):
                raise ValueError(
                    f"{where} does not fit this run's model, patch, tasks or optimizer (the "
                    "config changed?); train in a new --workdir or restore the original config "
                    f"({str(e).splitlines()[0]})"
                ) from None
            raise CheckpointCorruptError(
                f"{where} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
            ) from None
        saved = (self._manager.metadata(step).custom_metadata or {}).get(DIGEST_KEY)
        if saved is not None and digest(tree) != saved:
            raise CheckpointCorruptError(f"{where} is corrupt (its content hash does not match "
                                         "the one saved with it)")
        if frozen:
            restored, base = flatten(tree["params"]), flatten(template.params)
            changed = sorted(p for p in frozen if not _equal(restored[p], base[p]))
            if changed:
                raise CheckpointCorruptError(
                    f"{where} holds a frozen backbone that differs from this run's base in "
                    f"{len(changed)} tensors (e.g. {changed[0]}): the checkpoint is corrupt, or "
                    "config.weights now names other weights than the run was trained on")
        return template.replace(**tree)

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            aside = os.path.join(f"{self.directory}.corrupt", f"{step}-{int(time.time())}")
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), aside)
            print(f"warning: moved the corrupt checkpoint to {aside}", file=sys.stderr)
        self._manager.reload()

    def wait(self) -> bool:
        """Waits for the saves in flight; False if they were lost (the directory was deleted)."""
        with _disk_full_as_one_line(self.directory, "a checkpoint",
                                    "free space or train in a --workdir on another disk"):
            return self._finish_pending()

    def _seal(self) -> None:
        """Writes each finished step's file manifest (``FILES``: path -> size and SHA-256), so
        a restore finds flipped or missing bytes before TensorStore reads them (a truncated
        chunk read by TensorStore fails on one thread while others still run)."""
        if jax.process_index() > 0:
            return
        for step in sorted(self._unsealed & set(self._manager.all_steps())):
            self._unsealed.discard(step)
            step_dir = os.path.join(self.directory, str(step))
            manifest = os.path.join(step_dir, FILES)
            if os.path.isdir(step_dir) and not os.path.exists(manifest):
                atomic_write(manifest, json.dumps(_file_hashes(step_dir)))

    def _verify_files(self, step: int, where: str) -> None:
        step_dir = os.path.join(self.directory, str(step))
        manifest = os.path.join(step_dir, FILES)
        if not os.path.exists(manifest):
            return  # Killed before it was sealed: the content hash still checks it.
        try:
            with open(manifest, encoding="utf-8") as f:
                expected = json.load(f)
        except ValueError:
            raise CheckpointCorruptError(f"{where} is corrupt (its file manifest {FILES} "
                                         "cannot be read)") from None
        actual = _file_hashes(step_dir)
        for path, (size, sha) in expected.items():
            if path not in actual:
                raise CheckpointCorruptError(f"{where} is corrupt ({path} is missing)")
            if actual[path][0] != size:
                raise CheckpointCorruptError(
                    f"{where} is corrupt ({path} has {actual[path][0]} bytes, not {size}: "
                    "truncated?)")
            if actual[path][1] != sha:
                raise CheckpointCorruptError(f"{where} is corrupt ({path} was changed after it "
                                             "was written)")

    def close(self, state: MultiTaskState | None = None) -> None:
        """Finishes the saves in flight and closes the manager. ``state``: the run's last state
        (not donated to a later step), saved again, synchronously, if its save was lost."""
        try:
            if not self.wait() and state is not None:
                self.save(state)
                self.wait()
        finally:
            self._manager.close()
            if self._abandoned:  # Their failed writes are reported as they are freed: now.
                self._abandoned.clear()
                gc.collect()
            # After a lost save, TensorStore's last callbacks can land after close: the
            # closed-event-loop filter stays for the process (it drops nothing else).
            self._noise.remove(keep_unraisable=self._failed)


def _file_hashes(step_dir: str) -> dict[str, tuple[int, str]]:
    out = {}
    for root, _, names in os.walk(step_dir):
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel == FILES or name.startswith(".tmp-"):
                continue
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[rel] = (os.path.getsize(path), h.hexdigest())
    return out


def _nbytes(tree: Any) -> int:
    return sum(int(getattr(leaf, "nbytes", 0)) for leaf in jax.tree.leaves(tree))


@contextlib.contextmanager
def _disk_full_as_one_line(directory: str, what: str, fix: str) -> Iterator[None]:
    """A full disk while orbax writes (its threads raise TensorStore's RESOURCE_EXHAUSTED as a
    ValueError) as one ``DiskFullError``."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a full disk.
        if not is_disk_full(e):
            raise
        free = shutil.disk_usage(directory if os.path.exists(directory) else ".").free
        raise DiskFullError(f"disk full while writing {what} in {directory} "
                            f"({free / 2**20:.1f} MB free); {fix}") from None


def _equal(a: Any, b: Any) -> bool:
    x, y = _host(a), _host(b)
    return x is None or y is None or np.array_equal(x, y)
