"""The one form every adapter node lowers to, and the one place the delta is computed.

Every node type (:mod:`lora_jax.adapters._nodes`, or a variant registered with
:func:`lora_jax.register_adapter`) lowers to one of two forms:

* :class:`LowRank`: ``W' = W + scale * A ⊗ B`` with ``A (*batch, *in, r)`` and
  ``B (*batch, r, *out)`` laid out by the kernel's layout (see
  :mod:`lora_jax.targets._layout`). LoRA, LoRA-FA, VeRA (``A₀`` sliced, ``B`` =
  ``diag(d)·B₀·diag(b)``), AdaLoRA (``B = diag(E)·Q``) and sums of adapters
  (factors concatenated along ``r``) are all this form;
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRank:
    """``W' = W + scale * A ⊗ B`` (see the module docstring).

    Attributes:
      a: ``(*batch, *in, r)``.
      b: ``(*batch, r, *out)``.
      scale: the static scale (``alpha / r``).
      layout: the kernel layout, e.g. ``"io"``.
      kind: ``"linear"`` or ``"embed"``.
      dropout: the LoRA dropout rate on the adapter's input (factored training).

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

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return _layout.kernel_shape(self.layout, tuple(self.a.shape), tuple(self.b.shape))


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


def _base_in(w: Any, dtype: Any) -> jax.Array:
    # a base leaf whose dequantize takes a dtype (lora_jax.QuantizedKernel) dequantizes straight into the compute
    # dtype, so W + delta is rounded once; others dequantize into their own dtype first
    if is_base_leaf(w) and getattr(w, "dequantize_into_dtype", False):
        return w.dequantize(dtype)
    return _base_array(w).astype(dtype)


def apply_to(low: LowRank | Replace, w: jax.Array) -> jax.Array:
    """The effective weight: ``W + delta`` added in ``compute_dtype(W)`` and cast once, or the replacement."""
    if isinstance(low, Replace):
        return low.value.astype(w.dtype)
    dtype = compute_dtype(w.dtype)
    return (_base_in(w, dtype) + delta(low, dtype)).astype(w.dtype)


def remove_from(low: LowRank | Replace, w: jax.Array) -> jax.Array:
    """``W - delta``: the inverse of :func:`apply_to` up to rounding in ``W``'s dtype."""
    w = _base_array(w)
    if isinstance(low, Replace):
        raise ValueError(
            "a leaf trained in full (LoraSpec(trainable=...)) cannot be unmerged: merging replaced "
            "it and its original value is not kept. Merging is functional, so keep the original params "
            "instead of unmerging."
        )
    dtype = compute_dtype(w.dtype)
    return (w.astype(dtype) - delta(low, dtype)).astype(w.dtype)
