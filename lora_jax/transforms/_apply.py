"""Applying adapters: effective weights, merge and unmerge."""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.adapters import _lowered
from lora_jax.adapters._tree import adapter_items, items_of, lowered_items
from lora_jax.errors._checks import check_params
from lora_jax.errors._messages import expected
from lora_jax.targets._paths import flatten_with_paths, map_with_paths


def _check_shapes(path: str, leaf: Any, node: Any) -> None:  # node: a lowered form
    shape = tuple(getattr(leaf, "shape", ()))
    if not hasattr(leaf, "shape") or shape != node.kernel_shape:
        raise ValueError(
            f"{path}: the adapter fits a kernel of shape {node.kernel_shape}, but params hold "
            f"{'shape ' + str(shape) if hasattr(leaf, 'shape') else type(leaf).__name__} there. "
            f"The adapter was made for other params; create it with init_lora on these params."
        )


def check_entry(where: str, params: Any, lora: Any) -> None:
    """The first lines of apply_lora / merge / unmerge: params a pytree of arrays, lora an adapter tree, and
    every adapted base leaf a value (not a ``ShapeDtypeStruct``: shapes only have nothing to add the delta to)."""
    order = f"{where}(params, lora)"
    items = items_of(lora, where, order)
    check_params(where, params, order=order)
    flat = flatten_with_paths(params)
    for path in items:
        leaf = flat.get(path)
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise TypeError(
                expected(
                    f"{where}(params=...) at {path}",
                    "an array",
                    f"ShapeDtypeStruct of shape {leaf.shape} and dtype {leaf.dtype} (a shape, not a value)",
                    f"Pass the real params, or get the result's shapes with jax.eval_shape({where}, params, lora)",
                    found_is_text=True,
                )
            )


def _transform(params: Any, lora: Any, op: Callable[[Any, Any], Any]) -> Any:
    items = lowered_items(lora)
    flat = flatten_with_paths(params)
    missing = [p for p in items if p not in flat]
    if missing:
        near = difflib.get_close_matches(missing[0], list(flat), n=3, cutoff=0.0)
        raise ValueError(
            f"the adapter has {len(missing)} path(s) that params lack, first {missing[0]!r} "
            f"(nearest params paths: {', '.join(near)}). The adapter was made for other params."
        )
    for path, node in items.items():
        _check_shapes(path, flat[path], node)

    def one(path: str, w: Any) -> Any:
        if path not in items:
            return w
        try:
            return op(items[path], w)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    return map_with_paths(one, params)


def apply_lora(params: Any, lora: Any) -> Any:
    """The effective parameters: every adapted leaf replaced by ``W + scale * A @ B``.

    Pure and jit-able; ``params`` is not modified. Every adapter node is
    lowered to its low-rank form (see :mod:`lora_jax.adapters._lowered`); the
    update is computed in float32 (float64 for a float64 base) and cast to
    each base leaf's dtype once. Leaves trained in full (:class:`Trainable`)
    replace their base leaf. Frozen arrays (``lora_jax.split``) enter through
    ``stop_gradient``, so differentiating the result never computes their
    gradient.

    This is the deterministic path: LoRA dropout (``LoraSpec(dropout=...)``,
    recorded in each adapter) is not applied here. Train with dropout through
    :func:`lora_jax.factored` with a ``dropout_rng``.

    Args:
      params: the base parameter pytree.
      lora: an adapter tree from :func:`init_lora`.

    Returns:
      A pytree with the structure and dtypes of ``params``.

    Raises:
      TypeError: if ``lora`` is not an adapter tree (the arguments swapped,
        say), or an adapted leaf of ``params`` is a ``ShapeDtypeStruct``.
      ValueError: if an adapter path is missing from ``params`` or its shape
        differs (the message names the path and both shapes).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lora_jax import LoraSpec, init_lora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> lora = init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["dense"]))
      >>> out = jax.jit(apply_lora)(params, lora)
      >>> bool(jnp.all(out["dense"]["kernel"] == 1.0))  # B = 0 at init: a no-op
      True
    """
    check_entry("apply_lora", params, lora)
    return _transform(params, lora, _apply_op)


