"""Checks at the entry of public functions: a parameter pytree, a spec, a PRNG key.

Each raises with :func:`lora_jax.errors._messages.expected`, naming the function and the argument, so
that a value in the wrong place (``init_lora(params, key, spec)``) is reported as what it is.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from lora_jax.errors._messages import describe, expected

PARAMS = "a pytree of arrays (e.g. {'dense': {'kernel': array}})"


def _none_paths(tree: Any) -> list[str]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
    return ["/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in kp) or "params"
            for kp, x in flat if x is None]  # fmt: skip


def check_params(where: str, params: Any, *, order: str = "", empty_ok: bool = False) -> None:
    """Raise ``TypeError`` unless ``params`` is a pytree (a dict, list, ...) holding at least one array.

    Args:
      where: the function, e.g. ``"init_lora"``.
      params: the value given as params.
      order: the function's argument order, for the hint, e.g. ``"init_lora(key, params, spec)"``.
      empty_ok: accept a tree with no arrays (``summary({}, lora)`` reports the adapter alone).
    """
    hint = f"The order is {order}" if order else ""
    leaves = jax.tree_util.tree_leaves(params)
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(params)) and leaves:
        found = params
        if hasattr(params, "shape") and hasattr(params, "dtype"):
            hint = "Wrap a single kernel in a dict, e.g. {'dense': {'kernel': w}}" + (f"; {hint}" if hint else "")
        raise TypeError(expected(f"{where}(params=...)", PARAMS, found, hint))
    if not empty_ok and not any(hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves):
        nones = _none_paths(params)
        found = (
            f"no array leaves ({', '.join(p + ' is None' for p in nones[:4])})"
            if nones
            else f"no array leaves in {describe(params)}"
        )
        raise TypeError(expected(f"{where}(params=...)", PARAMS, found, hint, found_is_text=True))


def check_spec(where: str, spec: Any, *, order: str = "") -> None:
    """Raise ``TypeError`` unless ``spec`` is a :class:`lora_jax.LoraSpec`."""
    from lora_jax.spec._spec import LoraSpec  # the spec imports this package: a deferred import

    if not isinstance(spec, LoraSpec):
        hint = "E.g. lora_jax.LoraSpec(rank=8, targets=['query', 'value'])"
        raise TypeError(
            expected(f"{where}(spec=...)", "a LoraSpec", spec, f"{hint}; the order is {order}" if order else hint)
        )


def check_key(where: str, key: Any, *, order: str = "") -> None:
    """Raise ``TypeError`` unless ``key`` is a JAX PRNG key (``jax.random.key(0)``, or a raw ``uint32`` key)."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and hasattr(key, "shape"):
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            if key.shape == ():
                return
        elif np.dtype(dtype) == np.uint32 and len(key.shape) == 1:  # jax.random.PRNGKey(0)
            return
    hint = "Create one with jax.random.key(0)"
    raise TypeError(
        expected(f"{where}(key=...)", "a JAX PRNG key", key, f"{hint}; the order is {order}" if order else hint)
    )
