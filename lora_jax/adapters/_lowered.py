"""The one form every adapter node lowers to, and the one place the delta is computed.

Every node type (:mod:`lora_jax.adapters._nodes`, or a variant registered with
:func:`lora_jax.register_adapter`) lowers to one of two forms:

* :class:`LowRank`: ``W' = W + scale * A ⊗ B`` with ``A (*batch, *in, r)`` and
  ``B (*batch, r, *out)`` laid out by the kernel's layout (see
  :mod:`lora_jax.targets._layout`). LoRA, LoRA-FA, VeRA (``A₀`` sliced, ``B`` =
  ``diag(d)·B₀·diag(b)``), AdaLoRA (``B = diag(E)·Q``) and sums of adapters
  (factors concatenated along ``r``) are all this form. With a ``magnitude``
  ``m (*batch, *out)`` (DoRA) the form has a multiplier on the output axes:
  ``W' = (m / n) * (W + scale * A ⊗ B)``, ``n`` the norm of ``W + scale * A ⊗ B``
  over the input axes (:func:`norm`), a constant in backprop;
* :class:`Replace`: ``W' = value`` (a leaf trained in full).

apply, merge/unmerge, :func:`lora_jax.factored`, summary and sharding consume
these forms, never the node types, so a new variant needs no change there.
:func:`product` is the only place ``A ⊗ B`` is formed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.targets import _layout
from lora_jax.targets._paths import is_base_leaf


def static_field(**kwargs: Any) -> Any:
    """A dataclass field that is static pytree metadata (scale, layout, ...), not an array child."""
    return dataclasses.field(metadata={"static": True}, **kwargs)


class FactorShapes:
    """``rank`` and ``kernel_shape`` of anything with factors ``a (*batch, *in, r)``, ``b (*batch, r, *out)``
    and a ``layout``: the lowered form and the low-rank node types share them."""

    a: jax.Array
    b: jax.Array
    layout: str

    @property
    def rank(self) -> int:
        """The rank ``r``."""
        return self.a.shape[-1]

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The shape of the kernel the factors fit."""
        return _layout.kernel_shape(self.layout, tuple(self.a.shape), tuple(self.b.shape))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRank(FactorShapes):
    """``W' = W + scale * A ⊗ B`` (see the module docstring).

    Attributes:
      a: ``(*batch, *in, r)``.
      b: ``(*batch, r, *out)``.
      scale: the static scale (``alpha / r``).
      layout: the kernel layout, e.g. ``"io"``.
      kind: ``"linear"`` or ``"embed"``.
      dropout: the LoRA dropout rate on the adapter's input (factored training).
      magnitude: ``(*batch, *out)`` or None: DoRA's magnitude ``m``, which makes the
        effective kernel ``(m / n) * (W + scale * A ⊗ B)`` (see :func:`norm`).

    Example:
      >>> import jax.numpy as jnp
      >>> low = LowRank(jnp.ones((3, 2)), jnp.ones((2, 5)), scale=0.5, layout="io")
      >>> low.rank, low.kernel_shape
      (2, (3, 5))
    """

    a: jax.Array
    b: jax.Array
    scale: float = static_field()
    layout: str = static_field()
    kind: str = static_field(default="linear")
    dropout: float = static_field(default=0.0)
    magnitude: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Replace:
    """``W' = value``: a leaf trained in full (PEFT's ``modules_to_save``).

    Example:
      >>> import jax.numpy as jnp
      >>> apply_to(Replace(jnp.ones(2)), jnp.zeros(2, jnp.bfloat16))
      Array([1, 1], dtype=bfloat16)
    """

    value: jax.Array

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype a delta is computed and added in: float32, or the base dtype when it is wider (float64)."""
    # not jnp.promote_types: it raises under jax_numpy_dtype_promotion="strict" (bfloat16 with float32)
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def product(equation: str, a: jax.Array, b: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """``einsum(equation, a, b)`` in ``dtype`` at full precision: the only place ``A ⊗ B`` is formed."""
    dtype = compute_dtype(dtype)
    return jnp.einsum(equation, a.astype(dtype), b.astype(dtype), precision=jax.lax.Precision.HIGHEST)


def delta(low: LowRank, dtype: Any = jnp.float32) -> jax.Array:
    """``scale * A ⊗ B`` in the kernel's axis order, computed in ``compute_dtype(dtype)``.

    Example:
      >>> import jax.numpy as jnp
      >>> delta(LowRank(jnp.ones((3, 1)), jnp.full((1, 2), 0.5), scale=2.0, layout="io"))
      Array([[1., 1.],
             [1., 1.],
             [1., 1.]], dtype=float32)
    """
    return low.scale * product(_layout.delta_equation(low.layout), low.a, low.b, dtype)


def _base_array(w: Any) -> jax.Array:
    # a registered base-leaf node (a quantized kernel) is dequantized first: the effective weight is a float array
    return w.dequantize() if is_base_leaf(w) else w


def norm(low: LowRank, w: jax.Array, dtype: Any = None) -> jax.Array:
    """``‖W + scale * A ⊗ B‖`` over the input axes, ``(*batch, *out)``, in ``compute_dtype(W)``; no gradient flows.

    DoRA's column norm ``n`` (PEFT's ``weight_norm``), treated as a constant in
    backprop as in the DoRA paper (§4.3) and PEFT.

    Example:
      >>> import jax.numpy as jnp
      >>> norm(LowRank(jnp.zeros((2, 1)), jnp.zeros((1, 3)), scale=1.0, layout="io"), jnp.full((2, 3), 3.0))
      Array([4.2426405, 4.2426405, 4.2426405], dtype=float32)
    """
    w = _base_array(w)
    dtype = compute_dtype(w.dtype if dtype is None else dtype)
    v = w.astype(dtype) + delta(low, dtype)
    ins = _layout.axes_of(low.layout, "i")
    return jax.lax.stop_gradient(jnp.sqrt(jnp.sum(jnp.square(v), axis=ins)))


def safe_divide(m: jax.Array, n: jax.Array) -> jax.Array:
    """``m / n`` with ``n == 0`` read as 1: a zero column ``W + s·A·B`` stays zero instead of becoming NaN."""
    return m / jnp.where(n == 0, jnp.ones((), n.dtype), n)


def _on_out_axes(low: LowRank, x: jax.Array) -> jax.Array:
    """``x (*batch, *out)`` broadcast against the kernel: size-1 input axes inserted."""
    return jnp.expand_dims(x, _layout.axes_of(low.layout, "i"))


def _base_in(w: Any, dtype: Any) -> jax.Array:
    # a base leaf whose dequantize takes a dtype (lora_jax.QuantizedKernel) dequantizes straight into the compute
    # dtype, so W + delta is rounded once; others dequantize into their own dtype first
    if is_base_leaf(w) and getattr(w, "dequantize_into_dtype", False):
        return w.dequantize(dtype)
    return _base_array(w).astype(dtype)


def apply_to(low: LowRank | Replace, w: jax.Array) -> jax.Array:
    """The effective weight: ``W + delta`` added in ``compute_dtype(W)`` and cast once, or the replacement.

    With a magnitude (DoRA): ``(m / n) * (W + delta)``, all in ``compute_dtype(W)``, cast once.
    """
    if isinstance(low, Replace):
        return low.value.astype(w.dtype)
    dtype = compute_dtype(w.dtype)
    v = _base_in(w, dtype) + delta(low, dtype)
    if low.magnitude is not None:
        n = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(jnp.square(v), axis=_layout.axes_of(low.layout, "i"))))
        v = _on_out_axes(low, safe_divide(low.magnitude.astype(dtype), n)) * v
    return v.astype(w.dtype)


def remove_from(low: LowRank | Replace, w: jax.Array, norms: jax.Array | None = None) -> jax.Array:
    """``W - delta``: the inverse of :func:`apply_to` up to rounding in ``W``'s dtype.

    A DoRA form (with a magnitude) needs ``norms``, the :func:`norm` of the weights it was applied to:
    ``W = W' * (n / m) - delta``; without them it raises ``ValueError``.
    """
    w = _base_array(w)
    if isinstance(low, Replace):
        raise ValueError(
            "a leaf trained in full (LoraSpec(trainable=...)) cannot be unmerged: merging replaced "
            "it and its original value is not kept. Merging is functional, so keep the original params "
            "instead of unmerging."
        )
    dtype = compute_dtype(w.dtype)
    v = w.astype(dtype)
    if low.magnitude is not None:
        if norms is None:
            raise ValueError(
                "a DoRA adapter cannot be unmerged from the merged weights alone: merging scaled each output "
                "unit by m / n, where n is the norm of the ORIGINAL W + s·A·B, which the merged weights no "
                "longer determine. Merge with merged, norms = merge(params, lora, return_norms=True) and "
                "unmerge with unmerge(merged, lora, norms=norms), or keep the original params (merge is "
                "functional)."
            )
        n = jnp.asarray(norms).astype(dtype)
        m = low.magnitude.astype(dtype)
        v = v * _on_out_axes(low, jnp.where(m == 0, jnp.zeros((), dtype), n / jnp.where(m == 0, 1, m)))
    return (v - delta(low, dtype)).astype(w.dtype)
