"""Frozen arrays: ``split`` an adapter tree into what trains and what does not, and ``combine`` them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from lora_jax.adapters._registry import SHARED, check_whole, frozen_fields, is_adapter, lowered_shape, node_type
from lora_jax.adapters._tree import adapter_items, body, items_of
from lora_jax.targets._paths import map_with_paths


def _holes(node: Any, keep_frozen: bool) -> Any:
    frozen = set(frozen_fields(node))
    return dataclasses.replace(node, **{f: None for f in node_type(node).arrays if (f in frozen) != keep_frozen})


def _map_nodes(lora: Any, fn: Any) -> Any:
    for path, node in items_of(lora, "split").items():
        check_whole(node, path)  # a part of an earlier split is not split again
    return jax.tree_util.tree_map(lambda x: fn(x) if is_adapter(x) else x, lora, is_leaf=is_adapter)


def split(lora: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split an adapter tree into ``(trainable, frozen)``, two trees of the same structure with ``None`` holes.

    ``trainable`` holds every array that trains (A and B of plain LoRA: for a
    tree without frozen arrays it is the whole tree, and ``frozen`` has only
    holes); ``frozen`` holds the arrays that do not (LoRA-FA's A, the shared
    section). Differentiate and optimize ``trainable`` only, so that no
    gradient, no optimizer state and no weight decay ever reaches a frozen
    array; join the parts with :func:`combine` inside the loss.

    Args:
      lora: an adapter tree (:func:`lora_jax.init_lora`).

    Returns:
      ``(trainable, frozen)``.

    Raises:
      TypeError: if ``lora`` is not an adapter tree (params, say).
      ValueError: if ``lora`` is already a part of a split.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lora_jax import LoraSpec, init_lora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> lora = init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["dense"], freeze_a=True))
      >>> trainable, frozen = split(lora)
      >>> trainable["dense"]["kernel"].a is None, frozen["dense"]["kernel"].b is None
      (True, True)
      >>> combine(trainable, frozen)["dense"]["kernel"].a.shape
      (4, 2)
    """
    trainable = _map_nodes(lora, lambda n: _holes(n, keep_frozen=False))
    frozen = _map_nodes(lora, lambda n: _holes(n, keep_frozen=True))
    if isinstance(lora, Mapping) and SHARED in lora:
        trainable = body(trainable)
        frozen = {**frozen, SHARED: lora[SHARED]}
    return trainable, frozen


def combine(trainable: dict[str, Any], frozen: dict[str, Any]) -> dict[str, Any]:
    """Join the two parts of :func:`split` back into one adapter tree (the inverse of ``split``).

    Args:
      trainable: the first part of ``split(lora)`` (or its updated value).
      frozen: the second part.

    Returns:
      The adapter tree.

    Raises:
      ValueError: if the parts do not come from the same tree.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lora_jax import LoraSpec, init_lora
      >>> lora = init_lora(jax.random.key(0), {"d": {"kernel": jnp.ones((4, 3))}}, LoraSpec(rank=2, freeze_a=True))
      >>> trainable, frozen = split(lora)
      >>> trainable = jax.tree.map(lambda b: b + 1.0, trainable)  # an optimizer step on what trains
      >>> node = combine(trainable, frozen)["d"]["kernel"]
      >>> bool((node.a == lora["d"]["kernel"].a).all()), float(node.b[0, 0])
      (True, 1.0)
    """
    for name, part in (("trainable", trainable), ("frozen", frozen)):
        if not isinstance(part, Mapping):
            raise TypeError(
                f"combine(trainable, frozen): {name} must be an adapter tree (a dict, as lora_jax.split returns); "
                f"found {type(part).__name__}."
            )
    body_t, body_f = body(trainable), body(frozen)
    st, sf = (
        jax.tree_util.tree_structure(body_t, is_leaf=is_adapter),
        jax.tree_util.tree_structure(body_f, is_leaf=is_adapter),
    )
    if st != sf or set(adapter_items(body_t)) != set(adapter_items(body_f)):
        raise ValueError(
            "combine(trainable, frozen): the two parts have different paths; pass the two trees lora_jax.split "
            "returned (or the trainable part after optimizer updates, which keeps its structure)."
        )
    ft, ff = adapter_items(body_t), adapter_items(body_f)
    joined = {}
    for path, t in ft.items():
        f = ff[path]
        if type(t) is not type(f):
            raise ValueError(
                f"combine: {path} is a {type(t).__name__} in one part and a {type(f).__name__} in the other."
            )
        values = {}
        for name in node_type(t).arrays:
            a, b = getattr(t, name), getattr(f, name)
            if (a is None) == (b is None):
                raise ValueError(
                    f"combine: {path}/{name} is {'in both parts' if a is not None else 'in neither part'}; pass the "
                    f"two trees lora_jax.split returned."
                )
            values[name] = a if a is not None else b
        joined[path] = dataclasses.replace(t, **values)
        lowered_shape(joined[path], frozen.get(SHARED), path)  # the two parts must fit each other (rank, shapes)
    out = map_with_paths(lambda p, x: joined[p] if is_adapter(x) else x, body_t, is_leaf=is_adapter)
    if SHARED in frozen:
        out = {**out, SHARED: frozen[SHARED]}
    return out
