"""Reading adapter checkpoints: ``load_adapter`` and ``read_adapter_meta`` (the format is in :mod:`lora_jax.io._orbax`)."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from lora_jax.adapters._registry import SHARED
from lora_jax.adapters._tree import adapter_items
from lora_jax.errors._messages import expected
from lora_jax.io._codec import abstract_tree, decode, kernel_shapes, upgrade_v1
from lora_jax.io._describes import check_spec_describes
from lora_jax.io._files import (
    as_path,
    check_directory,
    interrupted_hint,
)
from lora_jax.io._orbax import ARRAYS, FORMAT, META, VERSION, _checksums, _flat_arrays, _host_ints, _records
from lora_jax.io._record import drop_closed_loop_callbacks, short_error, verify_record
from lora_jax.spec._json import _SPEC_FIELDS, spec_from_json
from lora_jax.spec._spec import LoraSpec
from lora_jax.targets._paths import flatten_with_paths, nest


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
    if meta.get("version") == VERSION or "checksums" in meta:  # checksums are checked whatever version is claimed
        verify_record(f"{path / META / 'metadata'}", meta, VERSION)
    elif meta.get("version") == 2:  # written before the record checksums: load_adapter checks it against its spec
        meta = {**meta, "version": VERSION, "upgraded_from": 2}
    elif meta.get("version") == 1:  # lora_jax 0.1: the same arrays, node metadata at the top of each entry
        meta = {
            **meta,
            "version": VERSION,
            "upgraded_from": 1,
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
      >>> from lora_jax import init_lora, load_adapter, save_adapter
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
    drop_closed_loop_callbacks()  # a failed read leaves callbacks into orbax's closed event loop, at any later time
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
            restored = ckpt.restore(path, args=ocp.args.Composite(**{ARRAYS: ocp.args.StandardRestore(nest(abstract))}))
        flat = flatten_with_paths(restored[ARRAYS])
    except Exception as e:  # orbax/tensorstore raise many types for unreadable files
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
    if meta.get("upgraded_from"):  # no record checksums: the nodes must at least agree with the saved spec
        try:
            check_spec_describes(tree, saved_spec, "load_adapter")
        except ValueError as e:
            raise ValueError(
                f"{path}: this format-{meta['upgraded_from']} checkpoint has no record checksums, and its nodes "
                f"disagree with its saved spec, so its metadata was edited or written wrongly: {e} Restore an earlier "
                f"checkpoint, or rebuild the adapter and save it again."
            ) from None
    return tree, saved_spec


def read_adapter_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON record of an adapter checkpoint (spec, per-path metadata), without reading arrays.

    Example:
      >>> import jax, jax.numpy as jnp, tempfile, os
      >>> from lora_jax import init_lora, load_adapter, save_adapter
      >>> spec = LoraSpec(rank=2, targets=["dense"])
      >>> lora = init_lora(jax.random.key(0), {"dense": {"kernel": jnp.ones((4, 3))}}, spec)
      >>> meta = read_adapter_meta(save_adapter(os.path.join(tempfile.mkdtemp(), "a"), lora, spec))
      >>> meta["adapters"]["dense/kernel"]["meta"]["layout"], meta["spec"]["rank"]
      ('io', 2)
    """
    return _read_meta(as_path(path, "read_adapter_meta(path=...)"))
