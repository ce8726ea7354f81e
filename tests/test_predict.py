"""End-to-end tests of ``kfor1 predict`` on real photos, and of the image helpers it uses."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

import kfor1.models
from kfor1.images import ImageReadError, center_crop_resize, load_image
from kfor1.serve.predict import top_k
from kfor1.trainer import cli

REPO = Path(__file__).resolve().parents[1]
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger/Persian/Siamese/Egyptian cat
ESPRESSO = 967
ROW = re.compile(r"^\s+(\d+)\s+([\d.]+)%\s+(\d+)\s+(.+)$")


@pytest.fixture(scope="module")
def pretrained() -> kfor1.models.Pretrained:
    return kfor1.models.load_pretrained("efficientnet_lite0")


@pytest.fixture()
def run_cli(pretrained, monkeypatch, capsys):
    """Runs ``kfor1`` in-process, reusing the module's loaded EfficientNet-Lite0."""
    real = kfor1.models.load_pretrained

    def load(name, path=None, *args, **kwargs):
        if name == "efficientnet_lite0" and path is None and not args and not kwargs:
            return pretrained
        return real(name, path, *args, **kwargs)

    monkeypatch.setattr(kfor1.models, "load_pretrained", load)

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main(["predict", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def parse(stdout: str) -> dict[str, list[tuple[int, float, int, str]]]:
    """Path -> [(rank, percent, class index, name)] from the printed tables."""
    tables = {}
    for block in stdout.strip().split("\n\n"):
        path, *rows = block.splitlines()
        parsed = []
        for row in rows:
            match = ROW.match(row)
            assert match, f"unparsable row {row!r}"
            rank, percent, index, name = match.groups()
            parsed.append((int(rank), float(percent), int(index), name))
        tables[path] = parsed
    return tables


def save(tmp_path: Path, name: str, image: np.ndarray | Image.Image) -> str:
    path = tmp_path / name
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path)
    return str(path)


def test_predict_real_photos(run_cli, tmp_path):
    cat = save(tmp_path, "chelsea.jpg", skimage.data.chelsea())
    coffee = save(tmp_path, "coffee.png", skimage.data.coffee())
    code, out, err = run_cli(cat, coffee)
    assert code == 0, err
    tables = parse(out)
    assert list(tables) == [cat, coffee]
    for rows in tables.values():
        assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
        percents = [r[1] for r in rows]
        assert percents == sorted(percents, reverse=True)
    cat_top = tables[cat][0]
    assert cat_top[2] in CAT_CLASSES, tables[cat]
    assert tables[coffee][0][2:] == (ESPRESSO, "espresso"), tables[coffee]
    rows = out.splitlines()[1:6]
    assert len({row.index("%") for row in rows}) == 1  # An aligned table.


def test_grayscale_and_rgba_inputs(run_cli, tmp_path):
    photo = skimage.data.chelsea()
    gray = save(tmp_path, "gray.png", Image.fromarray(photo).convert("L"))
    alpha = np.full(photo.shape[:2] + (1,), 255, np.uint8)
    rgba = save(tmp_path, "rgba.png", np.concatenate([photo, alpha], axis=-1))
    code, out, err = run_cli("--top-k", "3", gray, rgba)
    assert code == 0, err
    tables = parse(out)
    assert [len(rows) for rows in tables.values()] == [3, 3]
    assert tables[rgba][0][2] in CAT_CLASSES  # Opaque alpha: the same pixels as the RGB photo.


def test_a_missing_image_is_one_line_error_before_any_work(run_cli, tmp_path):
    good = save(tmp_path, "chelsea.jpg", skimage.data.chelsea())
    bad = tmp_path / "x.jpg"
    code, out, err = run_cli(good, str(bad))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and str(bad) in err
    assert "Traceback" not in err


def test_a_corrupt_image_is_reported_and_the_others_classified(run_cli, tmp_path):
    good = save(tmp_path, "chelsea.jpg", skimage.data.chelsea())
    bad = tmp_path / "x.jpg"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    code, out, err = run_cli(good, str(bad))
    assert code == 2 and "Traceback" not in err
    assert list(parse(out)) == [good] and str(bad) not in out
    lines = err.splitlines()
    assert lines[0].startswith("error: ") and str(bad) in lines[0]
    assert lines[1] == ("error: 1 of 2 images could not be read (the others were classified); "
                        "re-encode or remove them")


def test_unknown_model_is_one_line_error(run_cli, tmp_path):
    image = save(tmp_path, "chelsea.jpg", skimage.data.chelsea())
    code, _, err = run_cli("--model", "resnet9000", image)
    assert code == 2
    assert err.count("\n") == 1 and "resnet9000" in err


def test_top_k_pads_the_last_batch(pretrained, tmp_path):
    paths = [save(tmp_path, f"{i}.png", skimage.data.coffee()) for i in range(3)]
    results = top_k(pretrained, paths, k=2, batch_size=2)
    assert len(results) == 3 and all(len(r) == 2 for r in results)
    assert [r[0].class_name for r in results] == ["espresso"] * 3
    np.testing.assert_allclose(
        [r[0].probability for r in results], results[0][0].probability, rtol=1e-5
    )


def test_launch_module(tmp_path):
    image = save(tmp_path, "coffee.jpg", skimage.data.coffee())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-m", "launch.predict", "--top-k", "1", image],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert parse(proc.stdout)[image][0][3] == "espresso"


@pytest.mark.parametrize("shape", [(480, 640), (640, 480), (100, 37), (224, 224), (3, 1000)])
def test_center_crop_resize_shapes(shape):
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    out = center_crop_resize(image, 224, 0.875)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8


def test_center_crop_resize_takes_the_centre():
    # A landscape image, black but for a white band a little wider than its central square.
    image = np.zeros((300, 900, 3), np.uint8)
    image[:, 270:630] = 255
    out = center_crop_resize(image, 64, 1.0)
    assert out.min() == 255
    # crop_fraction 0.5 keeps the central half of the shorter side.
    image = np.zeros((200, 200, 3), np.uint8)
    image[40:160, 40:160] = 255
    assert center_crop_resize(image, 10, 0.5).min() == 255


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "CMYK"])
def test_load_image_modes(tmp_path, mode):
    photo = Image.fromarray(skimage.data.coffee()[:40, :60])
    image = photo.convert(mode) if mode != "I;16" else Image.fromarray(
        np.asarray(photo.convert("L"), np.uint16) * 257
    )
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path)
    array = load_image(path)
    assert array.shape == (40, 60, 3) and array.dtype == np.uint8
    if mode in ("L", "I;16"):
        assert np.array_equal(array[..., 0], np.asarray(photo.convert("L")))


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")
    truncated = tmp_path / "cut.jpg"
    Image.fromarray(skimage.data.chelsea()).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(ImageReadError, match=r"cannot read image .*cut\.jpg: .*JPEG/PNG"):
        load_image(truncated)
    assert issubclass(ImageReadError, ValueError)
