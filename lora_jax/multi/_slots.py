"""One adapter in a bank's serving form: scale folded into B, rank padded, missing targets the identity.

A bank (:mod:`lora_jax.multi._bank`) keeps, for every parameter path any of
its adapters targets, a :class:`Form`: the kernel's layout and kind, the
bank's rank ``R`` (the largest of its adapters') and whether the path is DoRA.
Each adapter is written into that form here:

* ``A`` padded with zero columns to rank ``R`` and ``B`` with zero rows (the
  padding adds nothing: ``A·B`` is unchanged);
* the scale folded into ``B`` (``B' = scale·B``), so the serving form has the
  static scale 1.0 and adapters with different alphas, ranks or rsLoRA differ
  only in data;
* a path the adapter does not target is the identity: ``A = 0``, ``B = 0``, and
  on a DoRA path ``m = ‖W‖`` over the input axes (so ``m / n = 1``);
* a plain low-rank adapter on a DoRA path gets ``m = ‖W + s·A·B‖``, which
  makes DoRA's rescaling the identity: ``(m / n)·(W + s·A·B) = W + s·A·B``.

The last two need the base kernel ``W``; without it they raise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.adapters import _lowered
from lora_jax.adapters._lowered import LowRank
from lora_jax.errors._messages import expected
from lora_jax.targets import _layout


@dataclasses.dataclass(frozen=True)
class Form:
    """The static serving form of one bank path (hashable: a pytree's static metadata)."""

    path: str
    layout: str
    kind: str
    rank: int
    kernel_shape: tuple[int, ...]
    dora: bool


def serving_dtypes(lows: list[LowRank]) -> tuple[jnp.dtype, jnp.dtype]:
    """The dtypes of a bank's ``A`` and of its ``B`` (and ``m``) at one path.

    ``A`` keeps the adapters' factor dtype (the widest where they differ); ``B`` holds ``scale·B``, so it is
    kept in at least float32: folding a scale into a bfloat16 ``B`` would round it.
    """
    dtypes = {jnp.dtype(low.a.dtype) for low in lows} | {jnp.dtype(low.b.dtype) for low in lows}
    a = dtypes.pop() if len(dtypes) == 1 else _lowered.compute_dtype(max(dtypes, key=lambda d: d.itemsize))
    return a, _lowered.compute_dtype(a)


def _pad_rank(x: jax.Array, axis: int, rank: int) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, rank - x.shape[axis])
    return jnp.pad(x, widths)


def _needs_base(form: Form, why: str, base: Any, where: str) -> Any:
    if base is None:
        raise ValueError(
            expected(
                f"{where}: {form.path}",
                "the base params, to write this adapter into the bank's DoRA form",
                why,
                "pass params=..., e.g. lora_jax.stack(adapters, params=params): the identity on a DoRA path has "
                "m = ‖W‖ over the input axes, and a LoRA adapter there m = ‖W + s·A·B‖",
                found_is_text=True,
            )
        )
    return base


def slot(
    form: Form, low: LowRank | None, base: Any, dtypes: tuple[jnp.dtype, jnp.dtype], where: str
) -> dict[str, jax.Array]:
    """``{"a", "b"[, "m"]}`` of one adapter (``low``, or None where it lacks the path) in ``form``.

    Args:
      form: the bank's form at this path.
      low: the adapter's lowered form there, or None (the identity).
      base: the base kernel ``W`` (needed on a DoRA path unless ``low`` is DoRA), or None.
      dtypes: the dtypes of ``A`` and of ``B``/``m`` (see :func:`serving_dtypes`).
      where: the public function, for errors.
    """
    nb = form.layout.count("b")
    a_dtype, b_dtype = dtypes
    if low is None:
        a = jnp.zeros(_layout.a_shape(form.layout, form.kernel_shape, form.rank), a_dtype)
        b = jnp.zeros(_layout.b_shape(form.layout, form.kernel_shape, form.rank), b_dtype)
        low_for_norm = LowRank(a, b, scale=1.0, layout=form.layout)
        why = "this adapter does not target the path (the identity there)"
    else:
        a = _pad_rank(low.a.astype(a_dtype), low.a.ndim - 1, form.rank)
        b = _pad_rank(low.b.astype(b_dtype) * jnp.asarray(low.scale, b_dtype), nb, form.rank)
        low_for_norm = low
        why = "a LoRA adapter (no magnitude) on a path where another adapter of the bank is DoRA"
    out = {"a": a, "b": b}
    if form.dora:
        if low is not None and low.magnitude is not None:
            out["m"] = low.magnitude.astype(b_dtype)
        else:
            w = _needs_base(form, why, base, where)
            out["m"] = _lowered.norm(low_for_norm, w, b_dtype).astype(b_dtype)
    return out
