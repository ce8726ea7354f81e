"""``kfor1.trainer.compile_cache``: JAX's setting wins, kfor1's variable names or disables the
cache, and an unusable directory leaves it off instead of failing a run."""

from __future__ import annotations

import os

import jax
import pytest

from kfor1.trainer import compile_cache


@pytest.fixture
def restore_jax_setting():
    before = jax.config.jax_compilation_cache_dir
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def test_jax_variable_wins(monkeypatch, tmp_path, restore_jax_setting):
    monkeypatch.setenv(compile_cache.JAX_ENV, str(tmp_path / "jax"))
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "kfor1"))
    assert compile_cache.enable_compilation_cache() == str(tmp_path / "jax")
    assert not (tmp_path / "kfor1").exists()


def test_kfor1_variable_names_the_directory(monkeypatch, tmp_path, restore_jax_setting):
    monkeypatch.delenv(compile_cache.JAX_ENV, raising=False)
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "cache"))
    assert compile_cache.enable_compilation_cache() == str(tmp_path / "cache")
    assert (tmp_path / "cache").is_dir()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")


def test_default_directory_and_off(monkeypatch, tmp_path, restore_jax_setting):
    monkeypatch.delenv(compile_cache.JAX_ENV, raising=False)
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    tag = compile_cache.machine_tag()
    assert compile_cache.default_cache_dir() == str(tmp_path / "xdg" / "kfor1" / "jax" / tag)
    assert tag == compile_cache.machine_tag() and len(tag.split("-")[-1]) == 12
    assert compile_cache.enable_compilation_cache() == compile_cache.default_cache_dir()
    for off in ("0", "off"):
        monkeypatch.setenv(compile_cache.ENV, off)
        assert compile_cache.enable_compilation_cache() is None


def test_unusable_directory_leaves_it_off(monkeypatch, tmp_path, restore_jax_setting):
    monkeypatch.delenv(compile_cache.JAX_ENV, raising=False)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(compile_cache.ENV, str(blocker / "cache"))
    before = jax.config.jax_compilation_cache_dir
    assert compile_cache.enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir == before
    if os.getuid() != 0:  # root writes anywhere.
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        monkeypatch.setenv(compile_cache.ENV, str(ro))
        assert compile_cache.enable_compilation_cache() is None
