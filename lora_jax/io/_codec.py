"""The checkpoint codec of adapter nodes: any registered node type to arrays plus JSON metadata, and back.

A node is stored as ``{"type": <registered name>, "meta": {static fields},
"arrays": {field: {shape, dtype, checksum}}}`` next to its arrays. Decoding
looks the type up by name in the registry, so a variant registered with
:func:`lora_jax.register_adapter` checkpoints without a codec of its own.
Records of format version 1 (lora_jax 0.1: ``scale``/``layout``/``kind`` at
the top of a ``"lora"`` entry) are upgraded on read.
"""

from __future__ import annotations

from typing import Any

import jax

from lora_jax.adapters._registry import SHARED, arrays_of, check_whole, lowered_shape, node_type, type_by_name
from lora_jax.adapters._tree import adapter_items, shared_section
from lora_jax.targets._paths import nest


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"a static field of type {type(value).__name__} ({value!r}) cannot be stored as JSON metadata.")


def _from_json(value: Any) -> Any:
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value


def encode(node: Any, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(arrays, meta)``: a node's array fields and its JSON record (``type`` and static ``meta``)."""
    entry = check_whole(node, path)
    try:
        meta = {f: _to_json(getattr(node, f)) for f in entry.statics}
    except TypeError as e:
        raise TypeError(f"{path}: {e} Static fields of an adapter node must be numbers, strings or tuples.") from None
    return arrays_of(node), {"type": entry.name, "meta": meta}


def decode(entry: dict[str, Any], arrays: dict[str, Any], path: str) -> Any:
    """The node of a JSON record and its arrays (arrays or ``ShapeDtypeStruct``\\ s)."""
    cls = type_by_name(entry["type"], f"{path}: ").cls
    meta = {k: _from_json(v) for k, v in entry.get("meta", {}).items()}
    try:
        return cls(**arrays, **meta)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{path}: the stored {entry['type']!r} node cannot be rebuilt ({e}); the record is corrupt."
        ) from None


def upgrade_v1(entry: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """A version-1 record in today's form (``"lora"`` kept its fields at the top, ``"trainable"`` had none).

    Version 1 kept LoRA dropout in the spec only (it was passed to ``factored``); today each node records it,
    so it is taken from the saved spec.
    """
    if entry.get("type") == "lora" and "meta" not in entry:
        meta = {k: entry[k] for k in ("scale", "layout", "kind") if k in entry}
        meta["dropout"] = float(spec.get("dropout", 0.0) or 0.0)
        return {"type": "lora", "meta": meta, "arrays": entry["arrays"]}
    if entry.get("type") == "trainable" and "meta" not in entry:
        return {"type": "trainable", "meta": {}, "arrays": entry["arrays"]}
    return entry


def _abstract(info: dict[str, Any]) -> jax.ShapeDtypeStruct:
    import jax.numpy as jnp

    return jax.ShapeDtypeStruct(tuple(info["shape"]), jnp.dtype(info["dtype"]))


def abstract_tree(adapters: dict[str, Any], shared: dict[str, Any] | None = None) -> dict[str, Any]:
    """The adapter tree a checkpoint's records describe, with ``ShapeDtypeStruct`` arrays (no array is read).

    Args:
      adapters: the per-path node records (a checkpoint's ``meta["adapters"]``).
      shared: the records of the shared section (``meta.get("shared", {})``),
        keyed by their path inside it; they go under ``"__shared__"``.

    Returns:
      The nested adapter tree, shared section included, so that every node
      lowers with the shared arrays it reads: :func:`kernel_shapes`,
      :func:`lora_jax.summary` and :func:`lora_jax.adapter_shardings` work on it.

    Raises:
      ValueError: naming the path, if a record cannot be rebuilt or a node
        does not lower with the stored shared section (a corrupt record).

    Example:
      >>> import jax, jax.numpy as jnp, tempfile, os, lora_jax
      >>> spec = lora_jax.LoraSpec(rank=2, targets=["dense"])
      >>> lora = lora_jax.init_lora(jax.random.key(0), {"dense": {"kernel": jnp.ones((4, 3))}}, spec)
      >>> meta = lora_jax.read_adapter_meta(lora_jax.save_adapter(os.path.join(tempfile.mkdtemp(), "a"), lora, spec))
      >>> abstract_tree(meta["adapters"], meta.get("shared", {}))["dense"]["kernel"].b
      ShapeDtypeStruct(shape=(2, 3), dtype=float32)
    """
    flat = {p: decode(e, {f: _abstract(i) for f, i in e["arrays"].items()}, p) for p, e in adapters.items()}
    tree = nest(dict(sorted(flat.items())))
    if shared:
        tree[SHARED] = nest({k: _abstract(i) for k, i in shared.items()})
    kernel_shapes(tree)  # every node lowers with the stored shared section, or the error names it
    return tree


def kernel_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of the kernel each node of an adapter tree fits (lowered with the tree's shared section).

    Raises:
      ValueError: naming the path and the shared arrays there are, if a node
        does not lower (it reads a shared array the tree lacks).

    Example:
      >>> import jax.numpy as jnp
      >>> from lora_jax import LoraWeights
      >>> kernel_shapes({"d": {"kernel": LoraWeights(jnp.ones((4, 2)), jnp.ones((2, 3)))}})
      {'d/kernel': (4, 3)}
    """
    shared = shared_section(tree)
    out = {}
    for path, node in adapter_items(tree).items():
        try:
            out[path] = tuple(lowered_shape(node, shared, path).kernel_shape)
        except (LookupError, TypeError, ValueError) as e:  # e.g. KeyError: a shared array it reads is not stored
            name = node_type(node, path).name
            raise ValueError(
                f"{path}: the {name!r} node does not lower with the shared section "
                f"(shared arrays: {', '.join(sorted(shared)) or 'none'}): {type(e).__name__}: {e}. The checkpoint "
                f"is corrupt, or the {name!r} node type registered now reads other shared arrays than the one "
                f"that saved it."
            ) from e
    return out
