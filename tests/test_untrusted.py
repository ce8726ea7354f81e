"""Every file kfor1 reads may be hostile (issue 31): patch, base and run files are bounded,
regular, inside their folder, parsed as data, and nothing they name is imported or opened.

Read as a specification of ``kfor1.untrusted``, of ``kfor1.models.registry.check_named_by_file``
and of how ``kfor1.files`` and ``kfor1.trainer.workdir`` use them. Families: *code named by a
file* (a patch, base or run naming a model factory), *unverified patches* (no content hash),
*unbounded files* (devices, links out of the folder, deep nesting, oversized files) and *paths
named by a file* (a patch's weights file or base folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kfor1.errors import UserError
from kfor1.files.patchfile import Patch, PatchFileError, load_patch, load_patched, write_patch
from kfor1.models import UnknownModelError
from kfor1.models.registry import check_named_by_file
from kfor1.trainer import cli
from kfor1.untrusted import UntrustedFileError, parse_json, read_bytes, read_json, regular_file

MARKER_MODULE = "kfor1_marker_module"


@pytest.fixture
def patch_dir(trained_run, tmp_path):
    workdir, _ = trained_run
    return Path(shutil.copytree(workdir / "patches" / "colours", tmp_path / "colours"))


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "red.png"
    Image.fromarray(np.full((40, 40, 3), (200, 30, 30), np.uint8)).save(path)
    return path


@pytest.fixture
def marker(tmp_path, monkeypatch):
    """A module that writes a file when imported, importable from here (as a file unpacked
    beside a shared patch would be): the file appearing means kfor1 ran code a file named."""
    folder = tmp_path / "bundle"
    folder.mkdir()
    flag = tmp_path / "IMPORTED"
    (folder / f"{MARKER_MODULE}.py").write_text(
        f"import pathlib\npathlib.Path({str(flag)!r}).write_text('imported')\n"
        "def factory(**kwargs):\n    raise SystemExit('factory called')\n")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.chdir(folder)
    yield flag
    import sys
    sys.modules.pop(MARKER_MODULE, None)


def _rewrite(directory: Path, edit) -> None:
    """Edits patch.json and re-hashes it (``write_patch``): a hostile file made to pass the
    integrity check, so that only the check under test stands in the way."""
    patch = load_patch(directory)
    meta = json.loads(json.dumps(patch.meta))
    edit(meta)
    write_patch(Patch(patch.variables, meta), directory)


def _edit_raw(directory: Path, edit) -> None:
    path = directory / "patch.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# Code named by a file.

@pytest.mark.parametrize("name", [f"{MARKER_MODULE}:factory", "os:abort", "builtins:input",
                                  "this:x"])
def test_code_named_by_a_patch_is_never_imported(patch_dir, marker, name):
    _rewrite(patch_dir, lambda m: m["base"].update(model=name))
    with pytest.raises(UnknownModelError, match="never imports code because a file names it"):
        load_patched(patch_dir)
    assert not marker.exists()


def test_code_named_by_a_patch_through_predict(patch_dir, marker, image, capsys):
    _rewrite(patch_dir, lambda m: m["base"].update(model=f"{MARKER_MODULE}:factory"))
    assert cli.main(["predict", "--patch", str(patch_dir), str(image)]) == 2
    line = _one_error_line(capsys)
    assert str(patch_dir) in line and f"--model {MARKER_MODULE}:factory" in line
    assert not marker.exists()


def test_a_model_named_by_the_user_must_be_the_one_the_patch_records(patch_dir):
    with pytest.raises(UnknownModelError, match="records model 'efficientnet_lite0', not"):
        load_patched(patch_dir, model="mobilenet_v2")
    assert len(load_patched(patch_dir, model="efficientnet_lite0").class_names) == 3


def test_check_named_by_file():
    assert check_named_by_file("efficientnet_lite0", "f") == "efficientnet_lite0"
    assert check_named_by_file("a.b:c", "f", named_by_user="a.b:c") == "a.b:c"
    for bad in (None, 3, "", ["os:abort"]):
        with pytest.raises(UnknownModelError, match="names no model"):
            check_named_by_file(bad, "f")


def test_code_named_by_a_run_directory_through_eval_and_export(trained_run, tmp_path, marker,
                                                                capsys):
    workdir = Path(shutil.copytree(trained_run[0], tmp_path / "run"))
    config = json.loads((workdir / "config.json").read_text())
    config["model"] = f"{MARKER_MODULE}:factory"
    (workdir / "config.json").write_text(json.dumps(config))
    for argv in (["eval", "--workdir", str(workdir)],
                 ["export", "--workdir", str(workdir), "--out", str(tmp_path / "out")]):
        assert cli.main(argv) == 2
        line = _one_error_line(capsys)
        assert "config.json" in line and "never imports code" in line
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_code_named_by_a_patch_is_not_imported_by_the_server(patch_dir, marker, trained_run):
    from kfor1.models import load_pretrained
    from kfor1.serve import PatchServer

    server = PatchServer(load_pretrained("efficientnet_lite0"),
                         [trained_run[0] / "patches" / "colours"], capacity=2)

    def hostile(meta):
        meta["task"] = "hostile"
        meta["base"]["model"] = f"{MARKER_MODULE}:factory"

    _rewrite(patch_dir, hostile)
    with contextlib.suppress(UserError):
        server.add(patch_dir)  # The server's base is the user's; the name is only compared.
    assert not marker.exists()


def test_code_named_by_a_base_file(trained_run, tmp_path, marker):
    from kfor1.files.basefile import load_base_dir

    base = tmp_path / "base"
    base.mkdir()
    (base / "base.json").write_text(json.dumps({
        "format": "kfor1-base", "format_version": 1, "model": f"{MARKER_MODULE}:factory",
        "fingerprint": "0" * 64, "patch_leaves": [], "fields": {},
        "preprocessing": {"mean": [0, 0, 0], "std": [1, 1, 1], "resolution": 32}}))
    (base / "base.msgpack").write_bytes(b"\x80")
    with pytest.raises(UnknownModelError, match="never imports code"):
        load_base_dir(base)
    assert not marker.exists()


# Unverified patches.

def test_a_patch_without_a_hash_is_refused_unless_allowed(patch_dir, image, capsys):
    def rotate_unhashed(meta):
        meta.update(format_version=1)
        meta.pop("content_sha256")
        meta["class_names"] = meta["class_names"][1:] + meta["class_names"][:1]

    _edit_raw(patch_dir, rotate_unhashed)
    with pytest.raises(PatchFileError, match="has no content hash.*--allow-unverified"):
        load_patch(patch_dir)
    assert cli.main(["predict", "--patch", str(patch_dir), str(image)]) == 2
    assert "--allow-unverified" in _one_error_line(capsys)
    with pytest.warns(UserWarning, match="loaded unverified"):
        assert load_patch(patch_dir, allow_unverified=True).num_classes == 3


# Unbounded files.

def test_a_weights_file_linked_to_a_device_is_refused(patch_dir):
    (patch_dir / "patch.msgpack").unlink()
    os.symlink("/dev/zero", patch_dir / "patch.msgpack")
    with pytest.raises(PatchFileError, match="links outside its folder"):
        load_patch(patch_dir)


def test_a_file_linked_out_of_its_folder_is_refused(patch_dir, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.copy(patch_dir / "patch.json", outside)
    (patch_dir / "patch.json").unlink()
    os.symlink(outside, patch_dir / "patch.json")
    with pytest.raises(PatchFileError, match="patch.json .* links outside its folder"):
        load_patch(patch_dir)


def test_a_link_inside_the_folder_is_read(patch_dir):
    os.rename(patch_dir / "patch.json", patch_dir / "meta.json")
    os.symlink("meta.json", patch_dir / "patch.json")
    assert load_patch(patch_dir).num_classes == 3


def test_a_deeply_nested_patch_json_is_refused_in_one_line(patch_dir):
    (patch_dir / "patch.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PatchFileError, match="nests deeper than Python can parse"):
        load_patch(patch_dir)
    _edit_raw_text = {"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}
    (patch_dir / "patch.json").write_text(json.dumps(_edit_raw_text))
    with pytest.raises(PatchFileError, match="nests 35 levels deep, over the 32"):
        load_patch(patch_dir)


def test_weights_that_are_not_a_regular_file_are_refused(capsys, image):
    from kfor1.models import CheckpointFormatError, load_pretrained

    with pytest.raises(CheckpointFormatError, match="is a device, pipe or socket"):
        load_pretrained("efficientnet_lite0", path="/dev/zero")
    assert cli.main(["predict", "--weights", "/dev/zero", str(image)]) == 2
    assert "/dev/zero" in _one_error_line(capsys)


def test_untrusted_reads(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 101)
    with pytest.raises(UntrustedFileError, match="101 bytes, over the 100"):
        read_bytes(big, "big.bin", max_bytes=100)
    assert regular_file(big, "big.bin", max_bytes=101) == 101
    with pytest.raises(UntrustedFileError, match="is a folder"):
        regular_file(tmp_path, "it", max_bytes=10)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UntrustedFileError, match="device, pipe or socket"):
        read_bytes(tmp_path / "fifo", "fifo", max_bytes=10)  # Would block forever if opened.
    with pytest.raises(UntrustedFileError, match="is missing"):
        read_json(tmp_path / "nothing.json", "nothing.json")
    with pytest.raises(UntrustedFileError, match="is not valid JSON"):
        parse_json("{'a': 1}", "x.json")
    assert parse_json('{"a": [1, {"b": 2}]}', "x.json", max_depth=3) == {"a": [1, {"b": 2}]}
    with pytest.raises(UntrustedFileError, match="nests 3 levels"):
        parse_json('{"a": [1, {"b": 2}]}', "x.json", max_depth=2)


def test_run_files_are_read_bounded(trained_run, tmp_path):
    from kfor1.trainer.workdir import WorkdirError, load_config, restore

    workdir = Path(shutil.copytree(trained_run[0], tmp_path / "run"))
    (workdir / "tasks.json").write_text(json.dumps([{"name": "digits", "class_names": [1, 2]}]))
    with pytest.raises(WorkdirError, match="tasks.json is not a list of tasks"):
        restore(workdir)
    (workdir / "config.json").write_text("[" * 50 + "]" * 50)
    with pytest.raises(WorkdirError, match="config.json nests 50 levels"):
        load_config(workdir)


# Paths named by a file.

def test_a_weights_path_named_by_a_patch_is_not_opened(patch_dir):
    _rewrite(patch_dir, lambda m: m["base"].update(weights="/etc/passwd"))
    with pytest.raises(PatchFileError, match="opens no path a file names.*--weights FILE"):
        load_patched(patch_dir)


def test_a_base_folder_named_by_a_patch_is_only_its_runs(patch_dir):
    _rewrite(patch_dir, lambda m: m["base"].update(trained=True, dir="../../../../etc"))
    with pytest.raises(PatchFileError, match="points to '../../../../etc'.*--base"):
        load_patched(patch_dir)


def test_warnings_do_not_hide_refusals(patch_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_patch(patch_dir).num_classes == 3


# Names that become paths, and names that reach a terminal.

@pytest.mark.parametrize("name", ["..", ".", "../../../x", "/tmp/x", "a\\b", "x\ny", "-rf",
                                  "n" * 129])
def test_task_names_that_are_not_file_names_are_refused(colours, name):
    from tiny_runs import run_config

    from kfor1.trainer.config import ConfigError, task
    from kfor1.trainer.experiment import check_values

    config = run_config(colours)
    config.tasks = [task(f"folder:{colours}", name=name, resolution=32)]
    with pytest.raises(ConfigError, match="it becomes a file name"):
        check_values(config)


def test_a_task_named_by_its_folder_dot_dot_is_refused_before_any_work(colours, tmp_path, capsys,
                                                                      monkeypatch):
    workdir = tmp_path / "run"
    argv = ["train", "--config", f"configs/transfer.py:dataset=folder:{colours}/x/..",
            "--workdir", str(workdir)]
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert cli.main(argv) == 2
    assert "'..' has no name of its own" in _one_error_line(capsys)
    assert not workdir.exists()


def test_a_run_whose_task_names_escape_is_not_exported(trained_run, tmp_path, capsys):
    workdir = Path(shutil.copytree(trained_run[0], tmp_path / "run"))
    for name in ("config.json", "tasks.json"):
        text = (workdir / name).read_text().replace('"colours"', '"../../escaped"')
        (workdir / name).write_text(text)
    assert cli.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "o")]) == 2
    assert "has a path separator" in _one_error_line(capsys)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "o").exists()


def test_a_patch_whose_task_escapes_is_refused(patch_dir):
    path = patch_dir / "patch.json"
    meta = json.loads(path.read_text())
    meta["task"] = "../../x"
    patch = Patch(load_patch(patch_dir).variables, meta)
    write_patch(patch, patch_dir)  # Re-hashed: only the name check stands in the way.
    with pytest.raises(PatchFileError, match="its task '../../x' has a path separator"):
        load_patch(patch_dir)


def test_class_names_are_printed_escaped(patch_dir, image, capsys):
    _rewrite(patch_dir, lambda m: m.update(class_names=["bl\x1b[2Jue", "gr\neen", "red"]))
    assert cli.main(["predict", "--patch", str(patch_dir), "--top-k", "3", str(image)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "bl\\x1b[2Jue" in out and "gr\\neen" in out


# Values nobody checked.

def test_the_server_refuses_pixels_it_would_cast(trained_run):
    from kfor1.models import load_pretrained
    from kfor1.serve import PatchServer

    server = PatchServer(load_pretrained("efficientnet_lite0"),
                         [trained_run[0] / "patches" / "colours"], capacity=2)
    size = server.tasks["colours"].resolution
    good = np.full((size, size, 3), 200, np.uint8)
    assert server.predict([good], ["colours"]).probabilities.shape[0] == 1
    cases = {
        "float64 .*values span 0.784 to 0.784.*astype": good / 255.0,
        "float32 .*NaN": np.full((size, size, 3), np.nan, np.float32),
        "int16; .*wrap": good.astype(np.int16) + 256,
        "bool;": good > 0,
    }
    for message, image in cases.items():
        with pytest.raises(ValueError, match=f"example 1 is {message}"):
            server.predict([good, image], ["colours", "colours"])
    with pytest.raises(ValueError, match="center_crop_resize"):
        server.predict([good[:-1]], ["colours"])


def test_a_read_only_workdir_is_one_line(colours, tmp_path, capsys, monkeypatch):
    """EROFS cannot be made by chmod for root (CI runs as root): the file system's refusal is
    raised where the workdir's first file is opened, as a read-only mount would."""
    import errno

    import kfor1.trainer.workdir as workdir_module

    workdir = tmp_path / "run"
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(workdir)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(workdir_module.os, "open", read_only)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    argv = ["train", "--config", f"configs/transfer.py:dataset=folder:{colours},resolution=32",
            "--workdir", str(workdir), "--config.num_steps=1", "--config.batch_size=8",
            "--config.eval_batch_size=8"]
    assert cli.main(argv) == 2
    assert "read-only file system" in _one_error_line(capsys)


