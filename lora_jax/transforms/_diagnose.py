"""Diagnostics of a training LoRA, from the factors: norm ratio, spectrum, effective rank, gradient ratio.

The seeds' monitoring advice: the adapter's norm should be about 0.1-0.3 of
the weight's, and ``|dA| / |dB|`` should settle near 1. Every metric here is
computed from the lowered factors (``A (*batch, *in, r)``, ``B (*batch, r,
*out)``, scale ``s``) without forming the ``(in, out)`` delta:

* ``A = Qa·Ra`` and ``Bᵀ = Qb·Rb`` (reduced QR), so ``s·A·B = Qa·(s·Ra·Rbᵀ)·Qbᵀ``
  and the singular values of the delta are those of the ``r x r`` matrix
  ``s·Ra·Rbᵀ``; its left singular vectors are ``Qa`` times the small SVD's.
* ``||W||_F`` is one pass over the base kernel (a quantized base leaf is
  dequantized first).

Stacked kernels (layout letters ``"b"``, e.g. ``nn.scan`` layers) get one value
per layer: each metric has the stacked axes as its shape.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.adapters._lowered import LowRank, compute_dtype
from lora_jax.adapters._tree import lowered_items
from lora_jax.errors._messages import expected
from lora_jax.targets._paths import flatten_with_paths, is_base_leaf


def _matrices(low: LowRank) -> tuple[jax.Array, jax.Array, int]:
    """``A`` as ``(*batch, I, r)`` and ``B`` as ``(*batch, r, O)`` in the compute dtype, and the batch rank."""
    nb = low.layout.count("b")
    dtype = compute_dtype(low.a.dtype)
    batch = low.a.shape[:nb]
    a = low.a.astype(dtype).reshape(*batch, -1, low.rank)
    b = low.b.astype(dtype).reshape(*batch, low.rank, -1)
    return a, b, nb


def _small_svd(low: LowRank, compute_uv: bool = False) -> Any:
    """The SVD of the ``r x r`` core ``s·Ra·Rbᵀ``, and ``Qa`` when ``compute_uv``."""
    a, b, _ = _matrices(low)
    qa, ra = jnp.linalg.qr(a)
    _, rb = jnp.linalg.qr(jnp.swapaxes(b, -1, -2))
    core = low.scale * ra @ jnp.swapaxes(rb, -1, -2)
    if not compute_uv:
        return jnp.linalg.svd(core, compute_uv=False)
    u, sigma, _ = jnp.linalg.svd(core, full_matrices=False)
    return qa, u, sigma


def _norm_over(x: jax.Array, nb: int) -> jax.Array:
    """The Frobenius norm over every axis but the leading ``nb`` (stacked layers)."""
    x = x.astype(compute_dtype(x.dtype))
    return jnp.sqrt(jnp.sum(x * x, axis=tuple(range(nb, x.ndim))))


def _base_norm(w: Any, low: LowRank) -> jax.Array:
    w = w.dequantize() if is_base_leaf(w) else w
    nb = low.layout.count("b")
    perm = [k for k, c in enumerate(low.layout) if c == "b"] + [k for k, c in enumerate(low.layout) if c != "b"]
    return _norm_over(jnp.transpose(jnp.asarray(w), perm), nb)


def _magnitude_ratio(w: Any, low: LowRank) -> jax.Array:
    """DoRA: ``||m - n_W|| / ||n_W||`` per stacked layer, ``n_W`` the norms of ``W`` over its input axes."""
    w = w.dequantize() if is_base_leaf(w) else jnp.asarray(w)
    w = w.astype(compute_dtype(w.dtype))
    n_w = jnp.sqrt(jnp.sum(w * w, axis=tuple(k for k, c in enumerate(low.layout) if c == "i")))
    m = low.magnitude.astype(n_w.dtype).reshape(n_w.shape)
    nb = low.layout.count("b")
    return _norm_over(m - n_w, nb) / _norm_over(n_w, nb)


def _spectrum_metrics(sigma: jax.Array, top_k: int) -> dict[str, jax.Array]:
    total = jnp.sum(sigma, axis=-1, keepdims=True)
    p = jnp.where(total > 0, sigma / jnp.where(total > 0, total, 1), 0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1)), 0), axis=-1)
    energy = jnp.sum(sigma[..., :top_k] ** 2, axis=-1) / jnp.sum(sigma**2, axis=-1)  # NaN for a zero delta
    return {
        "delta_norm": jnp.sqrt(jnp.sum(sigma**2, axis=-1)),
        "singular_values": sigma,
        "effective_rank": jnp.where(total[..., 0] > 0, jnp.exp(entropy), 0),
        "energy_top_k": energy,
    }


def diagnose(params: Any, lora: Any, grads: Any = None, *, top_k: int = 1) -> dict[str, dict[str, jax.Array]]:
    """Per adapted kernel: how big the adapter is against ``W``, its spectrum, and the factors' gradient ratio.

    Metrics (each a scalar, or one value per stacked layer):

    * ``"norm_ratio"``: ``||s·A·B||_F / ||W||_F`` (left out when ``params`` is None);
    * ``"delta_norm"``: ``||s·A·B||_F``;
    * ``"singular_values"``: the delta's ``r`` singular values, descending;
    * ``"effective_rank"``: ``exp`` of the entropy of ``sigma / sum(sigma)``
      (between 1 and r; 0 for a zero delta, as at init with ``B = 0``);
    * ``"energy_top_k"``: ``sum(sigma[:top_k]²) / sum(sigma²)`` (NaN for a zero delta);
    * with ``grads`` (the adapter gradients, same tree as ``lora``):
      ``"grad_ratio"``: ``||dA||_F / ||dB||_F``, A and B as in
      :class:`~lora_jax.LoraWeights` (A the down-projection from the input
      axes, B the up-projection). Left out where A is frozen (LoRA-FA: it has no
      gradient).

    For DoRA adapters the metrics are those of the directional low-rank
    update ``s·A·B`` (before the ``m / n`` rescaling), and ``"magnitude_ratio"``
    (with ``params``) is ``||m - n_W|| / ||n_W||``, ``n_W`` the norms of ``W``
    over its input axes (what ``m`` starts from): how far training moved the
    magnitudes. ``grad_ratio`` is still ``||dA|| / ||dB||``.

    Nothing of the kernel's ``(in, out)`` size is formed but the one pass over
    ``W`` for its norm: see the module docstring. Jit-able (``top_k`` static).
    Leaves trained in full (``Trainable``) are not low-rank and are left out.

    Args:
      params: the base parameters (or None: no ``norm_ratio``).
      lora: the adapter tree.
      grads: optional gradients with respect to ``lora`` (e.g. ``jax.grad(loss)(lora, ...)``
        or the trained part after ``lora_jax.split``).
      top_k: how many leading singular values ``energy_top_k`` sums.

    Raises:
      ValueError: ``top_k`` not a positive int; an adapted path missing from
        ``params`` or ``grads``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lora_jax import LoraSpec, init_lora
      >>> params = {"dense": {"kernel": jnp.eye(4)}}
      >>> lora = init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["dense"], init="random"))
      >>> m = diagnose(params, lora)["dense/kernel"]
      >>> m["singular_values"].shape, bool(m["norm_ratio"] > 0), bool(1 <= m["effective_rank"] <= 2)
      ((2,), True, True)
    """
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(expected("diagnose(top_k=...)", "a positive int", top_k, "e.g. top_k=1"))
    lowered = {p: low for p, low in lowered_items(lora).items() if isinstance(low, LowRank)}
    base = flatten_with_paths(params, is_leaf=is_base_leaf) if params is not None else {}
    grad_items = _grad_items(grads, lowered) if grads is not None else {}
    out = {}
    for path, low in lowered.items():
        metrics = _spectrum_metrics(_small_svd(low), top_k)
        if params is not None:
            if path not in base:
                raise ValueError(
                    expected(
                        f"diagnose(params=...) at {path}",
                        "the base kernel the adapter was made for",
                        "no such path",
                        "pass the params the adapter was initialised on, or params=None",
                        found_is_text=True,
                    )
                )
            if tuple(base[path].shape) != low.kernel_shape:
                raise ValueError(
                    expected(f"diagnose(params=...) at {path}", f"a kernel of shape {low.kernel_shape} (the "
                             "adapter's)", f"shape {tuple(base[path].shape)}",
                             "pass the params the adapter was initialised on", found_is_text=True)
                )  # fmt: skip
            metrics["norm_ratio"] = metrics["delta_norm"] / _base_norm(base[path], low)
            if low.magnitude is not None:
                metrics["magnitude_ratio"] = _magnitude_ratio(base[path], low)
        if path in grad_items:
            ga, gb = grad_items[path]
            nb = low.layout.count("b")
            metrics["grad_ratio"] = _norm_over(ga, nb) / _norm_over(gb, nb)
        out[path] = metrics
    return out


def _grad_items(grads: Any, lowered: dict[str, LowRank]) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{path: (dA, dB)}`` of the gradient tree, for the paths where both factors have a gradient."""
    nodes = flatten_with_paths(grads, is_leaf=lambda x: hasattr(x, "a") and hasattr(x, "b"))
    missing = sorted(set(lowered) - set(nodes))
    if missing:
        raise ValueError(
            expected(
                "diagnose(grads=...)",
                "gradients with the adapter tree's structure",
                f"no gradient node at {', '.join(missing[:3])}",
                "pass jax.grad(loss)(lora, ...) (or the trained tree of lora_jax.split)",
                found_is_text=True,
            )
        )
    return {p: (nodes[p].a, nodes[p].b) for p in lowered if nodes[p].a is not None and nodes[p].b is not None}


