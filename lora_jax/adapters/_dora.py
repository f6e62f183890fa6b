"""DoRA (weight-decomposed low-rank adaptation): the :class:`DoraWeights` node and its magnitude init.

DoRA (Liu et al. 2024, PEFT's ``use_dora=True``) splits each adapted kernel
into a direction and a magnitude per output unit:

``W' = (m / n) * (W + s·A·B)``, ``n = ‖W + s·A·B‖`` over the input axes,

with ``n`` treated as a constant in backprop (the paper's §4.3, as PEFT).
``m`` has the kernel's batch and output axes ``(*batch, *out)``: one value per
``Dense`` output, per ``(heads, head_dim)`` unit of a multi-axis
``DenseGeneral``, per conv output channel (the norm runs over ``kh, kw, in``),
per embedding dimension for an embedding table (the norm runs over the
vocabulary, PEFT's ``nn.Embedding`` convention), and per layer of an
``nn.scan`` stack. At init ``m = n``, so the adapter is a no-op.

The node lowers to a :class:`~lora_jax.adapters._lowered.LowRank` with a
``magnitude``; the transforms (apply, merge, :func:`lora_jax.factored`,
sharding, orbax, summary) consume that form and have no DoRA branch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from lora_jax.adapters import _lowered
from lora_jax.adapters._lowered import FactorShapes, LowRank, static_field
from lora_jax.adapters._registry import lower, register_adapter


@register_adapter(name="dora")
@dataclasses.dataclass(frozen=True)
class DoraWeights(FactorShapes):
    """A DoRA adapter for one kernel: ``W' = (m / n) * (W + scale * A @ B)``.

    Attributes:
      a: ``(*batch, *in, r)``, the down-projection (PEFT's ``lora_A``, transposed).
      b: ``(*batch, r, *out)``, the up-projection (PEFT's ``lora_B``, transposed).
      m: ``(*batch, *out)``, the magnitude (PEFT's ``lora_magnitude_vector``).
      scale: ``alpha / r`` (or ``alpha / sqrt(r)`` with rslora); static.
      layout: the kernel layout, e.g. ``"io"``; see :mod:`lora_jax.targets._layout`.
      kind: ``"linear"`` or ``"embed"``.
      dropout: LoRA dropout rate, applied by :func:`lora_jax.factored` with a
        ``dropout_rng`` as PEFT does for DoRA:
        ``y = x·W + (m/n - 1)·(drop(x)·W) + (m/n)·s·(drop(x)·A)·B``.
      frozen: array fields that do not train, e.g. ``("a",)``.

    Example:
      >>> import jax.numpy as jnp
      >>> node = DoraWeights(a=jnp.zeros((2, 1)), b=jnp.zeros((1, 3)), m=jnp.full((3,), 2.0))
      >>> node.apply_to(jnp.ones((2, 3)))  # each column rescaled to norm 2
      Array([[1.4142135, 1.4142135, 1.4142135],
             [1.4142135, 1.4142135, 1.4142135]], dtype=float32)
    """

    a: jax.Array
    b: jax.Array
    m: jax.Array
    scale: float = static_field(default=1.0)
    layout: str = static_field(default="io")
    kind: str = static_field(default="linear")
    dropout: float = static_field(default=0.0)
    frozen: tuple[str, ...] = static_field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "frozen", tuple(self.frozen))
        if set(self.frozen) - {"a", "b", "m"}:
            raise ValueError(f"DoraWeights(frozen={self.frozen!r}): frozen names array fields, 'a', 'b' and/or 'm'.")

    def lower(self, shared: Mapping[str, Any]) -> LowRank:
        """The low-rank form with a magnitude (see :mod:`lora_jax.adapters._lowered`)."""
        del shared
        return LowRank(
            self.a,
            self.b,
            scale=self.scale,
            layout=self.layout,
            kind=self.kind,
            dropout=self.dropout,
            magnitude=self.m,
        )

    def field_axes(self) -> dict[str, str]:
        """A is ``(*batch, *in, r)``, B is ``(*batch, r, *out)``, m is ``(*batch, *out)``."""
        return {"a": "BIr", "b": "BrO", "m": "BO"}

    def delta(self) -> jax.Array:
        """``scale * A @ B`` in float32, in the kernel's axis order (the direction's update, before ``m / n``)."""
        return _lowered.delta(lower(self))

    def norm(self, w: jax.Array) -> jax.Array:
        """``n = ‖W + scale * A @ B‖`` over the input axes, ``(*batch, *out)``, float32 (no gradient)."""
        return _lowered.norm(lower(self), w)

    def apply_to(self, w: jax.Array) -> jax.Array:
        """``(m / n) * (W + delta)`` in float32 (float64 for a float64 ``w``), cast to ``w.dtype`` once."""
        return _lowered.apply_to(lower(self), w)

    def remove_from(self, w: jax.Array, norms: jax.Array | None = None) -> jax.Array:
        """Undo :meth:`apply_to` given ``norms``, the :meth:`norm` of the original ``W`` (raises without them)."""
        return _lowered.remove_from(lower(self), w, norms)


def dora_from(node: Any, w: Any) -> DoraWeights:
    """The DoRA node with ``node``'s factors (a ``LoraWeights``) and ``m = ‖W + s·A·B‖``: a no-op on ``w``.

    ``m`` is kept in float32 (float64 for float64 factors) whatever the factors' dtype: a bfloat16 ``m`` would
    make the init a rescaling by up to 2⁻⁸ instead of a no-op.
    """
    low = lower(node)
    m = _lowered.norm(low, w).astype(_lowered.compute_dtype(node.a.dtype))
    return DoraWeights(
        a=node.a,
        b=node.b,
        m=m,
        scale=node.scale,
        layout=node.layout,
        kind=node.kind,
        dropout=node.dropout,
        frozen=node.frozen,
    )
