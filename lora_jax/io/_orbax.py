"""Adapter checkpoints with orbax: ``save_adapter`` / ``load_adapter``.

A checkpoint holds the adapter arrays and a JSON record, never base weights:

* item ``"adapter"`` (``ocp.args.StandardSave``): per adapted path, the
  node's array fields (``{"a", "b"}`` for LoRA, ``{"value"}`` for a leaf
  trained in full, whatever a registered variant has), nested like the adapter
  tree, and the shared section's arrays once under ``"__shared__"``;
* item ``"adapter_meta"`` (``ocp.args.JsonSave``): the :class:`LoraSpec`, and
  per path the node's record (:mod:`lora_jax.io._codec`: its registered type
  name, static metadata such as ``scale``, ``layout``, ``kind``), shapes,
  dtypes and a checksum of every array; the shared section's arrays are
  stored once under ``"__shared__"``; and under ``"checksums"`` a SHA-256 of
  the canonical JSON of the spec and of every node's record
  (:mod:`lora_jax.io._record`).

So a checkpoint restores without re-creating the spec, the static metadata
comes back identically, and a corrupt or truncated file, or an edited record
(a scale, layout, kind, type, dropout, frozen or spec changed by hand), is
detected rather than silently loaded. Before anything is written the spec is
checked to describe the adapter (:mod:`lora_jax.io._describes`).

Format versions: 3 (this one) has the record checksums; 2 (before them) is
read as it was, its record unchecked, since it has none to check; 1 (lora_jax
0.1) is upgraded on read, unchecked too. A newer version is refused. :func:`adapter_checkpoint_args` gives the two items for
your own ``orbax.checkpoint.CheckpointManager``; :func:`load_adapter` reads a
``save_adapter`` directory or a manager's step directory alike.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from lora_jax.adapters._registry import SHARED
from lora_jax.adapters._tree import adapter_items, shared_section
from lora_jax.io._codec import encode
from lora_jax.io._describes import check_adapter_args, check_spec_describes
from lora_jax.io._files import (
    NEW,
    OLD,
    as_path,
    check_replaceable,
    replace_dir,
    returned,
    sibling,
    sync_processes,
)
from lora_jax.io._record import record_checksums
from lora_jax.spec._json import spec_to_json
from lora_jax.spec._spec import LoraSpec
from lora_jax.targets._paths import flatten_with_paths, nest

FORMAT = "lora_jax.adapter"
# 3: "checksums" covers the spec and every node's record; 2: node records {"type", "meta", "arrays"} and a shared
# section, read without a record checksum (none was written); 1 (lora_jax 0.1) is upgraded on read
VERSION = 3
ARRAYS, META = "adapter", "adapter_meta"
# the top level of a checkpoint directory: what save_adapter(..., overwrite=True) may replace
CHECKPOINT_FILES = frozenset({ARRAYS, META, "_CHECKPOINT_METADATA", "_METADATA", "commit_success.txt"})


# ---------------------------------------------------------------------------- arrays, metadata, checksums


def _checksum_one(x: jax.Array) -> jax.Array:
    """A position-weighted uint32 sum of the bits of ``x``: any single-bit change alters it."""
    nbits = jnp.dtype(x.dtype).itemsize * 8
    unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint32}[nbits]
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) | jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit
def _checksums(arrays: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: _checksum_one(v) for k, v in arrays.items()}


def _host_ints(tree: dict[str, jax.Array]) -> dict[str, int]:
    # a replicated scalar: its first addressable shard holds the value on every process
    return {k: int(np.asarray(v.addressable_data(0))) for k, v in tree.items()}


def _flat_arrays(lora: Any) -> dict[str, Any]:
    """Every array of an adapter tree keyed ``"path/field"`` (and ``"__shared__/name"`` for the shared section)."""
    out = {f"{p}/{f}": x for p, node in adapter_items(lora).items() for f, x in encode(node, p)[0].items()}
    out.update({f"{SHARED}/{k}": x for k, x in flatten_with_paths(shared_section(lora)).items()})
    return out


def _info(x: Any, checksum: int) -> dict[str, Any]:
    return {"shape": list(x.shape), "dtype": jnp.dtype(x.dtype).name, "checksum": checksum}


def _describe(lora: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(adapters, shared)``: the JSON records of every node and of the shared arrays."""
    arrays = _flat_arrays(lora)
    sums = _host_ints(_checksums(arrays))
    out = {}
    for path, node in adapter_items(lora).items():
        fields, entry = encode(node, path)
        entry["arrays"] = {f: _info(x, sums[f"{path}/{f}"]) for f, x in fields.items()}
        out[path] = entry
    shared = {k: _info(x, sums[f"{SHARED}/{k}"]) for k, x in flatten_with_paths(shared_section(lora)).items()}
    return out, shared


def _records(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"path/field" or "__shared__/name": array record}`` of a checkpoint's metadata."""
    out = {f"{p}/{f}": info for p, e in meta["adapters"].items() for f, info in e["arrays"].items()}
    out.update({f"{SHARED}/{k}": info for k, info in meta.get("shared", {}).items()})
    return out


def _checkpoint_args(lora: Any, spec: LoraSpec, fn: str) -> Any:
    import orbax.checkpoint as ocp

    check_adapter_args(lora, spec, fn)
    spec_json = spec_to_json(spec)
    check_spec_describes(lora, spec, fn)
    adapters, shared = _describe(lora)
    meta = {"format": FORMAT, "version": VERSION, "spec": spec_json, "adapters": adapters}
    if shared:
        meta["shared"] = shared
    meta = json.loads(json.dumps(meta))  # tuples as lists: the checksums are of what is read back
    meta["checksums"] = record_checksums(meta)
    arrays = nest(_flat_arrays(lora))
    return ocp.args.Composite(**{ARRAYS: ocp.args.StandardSave(arrays), META: ocp.args.JsonSave(meta)})


