"""Weighted combinations of LoRA adapters into one adapter (task arithmetic, TIES, DARE, SVD truncation)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.adapters._lowered import LowRank, compute_dtype
from lora_jax.adapters._nodes import LoraWeights
from lora_jax.adapters._registry import is_adapter
from lora_jax.adapters._tree import body
from lora_jax.multi import _combine_checks as checks
from lora_jax.multi._low_rank_svd import dense_svd, factored_svd
from lora_jax.multi._task_tensors import merge
from lora_jax.targets import _layout
from lora_jax.targets._paths import map_with_paths


def combine_adapters(
    adapters: Sequence[Any],
    weights: Any,
    *,
    method: str,
    rank: int | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    key: jax.Array | None = None,
    masks: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """One adapter from a weighted combination of adapters for the same params (PEFT's ``add_weighted_adapter``).

    Write ``delta_i = s_i * A_i @ B_i`` for adapter ``i`` at one kernel (``s_i`` its scale) and ``w_i`` its
    weight. The result is a tree of :class:`lora_jax.LoraWeights` with ``scale=1.0``, every weight and scale
    folded into the factors and applied once (PEFT 0.21 applies one more when the sources use rslora: its
    combined adapter copies ``use_rslora``, so ``r = lora_alpha = new rank`` scales by ``sqrt(new rank)``;
    fixed upstream in PEFT PR #3449), with the structure, layouts and dropout of ``adapters[0]``:

    * ``"cat"``: exact, ``sum_i w_i * delta_i``, the ranks concatenated (rank ``sum r_i``;
      ``A = [w_1 s_1 A_1, ...]``, ``B = [B_1; ...]`` as PEFT). The reference for the others.
    * ``"svd"``: the rank-``rank`` truncated SVD of ``sum_i w_i * delta_i`` (default rank: the largest
      ``r_i``, as PEFT), computed from the factors: a QR of the stacked A's and of the stacked B's and an
      SVD of the small ``R x R`` core (``R = sum r_i``), never an ``(in, out)`` matrix. ``rank`` may
      not exceed ``R`` nor ``min(fan_in, fan_out)``.
    * ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``: PEFT's rules,
      which act on the A's and on the B's SEPARATELY (equal ranks needed): with
      ``c_i = w_i * s_i``, ``A = rule({A_i}, sign(c_i) sqrt|c_i|)`` and ``B = rule({B_i}, sqrt|c_i|)``. The
      product ``A @ B`` then has cross terms ``A_i @ B_j`` (PEFT issue #3004): even ``"linear"`` is not
      ``sum_i w_i * delta_i`` unless there is one adapter. Use ``"cat"``/``"svd"`` for the exact sum.
    * ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``, ``"magnitude_prune_svd"``: the same rules
      on the true deltas (weights ``w_i``), then a rank-``rank`` truncated SVD, as PEFT. These form each
      ``(in, out)`` delta (the rules are elementwise on it).

    The rules (``peft.utils.merge_utils``): ``magnitude_prune`` keeps each tensor's ``int(density * size)``
    largest-magnitude entries and sums the weighted tensors; ``ties`` prunes the same way, elects a sign per
    entry from the pruned unweighted tensors (``majority_sign="total"``: the sign of their sum;
    ``"frequency"``: of the sum of their signs) and averages the weighted entries that agree; ``dare_*``
    keep a random ``density`` fraction (Bernoulli masks), rescale by ``1 / density``, then sum
    (``dare_linear``) or elect and average (``dare_ties``). Pruning acts on each tensor whole (per layer of
    stacked-layer kernels). Multi-axis kernels (layouts like ``"ioo"``) are flattened to ``(fan_in,
    fan_out)`` first, as PEFT's 2-D view.

    Differences from PEFT: one adapter is combined by the method asked for (PEFT switches to ``"linear"``);
    options a method does not use (``rank``, ``density``, ``key``, ``masks``) are errors, not ignored.
    DoRA adapters are refused (``(m / ||W + delta||)·(W + delta)`` is not linear in the deltas, so a
    weighted sum is undefined); VeRA and AdaLoRA adapters combine through their low-rank forms.

    Args:
      adapters: adapter trees for the same params (same paths, kernel shapes and layouts).
      weights: one number per adapter (may be negative; a 1-D array works under ``jit``).
      method: one of the methods above.
      rank: the truncation rank of ``"svd"`` and the ``*_svd`` methods.
      density: the fraction of entries kept, for the pruning methods.
      majority_sign: ``"total"`` or ``"frequency"``, for the TIES methods.
      key: a PRNG key for DARE's masks (one per adapter, tensor and path).
      masks: DARE's keep-masks given instead of ``key``: one tree per adapter mirroring it, holding at each
        path ``{"a": mask, "b": mask}`` shaped like the (lowered) factors for ``dare_linear``/``dare_ties``,
        or one kernel-shaped mask for the ``*_svd`` forms (0/1 or bool).

    Returns:
      An adapter tree of :class:`lora_jax.LoraWeights` with ``scale=1.0``.

    Raises:
      ValueError: on weights of the wrong length, an unknown method, a ``svd`` rank above the combined rank,
        unequal ranks for the A/B methods, adapters for different params, DoRA adapters, or options the
        method does not use.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax
      >>> params = {"dense": {"kernel": jnp.zeros((6, 4))}}
      >>> spec = lora_jax.LoraSpec(rank=2, alpha=4.0, targets=["dense"], init="random")
      >>> a, b = (lora_jax.init_lora(jax.random.key(i), params, spec) for i in (0, 1))
      >>> diff = lora_jax.combine_adapters([a, b], [1.0, -1.0], method="cat")
      >>> diff["dense"]["kernel"].rank
      4
      >>> want = a["dense"]["kernel"].delta() - b["dense"]["kernel"].delta()
      >>> bool(jnp.allclose(diff["dense"]["kernel"].delta(), want, atol=1e-6))
      True
      >>> lora_jax.combine_adapters([a, b], [0.5, 0.5], method="svd", rank=3)["dense"]["kernel"].rank
      3
    """
    method = checks.check_method(method)
    lowered = checks.lowered_adapters(adapters)
    weights = checks.check_weights(weights, len(adapters))
    checks.check_options(method, lowered, rank, density, majority_sign, key, masks)
    given = None
    if masks is not None:
        given = {path: [_given_masks(method, masks, i, path, low) for i, low in enumerate(lows)]
                 for path, lows in ((path, [items[path] for items in lowered]) for path in lowered[0])}  # fmt: skip
    for path in lowered[0]:  # the truncation rank fits every path
        lows = [items[path] for items in lowered]
        if method == "svd" or method in checks.ON_DELTAS:
            _, ins, outs = _dims(lows[0])
            k = max(low.rank for low in lows) if rank is None else rank
            checks.check_rank(method, k, path, [low.rank for low in lows], math.prod(ins), math.prod(outs))
    options = {"method": method, "rank": rank, "density": density, "majority_sign": majority_sign}
    combined = _combine_all(lowered, weights, key, given, **options)
    return map_with_paths(lambda path, node: combined[path], body(adapters[0]), is_leaf=is_adapter)


@functools.partial(jax.jit, static_argnames=("method", "rank", "density", "majority_sign"))
def _combine_all(lowered, weights, key, given, *, method, rank, density, majority_sign) -> dict[str, LoraWeights]:
    """Every path's combination, in one compiled program (the checks ran before)."""
    combined = {}
    for p, path in enumerate(lowered[0]):
        lows = [items[path] for items in lowered]
        path_key = None if key is None else jax.random.fold_in(key, p)
        path_masks = None if given is None else given[path]
        combined[path] = _combine_one(method, lows, weights, rank, density, majority_sign, path_key, path_masks)
    return combined


def _dims(low: LowRank) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The batch, input and output dims of a lowered form."""
    shape = low.kernel_shape
    return tuple(_layout.dims_of(low.layout, shape, c) for c in "bio")


def _flat(low: LowRank, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """``a (nb, fan_in, r)`` and ``b (nb, r, fan_out)``."""
    batch, ins, outs = _dims(low)
    nb, r = math.prod(batch), low.rank
    return low.a.astype(dtype).reshape(nb, math.prod(ins), r), low.b.astype(dtype).reshape(nb, r, math.prod(outs))


def _kernel_to_flat(low: LowRank, x: jax.Array) -> jax.Array:
    """A kernel-shaped array as ``(nb, fan_in, fan_out)``."""
    order = sum((_layout.axes_of(low.layout, c) for c in "bio"), ())
    batch, ins, outs = _dims(low)
    return jnp.transpose(jnp.asarray(x), order).reshape(math.prod(batch), math.prod(ins), math.prod(outs))


def _given_masks(method: str, masks: Any, i: int, path: str, low: LowRank) -> dict[str, jax.Array]:
    if method in checks.ON_DELTAS:
        got = checks.mask_for(masks, i, path, {"delta": low.kernel_shape})
        return {"delta": _kernel_to_flat(low, got["delta"])}
    got = checks.mask_for(masks, i, path, {"a": low.a.shape, "b": low.b.shape})
    nb, r = math.prod(_dims(low)[0]), low.rank
    return {"a": jnp.asarray(got["a"]).reshape(nb, -1, r), "b": jnp.asarray(got["b"]).reshape(nb, r, -1)}


def _masks(name: str, path_key: Any, path_masks: Any, shape: tuple[int, ...], density: float) -> jax.Array | None:
    """DARE's keep-masks ``(n, nb, ...)`` for one tensor: given, or drawn from the path's key."""
    if path_masks is not None:
        return jnp.stack([m[name] for m in path_masks])
    if path_key is None:
        return None
    return jax.random.bernoulli(jax.random.fold_in(path_key, {"a": 0, "b": 1, "delta": 2}[name]), density, shape)


def _merge_layers(rule: str, tensors: jax.Array, weights: jax.Array, masks: Any, **options: Any) -> jax.Array:
    """:func:`merge` of ``tensors (n, nb, ...)`` layer by layer (axis 1)."""
    if masks is None:
        return jax.vmap(lambda t: merge(rule, t, weights, **options), in_axes=1)(tensors)
    return jax.vmap(lambda t, m: merge(rule, t, weights, masks=m, **options), in_axes=1)(tensors, masks)


def _combine_one(method, lows, weights, rank, density, majority_sign, path_key, path_masks) -> LoraWeights:
    first = lows[0]
    wide = [compute_dtype(x.dtype) for low in lows for x in (low.a, low.b)]  # float32, or float64 if any is
    dtype = jnp.dtype(jnp.float64) if jnp.dtype(jnp.float64) in wide else jnp.dtype(jnp.float32)
    flats = [_flat(low, dtype) for low in lows]
    scaled = weights.astype(dtype) * jnp.asarray([low.scale for low in lows], dtype)
    rule = checks.rule_of(method)
    options = {"density": density, "majority_sign": majority_sign}
    if method == "cat":
        a = jnp.concatenate([fa * c for (fa, _), c in zip(flats, scaled, strict=True)], axis=-1)
        b = jnp.concatenate([fb for _, fb in flats], axis=-2)
    elif method in checks.ON_FACTORS:
        root = jnp.sqrt(jnp.abs(scaled))
        a_stack, b_stack = jnp.stack([fa for fa, _ in flats]), jnp.stack([fb for _, fb in flats])
        a_masks = _masks("a", path_key, path_masks, a_stack.shape, density)
        b_masks = _masks("b", path_key, path_masks, b_stack.shape, density)
        a = _merge_layers(rule, a_stack, jnp.where(scaled >= 0, root, -root), a_masks, **options)
        b = _merge_layers(rule, b_stack, root, b_masks, **options)
    else:
        k = max(low.rank for low in lows) if rank is None else rank
        if method == "svd":
            stacked_a = jnp.concatenate([fa * c for (fa, _), c in zip(flats, scaled, strict=True)], axis=-1)
            a, b = factored_svd(stacked_a, jnp.concatenate([fb for _, fb in flats], axis=-2), k)
        else:
            deltas = jnp.stack(
                [s * jnp.matmul(fa, fb, precision=jax.lax.Precision.HIGHEST)
                 for (fa, fb), s in zip(flats, [low.scale for low in lows], strict=True)]
            )  # fmt: skip
            d_masks = _masks("delta", path_key, path_masks, deltas.shape, density)
            a, b = dense_svd(_merge_layers(rule, deltas, weights.astype(dtype), d_masks, **options), k)
    batch, ins, outs = _dims(first)
    r = a.shape[-1]
    return LoraWeights(
        a.reshape(*batch, *ins, r).astype(first.a.dtype),
        b.reshape(*batch, r, *outs).astype(first.b.dtype),
        scale=1.0,
        layout=first.layout,
        kind=first.kind,
        dropout=first.dropout,
    )
