"""The task-tensor merge rules of TIES, DARE and magnitude pruning, on tensors stacked along axis 0.

Each rule takes ``tensors (n, ...)`` (one tensor per adapter, unweighted), ``weights (n,)`` and returns one
tensor ``(...)``, with PEFT's semantics (``peft.utils.merge_utils``): prune each tensor (keep the
``density`` fraction of its entries with the largest magnitude, or a random ``density`` fraction rescaled
by ``1 / density`` for DARE), elect a sign per entry from the pruned, unweighted tensors (TIES), then sum the
weighted tensors (``linear``) or average the weighted entries that agree with the elected sign (TIES's
disjoint merge). Pruning and election act on each tensor as a whole; the callers vmap over stacked layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _weighted(tensors: jax.Array, weights: jax.Array) -> jax.Array:
    return tensors * weights.reshape((-1,) + (1,) * (tensors.ndim - 1)).astype(tensors.dtype)


def keep_largest(tensor: jax.Array, density: float) -> jax.Array:
    """``tensor`` with all but its ``int(density * size)`` largest-magnitude entries set to zero.

    Example:
      >>> import jax.numpy as jnp
      >>> keep_largest(jnp.array([[1.0, -3.0], [0.5, 2.0]]), 0.5)
      Array([[ 0., -3.],
             [ 0.,  2.]], dtype=float32)
    """
    if density >= 1:
        return tensor
    k = int(density * tensor.size)
    flat = tensor.reshape(-1)
    _, idx = jax.lax.top_k(jnp.abs(flat), k)
    mask = jnp.zeros(flat.shape, tensor.dtype).at[idx].set(1)
    return (flat * mask).reshape(tensor.shape)


def majority_agrees(tensors: jax.Array, majority_sign: str) -> jax.Array:
    """Where each entry's sign equals the elected sign: the sign of the sum (``"total"``) or of the sum of signs
    (``"frequency"``) over axis 0, a zero sum electing ``+``; zero entries never agree."""
    sign = jnp.sign(tensors)
    votes = jnp.sum(tensors if majority_sign == "total" else sign, axis=0)
    return sign == jnp.where(votes >= 0, 1, -1).astype(sign.dtype)


def disjoint_mean(weighted: jax.Array, agrees: jax.Array) -> jax.Array:
    """The sum over axis 0 of the agreeing weighted entries, divided by how many agree (at least 1)."""
    total = jnp.sum(weighted * agrees.astype(weighted.dtype), axis=0)
    return total / jnp.maximum(jnp.sum(agrees, axis=0), 1).astype(weighted.dtype)


def merge(
    rule: str,
    tensors: jax.Array,
    weights: jax.Array,
    *,
    density: float | None = None,
    majority_sign: str = "total",
    masks: jax.Array | None = None,
) -> jax.Array:
    """One merged tensor by ``rule`` (``"linear"``, ``"ties"``, ``"magnitude_prune"``, ``"dare_linear"``,
    ``"dare_ties"``); DARE's random keep-masks ``masks (n, ...)`` are given (0/1 or bool).

    Example:
      >>> import jax.numpy as jnp
      >>> t = jnp.array([[1.0, -2.0], [3.0, 1.0]])
      >>> merge("ties", t, jnp.array([1.0, 1.0]), density=1.0)  # column 1: -2 + 1 elects "-"
      Array([ 2., -2.], dtype=float32)
    """
    if rule in ("ties", "magnitude_prune"):
        tensors = jax.vmap(lambda t: keep_largest(t, density))(tensors)
    elif rule in ("dare_linear", "dare_ties") and density < 1:
        tensors = tensors * masks.astype(tensors.dtype) / jnp.asarray(density, tensors.dtype)
    weighted = _weighted(tensors, weights)
    if rule in ("ties", "dare_ties"):
        return disjoint_mean(weighted, majority_agrees(tensors, majority_sign))
    return jnp.sum(weighted, axis=0)
