"""The built-in adapter node types: :class:`LoraWeights` and :class:`Trainable`.

An adapter tree (what :func:`lora_jax.init_lora` returns) is a nested dict that
mirrors the parameter paths, with one node per adapted leaf:

* :class:`LoraWeights` for a low-rank adapter ``W' = W + scale * A @ B``
  (LoRA, rsLoRA, and LoRA-FA with ``frozen=("a",)``);
* :class:`Trainable` for a leaf trained in full (PEFT's ``modules_to_save``).

Both are registered node types (:mod:`lora_jax.adapters._registry`): array
fields are pytree children, ``scale``, ``layout``, ``kind``, ``dropout`` and
``frozen`` are static metadata. Each lowers to the one form the transforms
consume (:mod:`lora_jax.adapters._lowered`); variants are new node types.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from lora_jax.adapters import _lowered
from lora_jax.adapters._lowered import FactorShapes, LowRank, Replace, static_field
from lora_jax.adapters._registry import lower, register_adapter


@register_adapter(name="lora")
@dataclasses.dataclass(frozen=True)
class LoraWeights(FactorShapes):
    """A low-rank adapter for one kernel: ``delta = scale * A @ B``.

    Attributes:
      a: ``(*batch, *in, r)``, the down-projection (PEFT's ``lora_A``, transposed).
      b: ``(*batch, r, *out)``, the up-projection (PEFT's ``lora_B``, transposed).
      scale: ``alpha / r`` (or ``alpha / sqrt(r)`` with rslora); static.
      layout: the kernel layout, e.g. ``"io"``; see :mod:`lora_jax.targets._layout`.
      kind: ``"linear"`` or ``"embed"`` (how PEFT names it on export).
      dropout: LoRA dropout rate on the adapter input, applied by
        :func:`lora_jax.factored` when given a ``dropout_rng``.
      frozen: array fields that do not train: ``("a",)`` is LoRA-FA (A random
        and frozen, only B trains).

    Example:
      >>> import jax.numpy as jnp
      >>> w = LoraWeights(a=jnp.ones((3, 1)), b=jnp.full((1, 2), 0.5), scale=2.0, layout="io")
      >>> w.delta()
      Array([[1., 1.],
             [1., 1.],
             [1., 1.]], dtype=float32)
      >>> w.apply_to(jnp.zeros((3, 2))).shape
      (3, 2)
    """

    a: jax.Array
    b: jax.Array
    scale: float = static_field(default=1.0)
    layout: str = static_field(default="io")
    kind: str = static_field(default="linear")
    dropout: float = static_field(default=0.0)
    frozen: tuple[str, ...] = static_field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "frozen", tuple(self.frozen))
        if set(self.frozen) - {"a", "b"}:
            raise ValueError(f"LoraWeights(frozen={self.frozen!r}): frozen names array fields, 'a' and/or 'b'.")

    def lower(self, shared: Mapping[str, Any]) -> LowRank:
        """The low-rank form (see :mod:`lora_jax.adapters._lowered`)."""
        del shared
        return LowRank(self.a, self.b, scale=self.scale, layout=self.layout, kind=self.kind, dropout=self.dropout)

    def field_axes(self) -> dict[str, str]:
        """A is ``(*batch, *in, r)``, B is ``(*batch, r, *out)``."""
        return {"a": "BIr", "b": "BrO"}

    def delta(self) -> jax.Array:
        """``scale * A @ B`` in float32, in the kernel's axis order."""
        return _lowered.delta(lower(self))

    def apply_to(self, w: jax.Array) -> jax.Array:
        """``W + delta``, added in float32 (float64 for a float64 ``w``) and cast to ``w.dtype`` once."""
        return _lowered.apply_to(lower(self), w)

    def remove_from(self, w: jax.Array) -> jax.Array:
        """``W - delta``: undoes :meth:`apply_to` (up to rounding in ``w.dtype``)."""
        return _lowered.remove_from(lower(self), w)


@register_adapter(name="trainable")
@dataclasses.dataclass(frozen=True)
class Trainable:
    """A leaf trained in full; its value replaces the base leaf.

    Example:
      >>> import jax.numpy as jnp
      >>> Trainable(jnp.ones(2)).apply_to(jnp.zeros(2))
      Array([1., 1.], dtype=float32)
    """

    value: jax.Array

    def lower(self, shared: Mapping[str, Any]) -> Replace:
        """The replacement form."""
        del shared
        return Replace(self.value)

    def field_axes(self) -> dict[str, str]:
        """The value has the kernel's own axes."""
        return {"value": "K"}

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The shape of the leaf it replaces."""
        return tuple(self.value.shape)

    def apply_to(self, w: jax.Array) -> jax.Array:
        """The trained value, in the base leaf's dtype."""
        return _lowered.apply_to(lower(self), w)

    def remove_from(self, w: jax.Array) -> jax.Array:
        """Not invertible: the original value is not kept (raises ``ValueError``)."""
        return _lowered.remove_from(lower(self), w)
