"""Mixed batches: every example of one batch runs with its own adapter of a bank, factored.

:func:`mixed_batch` gathers each example's adapter from the bank (its slot's
arrays, ``(batch, ...)``) and ``jax.vmap``\\ s one call of
``factored(fn, strategy="factored")`` over (adapter, example), the base params
unbatched: example ``j`` computes ``x_j·W + (x_j·A_j)·B_j``, so no kernel is
ever formed per adapter or per example (S-LoRA / punica's batched
gather-matmul, written as a ``vmap``). Id ``-1`` is the base alone: its
example gets ``A = B = 0`` (and on DoRA paths ``m = ‖W‖``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.adapters import _lowered
from lora_jax.adapters._lowered import LowRank
from lora_jax.errors._messages import expected
from lora_jax.factored._interpreter import factored
from lora_jax.multi._bank import AdapterBank, check_bank, serving_tree
from lora_jax.multi._forms import base_leaves

#: The adapter id of an example that runs on the base alone (PEFT's ``"__base__"``).
BASE = -1


def _batch_size(args: tuple[Any, ...]) -> int:
    leaves = jax.tree_util.tree_leaves(args)
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if not leaves or None in sizes or len(sizes) != 1:
        found = "no arguments" if not leaves else f"leading sizes {sorted(sizes, key=str)}"
        raise ValueError(
            expected(
                "mixed_batch(fn)(params, bank, adapter_ids, *args): args",
                "array arguments sharing their leading (batch) axis",
                found,
                "pass the batch as positional arrays with the examples on axis 0; pass anything else as a keyword "
                "argument (keyword arguments are not batched)",
                found_is_text=True,
            )
        )
    return sizes.pop()


def check_ids(adapter_ids: Any, size: int, batch: int) -> jax.Array:
    """``adapter_ids`` as an int32 vector of length ``batch``; concrete ids are checked to lie in ``[-1, size)``."""
    where = "mixed_batch(fn)(params, bank, adapter_ids, ...): adapter_ids"
    ids = jnp.asarray(adapter_ids) if not isinstance(adapter_ids, jax.core.Tracer) else adapter_ids
    if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.shape != (batch,):
        raise ValueError(
            expected(
                where,
                f"one integer id per example, shape ({batch},) (the batch size of the args)",
                f"{ids.dtype} of shape {tuple(ids.shape)}",
                "e.g. jnp.array([0, 2, -1, ...]): the bank slot of each example, -1 for the base alone",
                found_is_text=True,
            )
        )
    if not isinstance(ids, jax.core.Tracer):
        values = np.asarray(ids)
        bad = sorted({int(v) for v in values if not BASE <= int(v) < size})
        if bad:
            raise IndexError(
                expected(
                    where,
                    f"ids in [0, {size}) (the bank holds {size} adapters) or -1 (the base alone)",
                    f"{bad} at example(s) {[int(j) for j in np.flatnonzero(~((values >= BASE) & (values < size)))][:8]}",
                    "under jax.jit ids are not checked: an out-of-range id gives NaN outputs for its example",
                    found_is_text=True,
                )
            )
    return ids.astype(jnp.int32)


def _base_norms(bank: AdapterBank, params: Any) -> dict[str, jax.Array]:
    """``‖W‖`` over the input axes on every DoRA path: the magnitude of the base alone (id -1)."""
    if not bank.m:
        return {}
    bases = base_leaves(params)
    out = {}
    for form in bank.forms:
        if form.dora:
            zero = LowRank(
                jnp.zeros(bank.a[form.path].shape[1:], bank.a[form.path].dtype),
                jnp.zeros(bank.b[form.path].shape[1:], bank.b[form.path].dtype),
                scale=1.0,
                layout=form.layout,
            )
            out[form.path] = _lowered.norm(zero, bases[form.path], bank.m[form.path].dtype)
    return out


def gather_slots(bank: AdapterBank, ids: jax.Array, base_norms: dict[str, jax.Array]) -> dict[str, dict[str, Any]]:
    """Each example's slot arrays, ``(batch, ...)``: ``A = B = 0`` (``m = ‖W‖``) for -1, NaN for ids out of range."""
    size = len(bank)
    base = ids == BASE
    bad = (ids < BASE) | (ids >= size)
    j = jnp.clip(ids, 0, size - 1)

    def rows(x: jax.Array, fill: jax.Array | None) -> jax.Array:
        got = jnp.take(x, j, axis=0)
        mask = lambda v: v.reshape(v.shape + (1,) * (got.ndim - 1))  # noqa: E731
        got = jnp.where(mask(base), jnp.zeros((), got.dtype) if fill is None else fill[None].astype(got.dtype), got)
        return jnp.where(mask(bad), jnp.full((), jnp.nan, got.dtype), got)

    return {
        "a": {p: rows(x, None) for p, x in bank.a.items()},
        "b": {p: rows(x, None) for p, x in bank.b.items()},
        "m": {p: rows(x, base_norms[p]) for p, x in bank.m.items()},
    }


