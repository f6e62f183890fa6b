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

from lora_jax.adapters._registry import arrays_of, check_whole, lowered_shape, type_by_name


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


def kernel_shape(entry: dict[str, Any], path: str, shared: dict[str, Any] | None = None) -> tuple[int, ...]:
    """The shape of the kernel a stored node fits, from its record alone."""
    import jax.numpy as jnp

    abstract = {f: jax.ShapeDtypeStruct(tuple(i["shape"]), jnp.dtype(i["dtype"])) for f, i in entry["arrays"].items()}
    return tuple(lowered_shape(decode(entry, abstract, path), shared, path).kernel_shape)
