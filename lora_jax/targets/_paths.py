"""Parameter paths: the "/"-joined key strings that name every leaf.

A path is written the way ``flax.traverse_util.flatten_dict(params, sep="/")``
writes it: ``"encoder/layer_0/attention/query/kernel"``; a list index is its
number. Paths work for plain dicts, flax ``FrozenDict``, lists and tuples,
dataclass pytrees and ``flax.nnx.State`` (the ``.value`` of an ``nnx.Variable``
is not part of the path).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

PyTree = Any

_BASE_LEAF_TYPES: set[type] = set()


def register_base_leaf(cls: type) -> type:
    """Register a pytree node type that stands for one base parameter (a quantized kernel, say).

    Its instances are leaves of the parameter tree for lora_jax: paths end at
    them, and targets, ``partition``, ``init_lora`` and ``summary`` read their
    ``shape`` and ``dtype`` (the logical, dequantized ones). ``apply_lora`` and
    ``merge`` call ``dequantize()`` to get the float kernel the adapter is
    added to. The class must provide ``shape``, ``dtype`` and ``dequantize()``.
    """
    for attr in ("shape", "dtype", "dequantize"):
        if not hasattr(cls, attr):
            raise TypeError(f"register_base_leaf: {cls.__qualname__} has no {attr!r}; a base leaf provides shape, dtype "
                            f"and dequantize().")  # fmt: skip
    _BASE_LEAF_TYPES.add(cls)
    return cls


def is_base_leaf(x: Any) -> bool:
    """Whether ``x`` is a registered base-leaf node (see :func:`register_base_leaf`)."""
    return type(x) in _BASE_LEAF_TYPES


def _leaf_test(is_leaf: Callable[[Any], bool] | None) -> Callable[[Any], bool]:
    if is_leaf is None:
        return is_base_leaf
    return lambda x: is_base_leaf(x) or is_leaf(x)


def key_to_str(key: Any) -> str:
    """One key of a jax tree path as it appears in a "/"-joined path."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_keys(key_path: tuple) -> tuple[str, ...]:
    """The string keys of a jax key path, without nnx's trailing ``.value``."""
    keys = tuple(key_to_str(k) for k in key_path)
    if key_path and isinstance(key_path[-1], jax.tree_util.GetAttrKey) and keys[-1] == "value":
        keys = keys[:-1]
    return keys


def path_str(key_path: tuple) -> str:
    """The "/"-joined path of a jax key path."""
    return "/".join(path_keys(key_path))


def flatten_with_paths(tree: PyTree, *, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """A dict from "/"-joined path to leaf, in the tree's flattening order.

    Raises:
      ValueError: if two leaves have the same "/"-joined path (``{"a/b": x}``
        next to ``{"a": {"b": y}}``), naming both.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_leaf_test(is_leaf))
    out: dict[str, Any] = {}
    first: dict[str, tuple] = {}
    for key_path, leaf in flat:
        path = path_str(key_path)
        if path in out:
            raise ValueError(
                f"two leaves have the same parameter path {path!r}: {jax.tree_util.keystr(first[path])} and "
                f"{jax.tree_util.keystr(key_path)}. lora_jax names leaves by their keys joined with '/', so a key "
                f"holding '/' must not repeat a nested path; rename one of the keys."
            )
        out[path], first[path] = leaf, key_path
    return out


def map_with_paths(fn: Callable[[str, Any], Any], tree: PyTree, *, is_leaf=None) -> PyTree:
    """``jax.tree_util.tree_map`` whose function also gets the leaf's path."""
    return jax.tree_util.tree_map_with_path(lambda kp, x: fn(path_str(kp), x), tree, is_leaf=_leaf_test(is_leaf))


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Turn ``{"a/b/c": x}`` into ``{"a": {"b": {"c": x}}}`` (keys stay strings)."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        keys = path.split("/")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return out
