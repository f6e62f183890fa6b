"""The factors of the inits that read or shape the rank space: PiSSA (SVD), OLoRA (QR), orthogonal.

Each works on PEFT's 2-D view of a kernel, ``M (out, in)`` (stacked for
``"b"`` axes: ``(*batch, out, in)``, every layer decomposed on its own), and
returns PEFT's factors ``lora_A (..., r, in)`` and ``lora_B (..., out, r)``,
which :func:`to_layout` turns into lora_jax's ``A (*batch, *in, r)`` and
``B (*batch, r, *out)``. The formulas are PEFT's (``LoraLayer.pissa_init``,
``olora_init``, ``orthogonal_init``):

* PiSSA: ``M = U S Vᵀ``; ``lora_A = sqrt(S_r / s) Vᵀ_r``, ``lora_B = U_r
  sqrt(S_r / s)``, so ``s · lora_B · lora_A`` is the rank-r truncation of M;
  ``pissa_niter_N`` takes ``U_r, S_r, V_r`` from torch's ``svd_lowrank``
  algorithm (Halko et al. 5.1, ``q = r``, N subspace iterations);
* OLoRA: ``M = Q R``; ``lora_A = R[:r]``, ``lora_B = Q[:, :r]`` (not divided by s);
* orthogonal: ``Q`` from the QR of an ``(r, r)`` Gaussian; ``lora_A = (G_A
  Q[0::2]).T / 10``, ``lora_B = G_B.T Q[1::2] / 10``: A and B use complementary
  halves of an orthonormal basis of the rank space, so ``B·A = 0`` (up to rounding).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.targets import _layout

_HI = jax.lax.Precision.HIGHEST


def _mm(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.matmul(x, y, precision=_HI)


def _t(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def kernel_matrix(w: jax.Array, layout: str) -> jax.Array:
    """PEFT's 2-D view ``(*batch, out, in)`` of a kernel: output axes, then input axes, each flattened in order.

    >>> import jax.numpy as jnp
    >>> kernel_matrix(jnp.zeros((8, 2, 4)), "ioo").shape, kernel_matrix(jnp.zeros((3, 8, 5)), "bio").shape
    ((8, 8), (3, 5, 8))
    """
    shape = tuple(w.shape)
    order = (*_layout.axes_of(layout, "b"), *_layout.axes_of(layout, "o"), *_layout.axes_of(layout, "i"))
    batch = _layout.dims_of(layout, shape, "b")
    return jnp.transpose(w, order).reshape(*batch, _layout.fan_out(layout, shape), _layout.fan_in(layout, shape))


def to_layout(lora_a: jax.Array, lora_b: jax.Array, layout: str, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """PEFT's ``lora_A (*batch, r, in)`` and ``lora_B (*batch, out, r)`` as lora_jax's A and B for ``shape``."""
    r = lora_a.shape[-2]
    return _t(lora_a).reshape(_layout.a_shape(layout, shape, r)), _t(lora_b).reshape(_layout.b_shape(layout, shape, r))


def lora_node(lora_a: jax.Array, lora_b: jax.Array, t: Any, spec: Any) -> Any:
    """The adapter node of PEFT-layout factors (``lora_A (*batch, r, in)``, ``lora_B (*batch, out, r)``) for target ``t``.

    Stored in ``spec.dtype``, with the target's scale, layout and kind, the spec's dropout and LoRA-FA choice.
    """
    from lora_jax.adapters._nodes import LoraWeights

    a, b = to_layout(lora_a, lora_b, t.layout, t.shape)
    return LoraWeights(
        a=a.astype(spec.dtype),
        b=b.astype(spec.dtype),
        scale=t.scale,
        layout=t.layout,
        kind=t.kind,
        dropout=spec.dropout,
        frozen=("a",) if spec.freeze_a else (),
    )


def svd_lowrank(m: jax.Array, q: int, niter: int, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(U, S, V)`` of rank ``q`` approximating ``m (..., M, N)``: torch's ``svd_lowrank`` algorithm.

    A Gaussian test matrix, ``niter`` subspace iterations (each re-orthonormalized
    by QR), then the exact SVD of the ``(q, N)`` projection. Like torch, a wide
    matrix is decomposed through its transpose.

    >>> import jax, jax.numpy as jnp
    >>> u, s, v = svd_lowrank(jnp.diag(jnp.array([8.0, 4.0, 1.0, 0.5])), 2, 4, jax.random.key(0))
    >>> [round(float(x), 3) for x in s]
    [8.0, 4.0]
    """
    wide = m.shape[-2] < m.shape[-1]
    a = _t(m) if wide else m
    omega = jax.random.normal(key, (*a.shape[:-2], a.shape[-1], q), a.dtype)
    basis = jnp.linalg.qr(_mm(a, omega))[0]

    def iterate(_, basis):
        basis = jnp.linalg.qr(_mm(_t(a), basis))[0]
        return jnp.linalg.qr(_mm(a, basis))[0]

    basis = jax.lax.fori_loop(0, niter, iterate, basis)
    u, s, vh = jnp.linalg.svd(_mm(_t(basis), a), full_matrices=False)
    u, v = _mm(basis, u), _t(vh)
    return (v, s, u) if wide else (u, s, v)


