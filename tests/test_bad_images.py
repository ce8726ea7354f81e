"""Undecodable images, in training and in ``kfor1 predict``: named up front with the way out
(``config.skip_bad_images``), left out and counted when asked to, and never a reason to drop
the good images of a predict batch."""

from __future__ import annotations

import json
import shutil

import pytest
from tiny_runs import run_config, write_folder

from kfor1.data import DataError, load_source
from kfor1.trainer import cli
from kfor1.trainer.loop import train


@pytest.fixture()
def folder_with_a_bad_image(tmp_path):
    root = write_folder(tmp_path / "data")
    (root / "train" / "red" / "broken.png").write_bytes(b"not a png at all")
    (root / "test" / "blue" / "empty.jpg").write_bytes(b"")
    return root


def test_a_bad_image_is_named_with_skip_bad_images_as_the_way_out(folder_with_a_bad_image):
    with pytest.raises(DataError, match=r"broken\.png.*config\.skip_bad_images=True"):
        load_source(f"folder:{folder_with_a_bad_image}", "train")


def test_skip_bad_images_leaves_them_out_and_counts_them(folder_with_a_bad_image):
    ds, info = load_source(f"folder:{folder_with_a_bad_image}", "train", skip_bad_images=True,
                           decode=False)
    assert info.num_examples["train"] == 18  # 19 files, one broken.
    assert [p.rsplit("/", 1)[-1] for p in info.skipped["train"]] == ["broken.png"]
    assert not any(b"broken" in x["path"] for x in ds.as_numpy_iterator())


def test_train_with_skip_bad_images_logs_and_summarises_them(folder_with_a_bad_image, tmp_path,
                                                            capsys):
    c = run_config(folder_with_a_bad_image, num_steps=2, skip_bad_images=True)
    c.tasks = c.tasks[1:]
    out = train(c, str(tmp_path / "run"))
    err = capsys.readouterr().err
    assert "skipped 1 train image" in err and "broken.png" in err
    assert "skipped 1 test image" in err and "empty.jpg" in err
    skipped = json.loads((tmp_path / "run" / "summary.json").read_text())["tasks"]["colours"][
        "skipped_images"]
    assert skipped["train"]["count"] == 1 and skipped["test"]["count"] == 1
    assert out["tasks"]["colours"]["skipped_images"] == skipped


def test_train_without_it_stops_before_compiling_in_one_line(folder_with_a_bad_image, tmp_path,
                                                            capsys):
    code = cli.main(["train", "--config", "configs/transfer.py:dataset=folder:"
                     f"{folder_with_a_bad_image}", "--workdir", str(tmp_path / "run"),
                     "--config.batch_size=8", "--config.eval_batch_size=48"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and "skip_bad_images" in err
    assert not (tmp_path / "run").exists()


def test_predict_reports_a_bad_file_and_goes_on(trained_run, colours, tmp_path, capsys):
    workdir, _ = trained_run
    good = [colours / "test" / "red" / f"{i}.png" for i in (0, 1)]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    files = [str(good[0]), str(bad), str(good[1])]
    code = cli.main(["predict", "--patch", str(workdir / "patches" / "colours"), *files,
                     "--json"])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    results = json.loads(captured.out)
    assert [("top" in r, "error" in r) for r in results] == [(True, False), (False, True),
                                                             (True, False)]
    # The good files are classified as they are without the bad one beside them (what the
    # model predicts after a 6-step run is not the point, and differs between processors).
    assert cli.main(["predict", "--patch", str(workdir / "patches" / "colours"), str(good[0]),
                     str(good[1]), "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert [results[0], results[2]] == alone
    assert "bad.jpg" in captured.err and "1 of 3 images could not be read" in captured.err


def test_imagenet_predict_reports_a_bad_file_and_goes_on(tmp_path, capsys):
    from PIL import Image
    from skimage import data as photos

    cat = tmp_path / "chelsea.png"
    Image.fromarray(photos.chelsea()).save(cat)
    bad = tmp_path / "bad.png"
    shutil.copyfile(cat, bad)
    bad.write_bytes(bad.read_bytes()[:100])  # Truncated.
    code = cli.main(["predict", str(bad), str(cat)])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    assert str(cat) in captured.out and "tabby" in captured.out and str(bad) not in captured.out
    assert f"{bad}" in captured.err
