"""Truncated SVDs that give LoRA factors: of ``A @ B`` from the factors alone, and of a dense delta.

Both return ``a (nb, in, k)`` with orthonormal columns and ``b (nb, k, out)`` carrying the singular values,
PEFT's convention (its ``lora_A`` is ``Vh``, its ``lora_B`` is ``U·diag(S)``), over a leading batch axis
``nb`` (stacked layers; 1 when there are none).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _mT(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _matmul(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)


def factored_svd(a: jax.Array, b: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """The rank-``rank`` truncated SVD of ``a @ b`` (``a (nb, in, R)``, ``b (nb, R, out)``), never forming
    an ``(in, out)`` matrix: ``a = Qa·Ra`` and ``bᵀ = Qb·Rb`` (reduced QR), so ``a @ b = Qa·(Ra·Rbᵀ)·Qbᵀ``,
    and the SVD of the small core ``Ra·Rbᵀ`` (at most ``R x R``) gives the singular vectors through ``Qa``
    and ``Qb``. Needs ``rank <= min(R, in, out)``.

    Example:
      >>> import jax.numpy as jnp
      >>> a, b = factored_svd(jnp.ones((1, 3, 2)), jnp.ones((1, 2, 4)), 1)
      >>> a.shape, b.shape, round(float((a @ b)[0, 0, 0]), 4)
      ((1, 3, 1), (1, 1, 4), 2.0)
    """
    qa, ra = jnp.linalg.qr(a)
    qb, rb = jnp.linalg.qr(_mT(b))
    u, s, vt = jnp.linalg.svd(_matmul(ra, _mT(rb)), full_matrices=False)
    left = _matmul(qa, u[..., :rank])
    right = s[..., :rank, None] * _matmul(vt[..., :rank, :], _mT(qb))
    return left, right


def dense_svd(delta: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """The rank-``rank`` truncated SVD of ``delta (nb, in, out)`` as factors (``rank <= min(in, out)``).

    Example:
      >>> import jax.numpy as jnp
      >>> a, b = dense_svd(jnp.ones((1, 3, 4)), 1)
      >>> round(float((a @ b)[0, 2, 3]), 4)
      1.0
    """
    u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
    return u[..., :rank], s[..., :rank, None] * vt[..., :rank, :]