def pissa_factors(
    m: jax.Array, rank: int, scale: float, *, niter: int | None = None, key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """PiSSA's ``(lora_A (..., r, in), lora_B (..., out, r))``: ``scale · lora_B · lora_A`` is M's rank-r truncation.

    Args:
      m: the kernel's 2-D view ``(..., out, in)``, in the dtype to decompose in.
      rank: ``r``.
      scale: the adapter's scale ``s`` (the singular values are divided by it).
      niter: None for the exact SVD, else the subspace iterations of a randomized SVD.
      key: the randomized SVD's key (with ``niter``).

    Returns:
      ``(lora_A, lora_B)``, each holding ``sqrt(S_r / s)``.

    >>> import jax.numpy as jnp
    >>> a, b = pissa_factors(jnp.diag(jnp.array([4.0, 1.0])), 1, 2.0)
    >>> [[round(float(x), 4) for x in row] for row in 2.0 * b @ a]
    [[4.0, 0.0], [0.0, 0.0]]
    """
    if niter is None:
        u, s, vh = jnp.linalg.svd(m, full_matrices=False)
        u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
    else:
        u, s, v = svd_lowrank(m, rank, niter, key)
        vh = _t(v)
    root = jnp.sqrt(s / scale)
    return root[..., :, None] * vh, u * root[..., None, :]


def olora_factors(m: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """OLoRA's ``(lora_A, lora_B) = (R[:r], Q[:, :r])`` from the reduced QR of ``m (..., out, in)``.

    >>> import jax.numpy as jnp
    >>> a, b = olora_factors(jnp.array([[3.0, 1.0], [4.0, 2.0]]), 1)
    >>> [[round(float(x), 4) for x in row] for row in b @ a]  # W projected on its first column
    [[3.0, 1.32], [4.0, 1.76]]
    """
    q, r = jnp.linalg.qr(m)
    return r[..., :rank, :], q[..., :, :rank]


def orthogonal_factors(
    key: jax.Array, layout: str, shape: tuple[int, ...], rank: int, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """PEFT's orthogonal init as lora_jax's ``(A (*batch, *in, r), B (*batch, r, *out))``, each layer its own draw.

    >>> import jax, jax.numpy as jnp
    >>> a, b = orthogonal_factors(jax.random.key(0), "io", (6, 5), 4, jnp.float32)
    >>> a.shape, b.shape, bool(jnp.abs(a @ b).max() < 1e-6)
    ((6, 4), (4, 5), True)
    """
    kq, ka, kb = jax.random.split(key, 3)
    batch = _layout.dims_of(layout, shape, "b")
    fan_in, fan_out = _layout.fan_in(layout, shape), _layout.fan_out(layout, shape)
    basis = jnp.linalg.qr(jax.random.normal(kq, (*batch, rank, rank), jnp.float32))[0]
    half = rank // 2
    a = _mm(jax.random.normal(ka, (*batch, fan_in, half), jnp.float32), basis[..., 0::2, :]) / 10.0
    b = _mm(_t(basis[..., 1::2, :]), jax.random.normal(kb, (*batch, half, fan_out), jnp.float32)) / 10.0
    a = a.reshape(_layout.a_shape(layout, shape, rank))
    b = b.reshape(_layout.b_shape(layout, shape, rank))
    return a.astype(dtype), b.astype(dtype)
