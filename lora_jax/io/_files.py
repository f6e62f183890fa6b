"""Writing files safely: paths with schemes, directory replacement, multi-process barriers.

Every path goes through :func:`as_path`, which gives the path type orbax
itself uses (``etils.epath.Path``): ``"gs://bucket/run"`` stays a bucket path
(``pathlib`` would make it a local folder ``gs:/bucket/run``), local paths
become absolute. Files are read and written through it, so local disks and
object stores (``gs://``, ``s3://``) take the same code.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from typing import Any

import jax
from etils import epath

NEW, OLD = ".lora_jax-new", ".lora_jax-old"  # fixed sibling names, so every process of a job agrees on them


def sync_processes(name: str) -> None:
    """A barrier across the processes of a multi-host job (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def is_object_store(path: Any) -> bool:
    """Whether ``path`` names an object store (``gs://``, ``s3://``, ...), which has no atomic rename."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike, where: str = "path") -> epath.Path:
    """``path`` as an ``etils.epath.Path``: a URI keeps its scheme, a local path becomes absolute.

    Example:
      >>> str(as_path("gs://bucket/run")), as_path("run").is_absolute()
      ('gs://bucket/run', True)
    """
    if not isinstance(path, (str, os.PathLike)):
        from lora_jax.errors._messages import expected

        raise TypeError(
            expected(where, "a str or os.PathLike (e.g. 'run/adapter' or 'gs://bucket/run')", path, "check the order")
        )
    p = epath.Path(path)
    return p if is_object_store(p) else p.resolve()


def returned(path: epath.Path) -> pathlib.Path | epath.Path:
    """The path a writer returns: a ``pathlib.Path`` when local (as before URIs were taken), else the URI path."""
    return path if is_object_store(path) else pathlib.Path(path)


def sibling(path: epath.Path, suffix: str) -> epath.Path:
    """``path`` with ``suffix`` appended to its last name (``run`` -> ``run.lora_jax-new``)."""
    return path.with_name(path.name + suffix)


def interrupted_hint(path: epath.Path) -> str:
    """A sentence naming the complete copies an interrupted overwrite of ``path`` left behind, or ``""``."""
    left = [str(p) for p in (sibling(path, OLD), sibling(path, NEW)) if p.is_dir()]
    if not left:
        return ""
    return (
        f" An interrupted save(..., overwrite=True) left {' and '.join(left)} (the previous or the new version): "
        f"load from there, or move it back to {path}."
    )


def _copy_tree(src: epath.Path, dst: epath.Path) -> None:
    """Copy every file under ``src`` to the same place under ``dst`` (an object store's "rename")."""
    for root, _, files in src.walk():
        target = dst / epath.Path(root).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)  # directories are implicit on object stores
        for name in files:
            (epath.Path(root) / name).copy(target / name, overwrite=True)


def _remove_quietly(path: epath.Path) -> None:
    """Delete a directory that is no longer needed; a failure here loses nothing, so it is ignored."""
    with contextlib.suppress(OSError):
        path.rmtree(missing_ok=True)


def replace_dir(new: epath.Path, path: epath.Path, *, old: epath.Path) -> None:
    """Put the complete directory ``new`` at ``path``, replacing what is there.

    The previous directory is moved to ``old`` first and deleted last, so at
    every moment the previous and the new directory are each complete at one
    of ``path``, ``old`` or ``new``. Locally the moves are atomic renames. On
    an object store, which has no atomic rename, a move is a copy of every
    file followed by deleting the source: ``path`` is incomplete for the time
    of a copy (a reader sees an error, never a mix), nothing is deleted before
    its copy is complete, and the previous directory is deleted only after
    the new one is in place.

    Example:
      >>> import tempfile
      >>> root = as_path(tempfile.mkdtemp())
      >>> (root / "new").mkdir(); (root / "new" / "f").write_text("2")
      1
      >>> replace_dir(root / "new", root / "ckpt", old=root / "ckpt.old")
      >>> (root / "ckpt" / "f").read_text(), sorted(p.name for p in root.iterdir())
      ('2', ['ckpt'])
    """
    if not is_object_store(path):
        if path.exists():
            old.rmtree(missing_ok=True)  # left over from an interrupted overwrite
            path.rename(old)
            new.rename(path)
            _remove_quietly(old)
        else:
            new.rename(path)
        return
    if path.exists():
        old.rmtree(missing_ok=True)
        _copy_tree(path, old)
        path.rmtree()
    _copy_tree(new, path)
    _remove_quietly(new)
    _remove_quietly(old)


def check_directory(path: epath.Path, where: str, what: str) -> None:
    """Raise unless ``path`` is a directory: ``FileNotFoundError`` if nothing is there, ``NotADirectoryError`` if a file.

    Example:
      >>> import tempfile
      >>> f = as_path(tempfile.mkdtemp()) / "f"; _ = f.write_text("x")
      >>> check_directory(f, "load_adapter(path=...)", "an adapter checkpoint directory")
      Traceback (most recent call last):
      NotADirectoryError: load_adapter(path=...): expected an adapter checkpoint directory, found a file at ...
    """
    from lora_jax.errors._messages import expected

    if path.is_dir():
        return
    if path.exists():
        raise NotADirectoryError(
            expected(where, what, f"a file at {path}", "pass the directory that holds it", found_is_text=True)
        )
    raise FileNotFoundError(
        expected(where, what, f"no such directory {path}", interrupted_hint(path).strip(), found_is_text=True)
    )


def check_replaceable(path: epath.Path, allowed: frozenset[str], where: str, what: str) -> None:
    """Raise unless the existing ``path`` may be replaced by ``overwrite=True``.

    Only an empty directory or one whose top level holds nothing but the names
    in ``allowed`` (the files of the format being written) is replaced; a
    regular file or a directory holding anything else is refused, so a typo in
    ``path`` never deletes unrelated data.
    """
    from lora_jax.errors._messages import expected

    if not path.is_dir():
        raise FileExistsError(
            expected(
                where,
                f"a path to create, or {what} to replace",
                f"a file at {path}",
                "overwrite=True replaces only a directory of that format; remove the file or choose another path",
                found_is_text=True,
            )
        )
    other = sorted(p.name for p in path.iterdir() if p.name not in allowed)
    if other:
        raise FileExistsError(
            expected(
                where,
                f"an empty directory or {what} to replace (top level only {', '.join(sorted(allowed))})",
                f"{path} holding {', '.join(other[:5])}{' ...' if len(other) > 5 else ''}",
                "overwrite=True never deletes other files; remove them or choose another path",
                found_is_text=True,
            )
        )
