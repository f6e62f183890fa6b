"""Paths with a scheme (``gs://bucket/...``) reach orbax and the file writers unchanged.

No network: ``etils.epath.testing.mock_epath`` (etils' own test helper) replaces
every epath backend, and the mocks below serve ``gs://bucket/...`` from a local
folder standing in for the bucket. Like a real object store it has no rename:
a rename or replace of a ``gs://`` path raises. Orbax's array writes go through
tensorstore, not epath, so ``orbax.checkpoint.Checkpointer`` is wrapped to
record the path it is given and then save into the stand-in folder.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from etils.epath import testing as epath_testing

import lora_jax
from lora_jax._cli import main

PARAMS = {"model": {"q_proj": {"kernel": jnp.ones((8, 4))}, "head": {"kernel": jnp.ones((4, 2))}}}
SPEC = lora_jax.LoraSpec(rank=2, alpha=6.0, targets=["q_proj"], trainable=["head"], init="random")
URI = "gs://"


class Bucket:
    """``gs://bucket/...`` served from ``root/bucket/...``; records every gs:// path used, and orbax's paths."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.used: list[tuple[str, str]] = []  # (operation, gs:// path as given)
        self.orbax: list[tuple[str, object]] = []  # (save/restore, the path object orbax was given)
        self.fail_copy_from: str | None = None  # a gs:// prefix whose copies fail (a dropped connection)

    def local(self, path) -> str:
        s = os.fspath(path)
        return str(self.root / s[len(URI) :]) if s.startswith(URI) else s

    def remote(self, path) -> str:
        s, root = os.fspath(path), str(self.root)
        return URI + os.path.relpath(s, root) if s == root or s.startswith(root + os.sep) else s

    def _wrap(self, op: str):
        def fn(original, path, *args, **kwargs):
            if os.fspath(path).startswith(URI):
                self.used.append((op, os.fspath(path)))
                if op in ("rename", "replace"):
                    raise OSError(f"{path}: an object store has no rename")
                if op == "copy" and self.fail_copy_from and os.fspath(path).startswith(self.fail_copy_from):
                    raise OSError(f"{path}: connection reset")
            args = tuple(self.local(a) if isinstance(a, (str, os.PathLike)) else a for a in args)
            out = original(self.local(path), *args, **kwargs)
            if op == "walk" and os.fspath(path).startswith(URI):
                return ((self.remote(r), d, f) for r, d, f in out)
            if op == "glob" and os.fspath(path).startswith(URI):
                return [self.remote(p) for p in out]
            return out

        return fn

    def mocks(self) -> dict:
        ops = [
            "copy",
            "exists",
            "glob",
            "isdir",
            "listdir",
            "makedirs",
            "mkdir",
            "open",
            "remove",
            "rename",
            "replace",
            "rmtree",
            "stat",
            "walk",
        ]
        return {op: self._wrap(op) for op in ops}


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """The stand-in bucket; the working directory is an empty folder, so a stray local ``gs:`` folder shows."""
    b = Bucket(tmp_path / "store")
    (b.root / "bucket").mkdir(parents=True)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    real = ocp.Checkpointer

    class RecordingCheckpointer:
        def __init__(self, *args, **kwargs):
            self._real = real(*args, **kwargs)

        def __enter__(self):
            self._real.__enter__()
            return self

        def __exit__(self, *exc):
            return self._real.__exit__(*exc)

        def save(self, directory, *args, **kwargs):
            b.orbax.append(("save", directory))
            return self._real.save(epath.Path(b.local(directory)), *args, **kwargs)

        def restore(self, directory, *args, **kwargs):
            b.orbax.append(("restore", directory))
            return self._real.restore(epath.Path(b.local(directory)), *args, **kwargs)

    monkeypatch.setattr(ocp, "Checkpointer", RecordingCheckpointer)
    with epath_testing.mock_epath(**b.mocks()):
        yield b
    assert list(cwd.iterdir()) == [], "a gs:// path became a local folder"


def _same(got, want):
    g, w = lora_jax.adapter_items(got), lora_jax.adapter_items(want)
    assert g.keys() == w.keys()
    for p in w:
        assert jax.tree.structure(g[p]) == jax.tree.structure(w[p]), p
        for x, y in zip(jax.tree.leaves(g[p]), jax.tree.leaves(w[p]), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=p)


def _lora(seed):
    return lora_jax.init_lora(jax.random.key(seed), PARAMS, SPEC)


