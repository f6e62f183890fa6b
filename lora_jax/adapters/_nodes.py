"""Adapter nodes: the pytree types that hold an adapter for one base leaf.

An adapter tree (what :func:`lora_jax.init_lora` returns) is a nested dict that
mirrors the parameter paths, with one node per adapted leaf:

* :class:`LoraWeights` for a low-rank adapter ``W' = W + scale * A @ B``;
* :class:`Trainable` for a leaf trained in full (PEFT's ``modules_to_save``).

Every node implements ``apply_to(w)`` (the effective weight),
``remove_from(w)`` (the inverse of a merge) and ``kernel_shape``. Variants
(DoRA's magnitude vector, VeRA, AdaLoRA, quantized bases, several stacked
adapters) are new node types with the same three members, so the transforms
in :mod:`lora_jax.transforms._apply` never change. Array fields are pytree children (and
are trained); ``scale``, ``layout`` and ``kind`` are static metadata.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lora_jax.targets import _layout


def _static(**kwargs):
    return dataclasses.field(metadata={"static": True}, **kwargs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeights:
    """A low-rank adapter for one kernel: ``delta = scale * A @ B``.

    Attributes:
      a: ``(*batch, *in, r)``, the down-projection (PEFT's ``lora_A``, transposed).
      b: ``(*batch, r, *out)``, the up-projection (PEFT's ``lora_B``, transposed).
      scale: ``alpha / r`` (or ``alpha / sqrt(r)`` with rslora); static.
      layout: the kernel layout, e.g. ``"io"``; see :mod:`lora_jax.targets._layout`.
      kind: ``"linear"`` or ``"embed"`` (how PEFT names it on export).

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
    scale: float = _static(default=1.0)
    layout: str = _static(default="io")
    kind: str = _static(default="linear")

    @property
    def rank(self) -> int:
        """The rank ``r``."""
        return self.a.shape[-1]

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The shape of the kernel this adapter fits."""
        return _layout.kernel_shape(self.layout, tuple(self.a.shape), tuple(self.b.shape))

    def delta(self) -> jax.Array:
        """``scale * A @ B`` in float32, in the kernel's axis order."""
        return self.scale * _layout.low_rank_product(self.layout, self.a, self.b)

    def apply_to(self, w: jax.Array) -> jax.Array:
        """``W + delta``, added in float32 and cast to ``w.dtype`` once."""
        return (w.astype(jnp.float32) + self.delta()).astype(w.dtype)

    def remove_from(self, w: jax.Array) -> jax.Array:
        """``W - delta``: undoes :meth:`apply_to` (up to rounding in ``w.dtype``)."""
        return (w.astype(jnp.float32) - self.delta()).astype(w.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Trainable:
    """A leaf trained in full; its value replaces the base leaf.

    Example:
      >>> import jax.numpy as jnp
      >>> Trainable(jnp.ones(2)).apply_to(jnp.zeros(2))
      Array([1., 1.], dtype=float32)
    """

    value: jax.Array

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The shape of the leaf it replaces."""
        return tuple(self.value.shape)

    def apply_to(self, w: jax.Array) -> jax.Array:
        """The trained value, in the base leaf's dtype."""
        return self.value.astype(w.dtype)

    def remove_from(self, w: jax.Array) -> jax.Array:
        """Not invertible: the original value is not kept."""
        raise ValueError(
            "a leaf trained in full (LoraSpec(trainable=...)) cannot be unmerged: merging replaced "
            "it and its original value is not kept. Merging is functional, so keep the original params "
            "instead of unmerging."
        )


ADAPTER_TYPES = (LoraWeights, Trainable)


def is_adapter(x: object) -> bool:
    """Whether ``x`` is an adapter node (a leaf of an adapter tree).

    Use it as ``is_leaf`` to walk an adapter tree node by node.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> lora = {"dense": {"kernel": LoraWeights(jnp.ones((3, 1)), jnp.zeros((1, 2)))}}
      >>> [type(n).__name__ for n in jax.tree_util.tree_leaves(lora, is_leaf=is_adapter)]
      ['LoraWeights']
    """
    return isinstance(x, ADAPTER_TYPES)
