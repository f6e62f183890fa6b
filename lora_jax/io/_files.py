"""Writing files safely: atomic directory replacement and multi-process barriers."""

from __future__ import annotations

import os
import pathlib
import shutil

import jax


def sync_processes(name: str) -> None:
    """A barrier across the processes of a multi-host job (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def replace_dir(new: pathlib.Path, path: pathlib.Path, *, old: pathlib.Path) -> None:
    """Put the complete directory ``new`` at ``path``, replacing what is there.

    The previous directory is renamed to ``old`` first and deleted last, so at
    every moment either the previous or the new directory is complete on disk.

    Example:
      >>> import pathlib, tempfile
      >>> root = pathlib.Path(tempfile.mkdtemp())
      >>> (root / "new").mkdir(); (root / "new" / "f").write_text("2")
      1
      >>> replace_dir(root / "new", root / "ckpt", old=root / "ckpt.old")
      >>> (root / "ckpt" / "f").read_text(), sorted(p.name for p in root.iterdir())
      ('2', ['ckpt'])
    """
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, path)