def test_save_and_load_pass_a_gs_path_to_orbax_unchanged(bucket):
    path = lora_jax.save_adapter("gs://bucket/run/adapter", _lora(0), SPEC)
    assert isinstance(path, epath.Path) and str(path) == "gs://bucket/run/adapter"  # not a pathlib.Path
    back, spec = lora_jax.load_adapter("gs://bucket/run/adapter", params=PARAMS)
    _same(back, _lora(0))
    assert spec == SPEC
    assert [(op, type(p), str(p)) for op, p in bucket.orbax] == [
        ("save", type(epath.Path(URI)), "gs://bucket/run/adapter"),
        ("restore", type(epath.Path(URI)), "gs://bucket/run/adapter"),
    ]
    assert lora_jax.read_adapter_meta("gs://bucket/run/adapter")["spec"]["rank"] == 2
    assert (bucket.root / "bucket" / "run" / "adapter" / "adapter_meta" / "metadata").is_file()


def test_overwrite_on_an_object_store_never_renames_and_replaces_the_checkpoint(bucket):
    lora_jax.save_adapter("gs://bucket/adapter", _lora(0), SPEC)
    lora_jax.save_adapter("gs://bucket/adapter", _lora(1), SPEC, overwrite=True)  # a gs:// rename would raise
    _same(lora_jax.load_adapter("gs://bucket/adapter")[0], _lora(1))
    assert str(bucket.orbax[1][1]) == "gs://bucket/adapter.lora_jax-new"  # the new one is written in full first
    assert sorted(p.name for p in (bucket.root / "bucket").iterdir()) == ["adapter"]


def test_an_overwrite_that_fails_on_an_object_store_keeps_both_checkpoints_complete(bucket):
    lora_jax.save_adapter("gs://bucket/adapter", _lora(0), SPEC)
    bucket.fail_copy_from = "gs://bucket/adapter.lora_jax-new"  # the move of the new checkpoint into place fails
    with pytest.raises(OSError, match="connection reset"):
        lora_jax.save_adapter("gs://bucket/adapter", _lora(1), SPEC, overwrite=True)
    bucket.fail_copy_from = None
    with pytest.raises((FileNotFoundError, ValueError), match=r"adapter.lora_jax-old.*adapter.lora_jax-new"):
        lora_jax.load_adapter("gs://bucket/adapter")  # incomplete: refused, naming where the complete copies are
    _same(lora_jax.load_adapter("gs://bucket/adapter.lora_jax-old")[0], _lora(0))
    _same(lora_jax.load_adapter("gs://bucket/adapter.lora_jax-new")[0], _lora(1))


def test_export_and_import_peft_write_and_read_through_the_gs_path(bucket):
    lora = _lora(0)
    out = lora_jax.export_peft("gs://bucket/peft", lora, SPEC)
    lora_jax.export_peft("gs://bucket/peft", _lora(1), SPEC, overwrite=True)
    assert str(out) == "gs://bucket/peft"
    back, _ = lora_jax.import_peft("gs://bucket/peft", PARAMS)
    _same(back, _lora(1))
    opened = {(p.rpartition("/")[0], p.rpartition("/")[2]) for op, p in bucket.used if op == "open"}
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert ("gs://bucket/peft.lora_jax-new", name) in opened  # written through the gs:// path
        assert ("gs://bucket/peft", name) in opened  # read back from it
    assert json.loads((bucket.root / "bucket" / "peft" / "adapter_config.json").read_text())["r"] == 2
    assert sorted(p.name for p in (bucket.root / "bucket").iterdir()) == ["peft"]


def test_cli_inspect_and_convert_take_gs_paths(bucket, capsys):
    lora_jax.save_adapter("gs://bucket/ckpt", _lora(0), SPEC)
    assert main(["inspect", "gs://bucket/ckpt"]) == 0
    assert capsys.readouterr().out.startswith("orbax adapter checkpoint gs://bucket/ckpt:")
    assert main(["convert", "gs://bucket/ckpt", "gs://bucket/peft"]) == 0
    assert main(["convert", "gs://bucket/peft", "gs://bucket/back"]) == 0
    assert "wrote orbax checkpoint gs://bucket/back from PEFT adapter gs://bucket/peft" in capsys.readouterr().out
    back, _ = lora_jax.load_adapter("gs://bucket/back", params=PARAMS)
    assert jax.tree.structure(back) == jax.tree.structure(_lora(0))


def test_local_str_and_pathlib_paths_still_work(tmp_path):
    for path in (str(tmp_path / "as_str"), tmp_path / "as_pathlib"):
        out = lora_jax.save_adapter(path, _lora(0), SPEC)
        assert isinstance(out, pathlib.Path) and os.fspath(out) == os.fspath(path) and out.is_absolute()
        _same(lora_jax.load_adapter(path)[0], _lora(0))
    monkey_rel = lora_jax.export_peft(os.path.relpath(tmp_path / "rel", os.getcwd()), _lora(0), SPEC)
    assert os.fspath(monkey_rel) == os.fspath(tmp_path / "rel")
