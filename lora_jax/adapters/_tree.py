"""Walking an adapter tree: its nodes by parameter path, its shared section, its lowered forms.

An adapter tree is a nested dict mirroring the parameter paths, with a
registered node (:mod:`lora_jax.adapters._registry`) at each adapted path and,
optionally, a shared section under the top-level key ``"__shared__"``: frozen
arrays that several nodes use (VeRA's projections), stored once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lora_jax.adapters._lowered import LowRank, Replace
from lora_jax.adapters._registry import SHARED, is_adapter, lower, node_type
from lora_jax.errors._messages import describe, expected
from lora_jax.targets._paths import flatten_with_paths


def _is_node(x: Any) -> bool:
    # registered nodes, and any other dataclass instance (so that an unregistered node type is met whole, and raises)
    return is_adapter(x) or (dataclasses.is_dataclass(x) and not isinstance(x, type))


def body(lora: Any) -> Any:
    """The adapter tree without its shared section."""
    return {k: v for k, v in lora.items() if k != SHARED} if isinstance(lora, Mapping) else lora


_ADAPTER_TREE = "an adapter tree (a dict of LoraWeights / Trainable nodes, as init_lora makes)"


def adapter_items(lora: Any) -> dict[str, Any]:
    """The adapter nodes of an adapter tree, keyed by parameter path (the shared section left out).

    Raises:
      TypeError: if ``lora`` is not a dict, or on a leaf that is not a registered adapter node, naming its path
        and type.

    Example:
      >>> import jax.numpy as jnp
      >>> from lora_jax import LoraWeights
      >>> lora = {"dense": {"kernel": LoraWeights(jnp.ones((3, 1)), jnp.ones((1, 2)))}}
      >>> list(adapter_items(lora))
      ['dense/kernel']
    """
    return items_of(lora, "adapter_items")


def items_of(lora: Any, where: str, order: str = "") -> dict[str, Any]:
    """:func:`adapter_items`, with errors naming ``where(lora=...)`` and the function's argument ``order``."""
    hint = (
        f"Check the argument order: {order}"
        if order
        else "Pass the tree init_lora, load_adapter or import_peft returned"
    )
    if not isinstance(lora, Mapping):
        raise TypeError(expected(f"{where}(lora=...)", _ADAPTER_TREE, lora, hint))
    items = flatten_with_paths(body(lora), is_leaf=_is_node)
    for path, node in items.items():
        if not is_adapter(node):
            if dataclasses.is_dataclass(node):
                node_type(node, path)  # raises, naming the unregistered type
            raise TypeError(
                expected(f"{where}(lora=...)", _ADAPTER_TREE, f"{describe(node)} at {path}", hint, found_is_text=True)
            )
    return items


def shared_section(lora: Any) -> dict[str, Any]:
    """The tree's shared frozen arrays (``lora["__shared__"]``), or ``{}``."""
    if isinstance(lora, Mapping) and SHARED in lora:
        return dict(lora[SHARED])
    return {}


def lowered_items(lora: Any) -> dict[str, LowRank | Replace]:
    """Every node of ``lora`` in its lowered form, keyed by parameter path."""
    shared = shared_section(lora)
    return {path: lower(node, shared, path) for path, node in adapter_items(lora).items()}