def adapter_checkpoint_args(lora: Any, spec: LoraSpec) -> Any:
    """The orbax save arguments for an adapter: ``Composite(adapter=..., adapter_meta=...)``.

    Use it with your own ``orbax.checkpoint.CheckpointManager``; add other
    items (optimizer state, data iterator) next to it, and read the adapter
    back with ``load_adapter(manager.directory / str(step))``.

    Args:
      lora: an adapter tree (:func:`lora_jax.init_lora`).
      spec: the spec it was made with (saved as JSON).

    Returns:
      An ``orbax.checkpoint.args.Composite`` with items ``"adapter"`` and
      ``"adapter_meta"``.

    Raises:
      ValueError: if the spec holds a callable selector, the tree is empty,
        or the spec does not describe the adapter (another rank, alpha,
        rslora, dropout, freeze_a, layout, or targets that select other paths).

    Example:
      >>> import jax, jax.numpy as jnp, orbax.checkpoint as ocp
      >>> from lora_jax import init_lora, load_adapter, save_adapter
      >>> spec = LoraSpec(rank=2, targets=["dense"])
      >>> lora = init_lora(jax.random.key(0), {"dense": {"kernel": jnp.ones((4, 3))}}, spec)
      >>> args = adapter_checkpoint_args(lora, spec)
      >>> sorted(args.keys())
      ['adapter', 'adapter_meta']
      >>> both = ocp.args.Composite(**args, step_info=ocp.args.JsonSave({"step": 1}))  # add your own items
    """
    return _checkpoint_args(lora, spec, "adapter_checkpoint_args")


def save_adapter(
    path: str | os.PathLike, lora: Any, spec: LoraSpec, *, overwrite: bool = False
) -> pathlib.Path | epath.Path:
    """Save an adapter tree and its spec as an orbax checkpoint (never base weights).

    On a local disk the write is atomic: orbax writes into a temporary
    directory and renames it when complete, so a killed process leaves no
    partial checkpoint at ``path``. With ``overwrite=True`` the new checkpoint
    is completed at ``<path>.lora_jax-new`` first, then the previous one is
    renamed to ``<path>.lora_jax-old``, the new one to ``path``, and the
    previous one deleted: a failed save keeps the previous checkpoint.

    On an object store (``gs://``, ``s3://``) there is no atomic rename:
    orbax writes in place and marks a finished save with a commit file (a
    killed first save leaves an incomplete directory that loading refuses, as
    every array is checksummed), and ``overwrite=True`` still writes the new checkpoint completely before the
    previous one is touched, then moves the previous one to
    ``<path>.lora_jax-old`` and the new one to ``path``, each move a copy of
    every file followed by deleting the source, and deletes the previous one
    last. A process killed during a move leaves ``path`` incomplete (loading it
    raises and names the sibling that holds a complete copy), never a mix of
    the two and never neither.

    Args:
      path: the checkpoint directory to create: a local path or a URI such as
        ``"gs://bucket/run/adapter"`` (an ``etils.epath`` path, as orbax uses).
      lora: an adapter tree (may hold sharded arrays; every process must call
        this, orbax writes each process's shards).
      spec: the :class:`LoraSpec` the adapter was made with.
      overwrite: replace an existing checkpoint at ``path``: an empty
        directory or one whose top level holds only orbax checkpoint files
        (``adapter``, ``adapter_meta``, ``_CHECKPOINT_METADATA``, ...); never
        a regular file or a directory holding anything else.

    Returns:
      The checkpoint path: an absolute ``pathlib.Path`` when local, an
      ``etils.epath.Path`` for a URI.

    Raises:
      FileExistsError: if ``path`` exists and ``overwrite`` is False, or is a
        file or a directory holding other files.
      ValueError: if the spec holds a callable selector, the tree is empty, or
        the spec does not describe the adapter (see :func:`adapter_checkpoint_args`).

    Example:
      >>> import jax, jax.numpy as jnp, tempfile, os
      >>> from lora_jax import init_lora, load_adapter, save_adapter
      >>> spec = LoraSpec(rank=2, targets=["dense"])
      >>> lora = init_lora(jax.random.key(0), {"dense": {"kernel": jnp.ones((4, 3))}}, spec)
      >>> path = save_adapter(os.path.join(tempfile.mkdtemp(), "adapter"), lora, spec)
      >>> lora2, spec2 = load_adapter(path)
      >>> spec2 == spec, lora2["dense"]["kernel"].layout
      (True, 'io')
    """
    import orbax.checkpoint as ocp

    path = as_path(path, "save_adapter(path=...)")
    check_adapter_args(lora, spec, "save_adapter")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass save_adapter(..., overwrite=True) to replace it.")
    if path.exists():
        check_replaceable(path, CHECKPOINT_FILES, "save_adapter(path=..., overwrite=True)", "an orbax checkpoint")
    args = _checkpoint_args(lora, spec, "save_adapter")  # validates before anything is written
    # fixed names (not random) so that every process of a multi-host job agrees on them
    tmp = sibling(path, NEW) if path.exists() else path
    if tmp != path:
        if jax.process_index() == 0:
            tmp.rmtree(missing_ok=True)  # left over from a killed overwrite
        sync_processes(f"lora_jax.save_adapter.clean:{path}")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
        ckpt.save(tmp, args=args)
    if tmp != path and jax.process_index() == 0:
        replace_dir(tmp, path, old=sibling(path, OLD))
    sync_processes(f"lora_jax.save_adapter:{path}")
    return returned(path)


# ---------------------------------------------------------------------------- loading
