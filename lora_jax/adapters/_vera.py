"""VeRA (vector-based random matrix adaptation): the :class:`VeraWeights` node and its shared projections.

VeRA (Kopiczko et al. 2024, PEFT's ``VeraConfig``) freezes one pair of random
projections for the whole model, ``A₀ (max_in, r)`` and ``B₀ (r, max_out)``
(PEFT's ``vera_A (r, max_in)`` and ``vera_B (max_out, r)``, transposed), and
trains two vectors per adapted kernel, ``d (r)`` and ``b (out)``:

``W' = W + A₀[:in] · diag(d) · B₀[:, :out] · diag(b)``

(PEFT: ``y = x Wᵀ + λ_b ⊙ (B₀ (λ_d ⊙ (A₀ x)))``). The projections live once in
the adapter tree's shared section (``lora["__shared__"]["vera_a"]`` and
``["vera_b"]``), never per node, so checkpoints store them once. A node lowers
to :class:`~lora_jax.adapters._lowered.LowRank` with ``A = A₀`` sliced and
``B = diag(d)·B₀·diag(b)``, so apply, merge, :func:`lora_jax.factored`,
summary and orbax need no VeRA branch. Kernels with several input or output
axes use the flattened sizes (PEFT's ``in_features``/``out_features``); batch
axes (a scanned stack) give each layer its own ``d`` and ``b`` over the same
projections. PEFT's init: ``b = 0`` (a no-op), ``d = d_initial`` (0.1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.adapters._lowered import LowRank, static_field
from lora_jax.adapters._registry import register_adapter
from lora_jax.errors._messages import expected

#: The shared-section keys of the two projections.
VERA_A, VERA_B = "vera_a", "vera_b"


def _projections(shared: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
    missing = [k for k in (VERA_A, VERA_B) if k not in shared]
    if missing:
        raise ValueError(
            expected(
                "a VeraWeights node's shared section",
                f"the projections {VERA_A!r} (max_in, r) and {VERA_B!r} (r, max_out) under lora['__shared__']",
                f"keys {sorted(shared)}",
                "make the tree with init_lora(key, params, LoraSpec(vera=True, ...)) or import_peft; pass the whole "
                "tree (with its '__shared__' section) to apply_lora/factored",
                found_is_text=True,
            )
        )
    return shared[VERA_A], shared[VERA_B]


@register_adapter(name="vera")
@dataclasses.dataclass(frozen=True)
class VeraWeights:
    """A VeRA adapter for one kernel: ``W' = W + A₀[:in] · diag(d) · B₀[:, :out] · diag(b)``.

    Attributes:
      d: ``(*batch, r)``, PEFT's ``vera_lambda_d``: scales the rank axis.
      b: ``(*batch, *out)``, PEFT's ``vera_lambda_b``: scales the outputs.
      in_shape: the kernel's input-axis sizes (static): which rows of ``A₀`` it uses.
      layout: the kernel layout, e.g. ``"io"``.
      dropout: dropout rate on the adapter's input (:func:`lora_jax.factored`).
      frozen: array fields that do not train, e.g. ``("d",)``.

    Example:
      >>> import jax.numpy as jnp
      >>> shared = {"vera_a": jnp.ones((4, 2)), "vera_b": jnp.ones((2, 5))}
      >>> node = VeraWeights(d=jnp.array([1.0, 2.0]), b=jnp.full((3,), 0.5), in_shape=(2,))
      >>> low = node.lower(shared)
      >>> low.a.shape, low.b.shape, float(low.b[1, 0])
      ((2, 2), (2, 3), 1.0)
    """

    d: jax.Array
    b: jax.Array
    in_shape: tuple[int, ...] = static_field()
    layout: str = static_field(default="io")
    dropout: float = static_field(default=0.0)
    frozen: tuple[str, ...] = static_field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "in_shape", tuple(int(n) for n in self.in_shape))
        object.__setattr__(self, "frozen", tuple(self.frozen))
        if set(self.frozen) - {"d", "b"}:
            raise ValueError(f"VeraWeights(frozen={self.frozen!r}): frozen names array fields, 'd' and/or 'b'.")

    @property
    def rank(self) -> int:
        """The rank ``r`` (of the shared projections)."""
        return self.d.shape[-1]

    @property
    def _nb(self) -> int:
        return self.layout.count("b")

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The shape of the kernel the adapter fits."""
        batch, out = list(self.b.shape[: self._nb]), list(self.b.shape[self._nb :])
        ins = list(self.in_shape)
        return tuple(batch.pop(0) if c == "b" else ins.pop(0) if c == "i" else out.pop(0) for c in self.layout)

    def lower(self, shared: Mapping[str, Any]) -> LowRank:
        """``A = A₀[:in]`` (reshaped, broadcast over batch axes), ``B = diag(d)·B₀[:, :out]·diag(b)``; scale 1."""
        a0, b0 = _projections(shared)
        nb = self._nb
        batch, out = tuple(self.b.shape[:nb]), tuple(self.b.shape[nb:])
        n_in, n_out, r = math.prod(self.in_shape), math.prod(out), self.rank
        if a0.ndim != 2 or b0.ndim != 2 or a0.shape[0] < n_in or b0.shape[1] < n_out or a0.shape[1] != r:
            raise ValueError(
                expected(
                    "VeraWeights: the shared projections",
                    f"vera_a (>= {n_in}, {r}) and vera_b ({r}, >= {n_out}) for a kernel {self.kernel_shape}",
                    f"vera_a {tuple(a0.shape)}, vera_b {tuple(b0.shape)}",
                    "the projections cover the largest adapted kernel; was the node made for another tree?",
                    found_is_text=True,
                )
            )
        dtype = jnp.result_type(self.d.dtype, self.b.dtype)
        a = a0[:n_in].astype(dtype).reshape(*self.in_shape, r)
        a = jnp.broadcast_to(a, (*batch, *a.shape))
        bflat = self.b.reshape(*batch, 1, n_out)
        b = self.d[..., :, None] * b0[:, :n_out].astype(dtype) * bflat
        return LowRank(a, b.reshape(*batch, r, *out), scale=1.0, layout=self.layout, dropout=self.dropout)

    def field_axes(self) -> dict[str, str]:
        """d is ``(*batch, r)``, b is ``(*batch, *out)``."""
        return {"d": "Br", "b": "BO"}


def _kaiming(key: jax.Array, shape: tuple[int, int], fan: int, dtype: Any) -> jax.Array:
    # PEFT's _kaiming_init: gain sqrt(2), bound = sqrt(3) * gain / sqrt(fan_in)
    bound = math.sqrt(6.0 / fan)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def vera_projections(key: jax.Array, max_in: int, max_out: int, rank: int, dtype: Any = jnp.float32) -> dict:
    """The shared section: ``vera_a (max_in, r)`` and ``vera_b (r, max_out)``, kaiming-uniform as PEFT's.

    PEFT draws ``vera_A (r, max_in)`` with fan-in ``max_in`` and ``vera_B (max_out, r)`` with fan-in ``r``.

    Example:
      >>> import jax
      >>> s = vera_projections(jax.random.key(0), 8, 6, 2)
      >>> s["vera_a"].shape, s["vera_b"].shape
      ((8, 2), (2, 6))
    """
    ka, kb = jax.random.split(key)
    return {
        VERA_A: _kaiming(ka, (max_in, rank), max_in, dtype),
        VERA_B: _kaiming(kb, (rank, max_out), rank, dtype),
    }