def subspace_similarity(
    lora_1: Any, lora_2: Any, *, i: int | None = None, j: int | None = None, side: str = "in"
) -> dict[str, jax.Array]:
    """The LoRA paper's normalized subspace overlap of two adapters, per kernel both adapt.

    ``phi = ||U1[:, :i]ᵀ · U2[:, :j]||_F² / min(i, j)``, with ``U1``, ``U2`` the
    singular vectors of the two deltas on the input side (``side="in"``, the
    paper's A) or the output side (``"out"``), from the factors (QR and an
    ``r x r`` SVD). 1 when one top subspace contains the other, 0 when they are
    orthogonal. ``i`` and ``j`` default to each adapter's rank.

    Raises:
      ValueError: ``side`` not "in"/"out"; ``i``/``j`` not in ``1..rank``; no
        kernel adapted by both.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lora_jax import LoraSpec, init_lora
      >>> params = {"dense": {"kernel": jnp.zeros((8, 6))}}
      >>> lora = init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["dense"], init="random"))
      >>> round(float(subspace_similarity(lora, lora)["dense/kernel"]), 4)
      1.0
    """
    if side not in ("in", "out"):
        raise ValueError(expected("subspace_similarity(side=...)", '"in" or "out"', side))
    one = {p: low for p, low in lowered_items(lora_1).items() if isinstance(low, LowRank)}
    two = {p: low for p, low in lowered_items(lora_2).items() if isinstance(low, LowRank)}
    common = [p for p in one if p in two]
    if not common:
        raise ValueError(
            expected("subspace_similarity(lora_1, lora_2)", "adapters of at least one common kernel", "none in common",
                     "compare adapters made for the same model", found_is_text=True)
        )  # fmt: skip
    out = {}
    for path in common:
        u1, u2 = _basis(one[path], side), _basis(two[path], side)
        ii = _count(i, one[path].rank, "i", path)
        jj = _count(j, two[path].rank, "j", path)
        overlap = jnp.swapaxes(u1[..., :ii], -1, -2) @ u2[..., :jj]
        out[path] = jnp.sum(overlap**2, axis=(-2, -1)) / min(ii, jj)
    return out


def _basis(low: LowRank, side: str) -> jax.Array:
    """Orthonormal singular vectors of the delta, on the input or output side, in descending order."""
    if side == "in":
        qa, u, _ = _small_svd(low, compute_uv=True)
        return qa @ u
    a, b, nb = _matrices(low)
    flipped = LowRank(jnp.swapaxes(b, -1, -2), jnp.swapaxes(a, -1, -2), scale=low.scale, layout="b" * nb + "io")
    qb, v, _ = _small_svd(flipped, compute_uv=True)
    return qb @ v


def _count(k: int | None, rank: int, name: str, path: str) -> int:
    if k is None:
        return rank
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= rank:
        raise ValueError(expected(f"subspace_similarity({name}=...) at {path}", f"an int in 1..{rank}", k))
    return k


__all__ = ["diagnose", "subspace_similarity"]