# Tracebacks that became one line.

@pytest.mark.parametrize("body, where", [
    ("def get_config(arg):\n    x = 1\n    raise RuntimeError('boom')\n",
     " line 3 (in get_config): RuntimeError: boom"),
    ("def get_config(arg)\n    pass\n", " line 1: SyntaxError: expected ':'"),
    ("import os\nraise KeyError('top')\n", " line 2: KeyError: 'top'"),
    ("def get_config():\n    return None\n", ": get_config() takes 0 positional arguments but 1 "
     "was given (get_config takes the text after ':' as one argument, or none without it)"),
])
def test_a_config_file_that_fails_is_named_by_file_and_line(tmp_path, capsys, body, where):
    config = tmp_path / "my_config.py"
    config.write_text(body)
    for command in ("train", "sweep"):
        argv = [command, "--config", f"{config}:x=1", "--workdir", str(tmp_path / "w")]
        assert cli.main(argv) == 2
        assert _one_error_line(capsys) == f"error: config file {config}{where}"
    assert not (tmp_path / "w").exists()


# Lost and mixed runs.

def test_a_resume_with_another_dataset_is_refused_before_anything_is_written(
        trained_run, colours, tmp_path):
    from tiny_runs import run_config, write_folder

    from kfor1.trainer.config import task
    from kfor1.trainer.loop import train
    from kfor1.trainer.workdir import WorkdirError

    workdir = Path(shutil.copytree(trained_run[0], tmp_path / "run"))
    before = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
    other = write_folder(tmp_path / "other", classes=("red", "green"))
    config = run_config(colours, num_steps=8)
    config.tasks[1] = task(f"folder:{other}", name="colours", resolution=32)
    with pytest.raises(WorkdirError, match="holds another run .*tasks .*other"):
        train(config, str(workdir))
    same_names = write_folder(tmp_path / "again")  # Same classes, another dataset.
    config.tasks[1] = task(f"folder:{same_names}", name="colours", resolution=32)
    with pytest.raises(WorkdirError, match="holds another run"):
        train(config, str(workdir))
    config = run_config(colours, num_steps=8, patch="logits")
    with pytest.raises(WorkdirError, match="patch 'scale_bias\\+logits' -> 'logits'"):
        train(config, str(workdir))
    after = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"}


