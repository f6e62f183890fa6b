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
from lora_jax.errors._messages import expected
from lora_jax.io._codec import abstract_tree, decode, encode, kernel_shapes, upgrade_v1
from lora_jax.io._describes import check_adapter_args, check_spec_describes
from lora_jax.io._files import (
    NEW,
    OLD,
    as_path,
    check_directory,
    check_replaceable,
    interrupted_hint,
    replace_dir,
    returned,
    sibling,
    sync_processes,
)
from lora_jax.io._record import drain_failed_reads, record_checksums, short_error, verify_record
from lora_jax.spec._json import _SPEC_FIELDS, spec_from_json, spec_to_json
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
      >>> from lora_jax import init_lora
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
      >>> from lora_jax import init_lora
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


def _read_meta(path: epath.Path) -> dict[str, Any]:
    meta_file = path / META / "metadata"
    if not path.is_dir() and not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint directory.{interrupted_hint(path)}")
    check_directory(path, f"{path}", "an adapter checkpoint directory (written by save_adapter)")
    if not meta_file.is_file():
        raise ValueError(
            f"{path}: not a lora_jax adapter checkpoint (no {META}/metadata inside). Expected a directory "
            f"written by save_adapter or a CheckpointManager step saved with adapter_checkpoint_args."
            f"{interrupted_hint(path)}"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: the adapter metadata is corrupt or truncated ({e}); restore another step.") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("adapters"), dict):
        raise ValueError(f"{path}: {META}/metadata is not a {FORMAT} record; the checkpoint is corrupt or foreign.")
    if meta.get("version") == VERSION:
        verify_record(f"{path / META / 'metadata'}", meta, VERSION)
    elif meta.get("version") == 2:  # written before the record checksums: nothing covers the record
        meta = {**meta, "version": VERSION}
    elif meta.get("version") == 1:  # lora_jax 0.1: the same arrays, node metadata at the top of each entry
        meta = {
            **meta,
            "version": VERSION,
            "adapters": {p: upgrade_v1(e, meta.get("spec", {})) for p, e in meta["adapters"].items()},
        }
    if meta.get("version") != VERSION:
        raise ValueError(
            f"{path}: adapter checkpoint version {meta.get('version')!r}; this lora_jax reads versions 1 to {VERSION}. "
            f"A newer lora_jax wrote it: upgrade lora_jax to load it."
        )
    return meta


def _spec_diff(saved: LoraSpec, given: LoraSpec) -> str:
    return ", ".join(
        f"{n}: saved {getattr(saved, n)!r}, given {getattr(given, n)!r}"
        for n in _SPEC_FIELDS
        if getattr(saved, n) != getattr(given, n)
    )


def _check_params(path: epath.Path, meta: dict[str, Any], params: Any) -> None:
    flat = flatten_with_paths(params)
    adapters = meta["adapters"]
    try:
        shapes = kernel_shapes(abstract_tree(adapters, meta.get("shared", {})))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    missing = [p for p in adapters if p not in flat]
    wrong = [
        f"{p} (adapter fits {shapes[p]}, params hold {tuple(getattr(flat[p], 'shape', ()))})"
        for p in adapters
        if p in flat and tuple(getattr(flat[p], "shape", ())) != shapes[p]
    ]
    if missing or wrong:
        raise ValueError(
            f"{path}: this adapter checkpoint was made for other params: "
            + "; ".join(
                ([f"paths missing from params: {', '.join(missing[:5])}"] if missing else [])
                + ([f"shape mismatch at {', '.join(wrong[:5])}"] if wrong else [])
            )
            + ". Load it with the params it was trained on."
        )


def _abstract_arrays(path: epath.Path, meta: dict[str, Any], target: Any) -> dict[str, Any]:
    """Flat {"path/field": ShapeDtypeStruct} in the saved dtypes, with the target's shardings."""
    adapters = meta["adapters"]
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    given: dict[str, Any] = {}
    if target is not None:
        items = adapter_items(target)
        if set(items) != set(adapters):
            extra, lacking = sorted(set(items) - set(adapters)), sorted(set(adapters) - set(items))
            raise ValueError(
                f"{path}: the target tree does not match the checkpoint: the checkpoint lacks {extra or 'nothing'}, "
                f"the target lacks {lacking or 'nothing'}. Build the target from the same params and spec."
            )
        given = _flat_arrays(target)
    out = {}
    for key, info in _records(meta).items():
        shape = tuple(info["shape"])
        t = given.get(key)
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(
                f"{path}: {key} is saved with shape {shape} but the target has {tuple(t.shape)}; the "
                f"checkpoint was made with another spec or params (compare the rank and kernel shape)."
            )
        sharding = getattr(t, "sharding", None) or default
        out[key] = jax.ShapeDtypeStruct(shape, jnp.dtype(info["dtype"]), sharding=sharding)
    return out


def load_adapter(
    path: str | os.PathLike,
    target: Any = None,
    *,
    params: Any = None,
    spec: LoraSpec | None = None,
) -> tuple[dict[str, Any], LoraSpec]:
    """Restore an adapter tree and its spec from :func:`save_adapter` (or a manager step).

    Nothing is changed and nothing returned unless the whole checkpoint reads
    back intact: every array's checksum is verified.

    Args:
      path: a :func:`save_adapter` directory, or ``manager.directory / str(step)``
        of a ``CheckpointManager`` that saved :func:`adapter_checkpoint_args`;
        local or a URI (``"gs://bucket/run/adapter"``).
      target: optional adapter tree (arrays or ``jax.ShapeDtypeStruct`` leaves
        with ``.sharding``, e.g. from ``jax.eval_shape(init_lora, ...)`` with
        shardings attached) that says where and in which dtype each array is
        restored. Without it, arrays land on the first local device in their
        saved dtype. Needed on multi-host setups.
      params: if given, check that the adapter fits these params (paths and
        kernel shapes).
      spec: if given, check that the checkpoint was saved with this spec.

    Returns:
      ``(lora, spec)``: the adapter tree (nested dicts, as :func:`init_lora`
      makes them) with the saved ``scale``/``layout``/``kind``, and the saved
      :class:`LoraSpec`.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: on a corrupt/truncated/foreign checkpoint, a spec mismatch, a
        target or params that do not fit.

    Example:
      >>> import jax, jax.numpy as jnp, tempfile, os
      >>> from lora_jax import init_lora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> spec = LoraSpec(rank=2, targets=["dense"])
      >>> path = save_adapter(os.path.join(tempfile.mkdtemp(), "a"), init_lora(jax.random.key(0), params, spec), spec)
      >>> abstract = jax.eval_shape(lambda: init_lora(jax.random.key(0), params, spec))
      >>> lora, _ = load_adapter(path, abstract, params=params, spec=spec)
      >>> lora["dense"]["kernel"].a.shape
      (4, 2)
    """
    import orbax.checkpoint as ocp

    path = as_path(path, "load_adapter(path=...)")
    if spec is not None and not isinstance(spec, LoraSpec):
        raise TypeError(
            expected("load_adapter(spec=...)", "a LoraSpec or None", spec, "pass the spec it was saved with")
        )
    if isinstance(target, LoraSpec):
        raise TypeError(
            expected(
                "load_adapter(target=...)",
                "an adapter tree (arrays or ShapeDtypeStructs) or None",
                target,
                "pass the spec by keyword: load_adapter(path, spec=spec)",
            )
        )
    meta = _read_meta(path)
    try:
        saved_spec = spec_from_json(meta["spec"])
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: the saved LoraSpec cannot be read: {e}") from None
    if spec is not None and spec != saved_spec:
        raise ValueError(
            f"{path}: the checkpoint was saved with another LoraSpec ({_spec_diff(saved_spec, spec)}). "
            f"Pass the spec it was saved with, or spec=None to use the saved one."
        )
    adapters = meta["adapters"]
    if params is not None:
        _check_params(path, meta, params)
    abstract = _abstract_arrays(path, meta, target)
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
            restored = ckpt.restore(path, args=ocp.args.Composite(**{ARRAYS: ocp.args.StandardRestore(nest(abstract))}))
        flat = flatten_with_paths(restored[ARRAYS])
    except Exception as e:  # orbax/tensorstore raise many types for unreadable files
        drain_failed_reads()  # the reads still in flight finish now, not as "Event loop is closed" noise later
        raise ValueError(
            f"{path}: the adapter arrays cannot be read, the checkpoint is corrupt or truncated "
            f"({short_error(e)}). Restore an earlier checkpoint.{interrupted_hint(path)}"
        ) from None
    if set(flat) != set(abstract):
        raise ValueError(f"{path}: the adapter arrays do not match their metadata; the checkpoint is corrupt.")
    sums, records = _host_ints(_checksums(flat)), _records(meta)
    bad = [k for k in abstract if sums[k] != records[k]["checksum"]]
    if bad:
        raise ValueError(
            f"{path}: checksum mismatch in {', '.join(bad[:5])}: the checkpoint is corrupt. Restore an earlier one."
        )
    if target is not None:
        wanted = _flat_arrays(target)
        flat = {k: x.astype(wanted[k].dtype) if k in wanted else x for k, x in flat.items()}
    out = {p: decode(entry, {f: flat[f"{p}/{f}"] for f in entry["arrays"]}, p) for p, entry in adapters.items()}
    tree = nest(dict(sorted(out.items())))
    shared = {k.partition("/")[2]: x for k, x in flat.items() if k.startswith(f"{SHARED}/")}
    if shared:
        tree[SHARED] = nest(shared)  # as saved: a nested shared section comes back nested
    return tree, saved_spec


def read_adapter_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON record of an adapter checkpoint (spec, per-path metadata), without reading arrays.

    Example:
      >>> import jax, jax.numpy as jnp, tempfile, os
      >>> from lora_jax import init_lora
      >>> spec = LoraSpec(rank=2, targets=["dense"])
      >>> lora = init_lora(jax.random.key(0), {"dense": {"kernel": jnp.ones((4, 3))}}, spec)
      >>> meta = read_adapter_meta(save_adapter(os.path.join(tempfile.mkdtemp(), "a"), lora, spec))
      >>> meta["adapters"]["dense/kernel"]["meta"]["layout"], meta["spec"]["rank"]
      ('io', 2)
    """
    return _read_meta(as_path(path, "read_adapter_meta(path=...)"))