def _is_tracing(tree: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


@jax.jit
def _finite(ws: dict, lora: dict) -> dict:
    # Module level, so jax.jit's cache is reused across calls (a jit made per call recompiles every time).
    return {p: jnp.all(jnp.isfinite(_lowered.apply_to(n, ws[p]))) for p, n in lowered_items(lora).items()}


def _check_finite(params: Any, lora: Any) -> None:
    flat = flatten_with_paths(params)
    ok = jax.device_get(_finite({p: flat[p] for p in adapter_items(lora)}, lora))
    bad = [p for p, v in ok.items() if not v]
    if bad:
        raise ValueError(
            f"merge(safe=True): merging would put NaN or inf into {', '.join(bad)}; params are unchanged. "
            f"Check the adapter for diverged values (e.g. lower the learning rate)."
        )


_apply_op, _remove_op = _lowered.apply_to, _lowered.remove_from


@functools.cache
def _jitted(op: Callable, donate: bool) -> Callable:
    """One jitted merge per (op, donate), so repeated merges of same-shaped trees reuse the compilation."""
    return jax.jit(
        lambda ws, lora: {p: op(n, ws[p]) for p, n in lowered_items(lora).items()},
        donate_argnums=(0,) if donate else (),
    )


def _merge_like(params: Any, lora: Any, op: Callable, donate: bool) -> Any:
    jax.eval_shape(lambda p, lo: _transform(p, lo, op), params, lora)  # validate paths and shapes first
    flat = flatten_with_paths(params)
    if _is_tracing((params, lora)):
        donate = False
    merged = _jitted(op, donate)({p: flat[p] for p in lowered_items(lora)}, lora)
    return map_with_paths(lambda p, w: merged.get(p, w), params)


def merge(params: Any, lora: Any, *, donate: bool = False, safe: bool = False) -> Any:
    """Fold the adapter into the base weights for inference: ``W + scale * A @ B``.

    Numerically the same as :func:`apply_lora` (float32 update, one cast), with
    two options for real deployments.

    Args:
      params: the base parameter pytree.
      lora: an adapter tree from :func:`init_lora`.
      donate: donate the adapted base buffers to the merge, so the merged
        kernels reuse their memory (the donated arrays in ``params`` become
        unusable). Ignored under tracing.
      safe: first check that no merged leaf would hold NaN or inf and raise,
        naming the leaves, before anything is donated. Not usable under ``jit``.

    Returns:
      The merged parameter pytree.

    Raises:
      ValueError: on path/shape mismatches, or with ``safe=True`` on NaN/inf.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lora_jax import LoraSpec, init_lora
      >>> params = {"dense": {"kernel": jnp.zeros((4, 3))}}
      >>> lora = init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["dense"], init="random"))
      >>> merged = merge(params, lora, safe=True)
      >>> bool(jnp.allclose(unmerge(merged, lora)["dense"]["kernel"], 0.0, atol=1e-6))
      True
    """
    check_entry("merge", params, lora)
    if safe:
        if _is_tracing((params, lora)):
            raise ValueError("merge(safe=True) checks values on the host and cannot run under jit; use safe=False.")
        _check_finite(params, lora)
    return _merge_like(params, lora, _apply_op, donate)


def unmerge(params: Any, lora: Any, *, donate: bool = False) -> Any:
    """Undo :func:`merge`: ``W - scale * A @ B`` (exact up to rounding in the base dtype).

    Args:
      params: merged parameters.
      lora: the adapter tree that was merged.
      donate: donate the merged buffers (see :func:`merge`).

    Returns:
      The unmerged parameter pytree.

    Raises:
      ValueError: on path/shape mismatches, or when ``lora`` holds leaves
        trained in full (their original value is not kept).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lora_jax import LoraSpec, init_lora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> lora = init_lora(jax.random.key(1), params, LoraSpec(rank=2, targets=["dense"], init="random"))
      >>> back = unmerge(merge(params, lora), lora)
      >>> bool(jnp.allclose(back["dense"]["kernel"], 1.0, atol=1e-6))
      True
    """
    check_entry("unmerge", params, lora)
    return _merge_like(params, lora, _remove_op, donate)