def test_a_resume_with_more_steps_is_the_same_run(trained_run, colours, tmp_path):
    from tiny_runs import metrics, run_config

    from kfor1.trainer.loop import train

    workdir = Path(shutil.copytree(trained_run[0], tmp_path / "run"))
    train(run_config(colours, num_steps=8, log_every=4), str(workdir))
    assert metrics(workdir)[-1]["step"] == 8


def test_an_undecodable_image_is_one_line_without_tensorflows_traceback(colours, tmp_path):
    """TensorFlow logged the decoder's Python traceback (about 20 lines, from C++, so only a
    fresh process without TF_CPP_MIN_LOG_LEVEL shows it) before kfor1's one line."""
    import subprocess
    import sys

    data = Path(shutil.copytree(colours, tmp_path / "data"))
    (data / "train" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 9)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run(
        [sys.executable, "-m", "kfor1", "train", "--config",
         f"configs/transfer.py:dataset=folder:{data},resolution=32", "--workdir",
         str(tmp_path / "run"), "--config.num_steps=1", "--config.batch_size=8",
         "--config.eval_batch_size=8"],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
        timeout=600)
    lines = [line for line in done.stderr.splitlines() if line.strip()
             and not line.startswith("WARNING: All log messages before absl")]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: 1 of") and "broken.png" in lines[0]