def mixed_batch(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``fn(params, *args, **kwargs)`` to run each example of a batch with its own adapter of a bank.

    ``mixed_batch(fn)(params, bank, adapter_ids, *args, **kwargs)`` returns, for
    every example ``j``, ``fn(apply_lora(params, adapters[adapter_ids[j]]),
    *(x[j:j+1] for x in args), **kwargs)`` with the leading axis of size 1
    dropped, stacked over ``j``; ``adapter_ids[j] == -1`` runs the base alone
    (``fn(params, ...)``, PEFT's ``"__base__"``). ``args`` are arrays (or
    pytrees of arrays) whose axis 0 is the batch; ``kwargs`` are passed to
    every example unbatched. Each example is computed factored
    (``x·W + (x·A)·B``, :func:`lora_jax.factored` with
    ``strategy="factored"``) under ``jax.vmap``, so no kernel is formed per
    adapter or per example, and DoRA's norms come from the factors. Works
    under ``jit``: the ids and the bank's contents are data, so new ids, or a
    slot replaced with :meth:`AdapterBank.replace`, do not retrace. ``fn``
    must treat the examples independently (a batch of 1 per call) and return
    arrays.

    Ids are checked when concrete: each in ``[-1, len(bank))``. Under ``jit``
    they cannot be: an out-of-range id gives its example NaN adapter arrays,
    so its float outputs are NaN (never another adapter's result).

    Args:
      fn: the model function, ``fn(params, *args, **kwargs)``.

    Returns:
      A callable ``(params, bank, adapter_ids, *args, **kwargs)``.

    Raises:
      TypeError: (at a call) if ``bank`` is not an :class:`AdapterBank`.
      ValueError: if ``adapter_ids`` is not one integer per example or the args do not share a batch axis.
      IndexError: if concrete ids are out of range.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> fn = lambda p, x: x @ p["dense"]["kernel"]
      >>> loras = [lora_jax.init_lora(jax.random.key(k), params, lora_jax.LoraSpec(rank=2, init="random"))
      ...          for k in range(2)]
      >>> bank = lora_jax.stack(loras)
      >>> x = jnp.arange(12.0).reshape(3, 4)
      >>> y = jax.jit(lora_jax.mixed_batch(fn))(params, bank, jnp.array([1, -1, 0]), x)
      >>> want = [fn(lora_jax.apply_lora(params, loras[1]), x[0]), fn(params, x[1]),
      ...         fn(lora_jax.apply_lora(params, loras[0]), x[2])]
      >>> bool(jnp.allclose(y, jnp.stack(want), atol=1e-4))
      True
    """
    if not callable(fn):
        raise TypeError(expected("mixed_batch(fn=...)", "a callable fn(params, *args)", fn))
    inner = factored(fn, strategy="factored", deterministic=True)

    def call(params: Any, bank: AdapterBank, adapter_ids: Any, *args: Any, **kwargs: Any) -> Any:
        bank = check_bank(bank, "mixed_batch(fn)")
        ids = check_ids(adapter_ids, len(bank), _batch_size(args))
        per_example = gather_slots(bank, ids, _base_norms(bank, params))

        def one(arrays: dict[str, dict[str, Any]], example: tuple[Any, ...]) -> Any:
            lora = serving_tree(bank.forms, arrays)
            out = inner(params, lora, *jax.tree_util.tree_map(lambda x: x[None], example), **kwargs)
            return jax.tree_util.tree_map(lambda y: y[0], out)

        return jax.vmap(one)(per_example, args)

    return call
