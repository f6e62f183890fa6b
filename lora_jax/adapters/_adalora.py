"""AdaLoRA (adaptive budget allocation): the :class:`AdaLoraWeights` node, ``W' = W + s·Q·diag(E)·P``.

AdaLoRA (Zhang et al. 2023, PEFT's ``AdaLoraConfig``) writes each update in
SVD form: PEFT's ``lora_A (r, in)`` (the right singular vectors),
``lora_E (r, 1)`` (the singular values) and ``lora_B (out, r)`` (the left
ones), with ``delta = scaling / (ranknum + 1e-5) · lora_B · (lora_A ⊙
lora_E)``, ``ranknum = r`` fixed. Here ``a = lora_Aᵀ (*batch, *in, r)``,
``e (*batch, r)`` and ``b = lora_Bᵀ (*batch, r, *out)``; the node lowers to a
:class:`~lora_jax.adapters._lowered.LowRank` with ``B = diag(E)·b``, so
apply, merge, :func:`lora_jax.factored` and orbax need no AdaLoRA branch.
Pruning a triplet sets its entry of ``e`` to zero (data, no retrace): see
:func:`lora_jax.adalora_allocator`. PEFT's init: ``E = 0`` (a no-op), ``a``
and ``b`` normal with std 0.02.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.adapters._lowered import FactorShapes, LowRank, static_field
from lora_jax.adapters._registry import register_adapter


def adalora_scale(rank: int, alpha: float) -> float:
    """PEFT's ``scaling / (ranknum + 1e-5)`` with ``scaling = alpha`` (``r`` when alpha is 0).

    >>> round(adalora_scale(4, 8.0), 6)
    1.999995
    """
    return (alpha if alpha > 0 else float(rank)) / (rank + 1e-5)


@register_adapter(name="adalora")
@dataclasses.dataclass(frozen=True)
class AdaLoraWeights(FactorShapes):
    """An AdaLoRA adapter for one kernel: ``W' = W + scale · a · diag(e) · b``.

    Attributes:
      a: ``(*batch, *in, r)``, PEFT's ``lora_A`` transposed (plays A).
      e: ``(*batch, r)``, PEFT's ``lora_E``: the singular values, zero where pruned.
      b: ``(*batch, r, *out)``, PEFT's ``lora_B`` transposed (plays B, before ``diag(e)``).
      scale: :func:`adalora_scale` (static).
      layout, kind, dropout: as :class:`lora_jax.LoraWeights`.

    Example:
      >>> import jax.numpy as jnp
      >>> node = AdaLoraWeights(jnp.ones((3, 2)), jnp.array([1.0, 0.0]), jnp.ones((2, 4)), scale=1.0)
      >>> node.lower({}).b[:, 0]
      Array([1., 0.], dtype=float32)
    """

    a: jax.Array
    e: jax.Array
    b: jax.Array
    scale: float = static_field(default=1.0)
    layout: str = static_field(default="io")
    kind: str = static_field(default="linear")
    dropout: float = static_field(default=0.0)

    def lower(self, shared: Mapping[str, Any]) -> LowRank:
        """``A = a``, ``B = diag(e)·b``."""
        del shared
        n_out = self.layout.count("o")
        e = self.e.reshape(*self.e.shape, *([1] * n_out))
        b = e.astype(jnp.result_type(self.e.dtype, self.b.dtype)) * self.b
        return LowRank(self.a, b, scale=self.scale, layout=self.layout, kind=self.kind, dropout=self.dropout)

    def field_axes(self) -> dict[str, str]:
        """a is ``(*batch, *in, r)``, e is ``(*batch, r)``, b is ``(*batch, r, *out)``."""
        return {"a": "BIr", "e": "Br", "b": "BrO"}
