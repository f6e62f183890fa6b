"""Applying adapters: effective weights, merge and unmerge."""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.adapters import _lowered
from lora_jax.adapters._tree import adapter_items, items_of, lowered_items
from lora_jax.errors._checks import check_params
from lora_jax.errors._messages import expected
from lora_jax.targets._paths import flatten_with_paths, map_with_paths
from lora_jax.transforms._quantized_merge import check_quantized_choice, requantized


def _check_shapes(path: str, leaf: Any, node: Any) -> None:  # node: a lowered form
    shape = tuple(getattr(leaf, "shape", ()))
    if not hasattr(leaf, "shape") or shape != node.kernel_shape:
        raise ValueError(
            f"{path}: the adapter fits a kernel of shape {node.kernel_shape}, but params hold "
            f"{'shape ' + str(shape) if hasattr(leaf, 'shape') else type(leaf).__name__} there. "
            f"The adapter was made for other params; create it with init_lora on these params."
        )


def check_entry(where: str, params: Any, lora: Any) -> None:
    """The first lines of apply_lora / merge / unmerge: params a pytree of arrays, lora an adapter tree, and
    every adapted base leaf a value (not a ``ShapeDtypeStruct``: shapes only have nothing to add the delta to)."""
    order = f"{where}(params, lora)"
    items = items_of(lora, where, order)
    check_params(where, params, order=order)
    flat = flatten_with_paths(params)
    for path in items:
        leaf = flat.get(path)
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise TypeError(
                expected(
                    f"{where}(params=...) at {path}",
                    "an array",
                    f"ShapeDtypeStruct of shape {leaf.shape} and dtype {leaf.dtype} (a shape, not a value)",
                    f"Pass the real params, or get the result's shapes with jax.eval_shape({where}, params, lora)",
                    found_is_text=True,
                )
            )


def _transform(params: Any, lora: Any, op: Callable[[Any, Any], Any]) -> Any:
    items = lowered_items(lora)
    flat = flatten_with_paths(params)
    missing = [p for p in items if p not in flat]
    if missing:
        near = difflib.get_close_matches(missing[0], list(flat), n=3, cutoff=0.0)
        raise ValueError(
            f"the adapter has {len(missing)} path(s) that params lack, first {missing[0]!r} "
            f"(nearest params paths: {', '.join(near)}). The adapter was made for other params."
        )
    for path, node in items.items():
        _check_shapes(path, flat[path], node)

    def one(path: str, w: Any) -> Any:
        if path not in items:
            return w
        try:
            return op(items[path], w)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    return map_with_paths(one, params)


def apply_lora(params: Any, lora: Any) -> Any:
    """The effective parameters: every adapted leaf replaced by ``W + scale * A @ B``.

    Pure and jit-able; ``params`` is not modified. Every adapter node is
    lowered to its low-rank form (see :mod:`lora_jax.adapters._lowered`); the
    update is computed in float32 (float64 for a float64 base) and cast to
    each base leaf's dtype once. Leaves trained in full (:class:`Trainable`)
    replace their base leaf. Frozen arrays (``lora_jax.split``) enter through
    ``stop_gradient``, so differentiating the result never computes their
    gradient.

    This is the deterministic path: LoRA dropout (``LoraSpec(dropout=...)``,
    recorded in each adapter) is not applied here. Train with dropout through
    :func:`lora_jax.factored` with a ``dropout_rng``.

    Args:
      params: the base parameter pytree.
      lora: an adapter tree from :func:`init_lora`.

    Returns:
      A pytree with the structure and dtypes of ``params``.

    Raises:
      TypeError: if ``lora`` is not an adapter tree (the arguments swapped,
        say), or an adapted leaf of ``params`` is a ``ShapeDtypeStruct``.
      ValueError: if an adapter path is missing from ``params`` or its shape
        differs (the message names the path and both shapes).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lora_jax import LoraSpec, init_lora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> lora = init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["dense"]))
      >>> out = jax.jit(apply_lora)(params, lora)
      >>> bool(jnp.all(out["dense"]["kernel"] == 1.0))  # B = 0 at init: a no-op
      True
    """
    check_entry("apply_lora", params, lora)
    return _transform(params, lora, _apply_op)


def _is_tracing(tree: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


@jax.jit
def _finite(ws: dict, lora: dict) -> dict:
    # Module level, so jax.jit's cache is reused across calls (a jit made per call recompiles every time).
    return {p: jnp.all(jnp.isfinite(_lowered.apply_to(n, ws[p]))) for p, n in lowered_items(lora).items()}


def _check_finite(params: Any, lora: Any) -> None:
    flat = flatten_with_paths(params)
    ok = jax.device_get(_finite({p: flat[p] for p in adapter_items(lora)}, lora))
    bad = [p for p, v in ok.items() if not v]
    if bad:
        raise ValueError(
            f"merge(safe=True): merging would put NaN or inf into {', '.join(bad)}; params are unchanged. "
            f"Check the adapter for diverged values (e.g. lower the learning rate)."
        )


_apply_op, _remove_op = _lowered.apply_to, _lowered.remove_from


def _norms_op(low: Any, w: Any) -> Any:
    return _lowered.norm(low, w)


def _is_dora(low: Any) -> bool:
    return getattr(low, "magnitude", None) is not None


def _dora_paths(lora: Any) -> list[str]:
    return [p for p, low in lowered_items(lora).items() if _is_dora(low)]


def dora_norms(params: Any, lora: Any) -> dict[str, jax.Array]:
    """DoRA's column norms ``n = ‖W + s·A·B‖`` (over the input axes) of every DoRA kernel, keyed by path.

    What :func:`unmerge` needs to undo a DoRA merge (``merge(..., return_norms=True)`` returns the same).

    Args:
      params: the base (unmerged) parameter pytree.
      lora: an adapter tree.

    Returns:
      ``{path: n}`` with ``n`` of shape ``(*batch, *out)`` in float32 (float64 for a float64 kernel), for the DoRA
      nodes only.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lora_jax import LoraSpec, init_lora
      >>> params = {"dense": {"kernel": jnp.full((4, 3), 0.5)}}
      >>> lora = init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["dense"], dora=True))
      >>> dora_norms(params, lora)["dense/kernel"]
      Array([1., 1., 1.], dtype=float32)
    """
    check_entry("dora_norms", params, lora)
    jax.eval_shape(lambda p, lo: _transform(p, lo, _apply_op), params, lora)  # validate paths and shapes first
    flat = flatten_with_paths(params)
    return {p: _lowered.norm(low, flat[p]) for p, low in lowered_items(lora).items() if _is_dora(low)}


@functools.cache
def _jitted(op: Callable, donate: bool) -> Callable:
    """One jitted merge per (op, donate), so repeated merges of same-shaped trees reuse the compilation.

    It returns ``(merged, norms)``: DoRA's norms of the input weights (merge) or those given (unmerge) by path.
    """

    def run(ws: dict, lora: Any, norms: dict) -> tuple[dict, dict]:
        items = lowered_items(lora)
        if op is _apply_op:
            out = {p: _norms_op(n, ws[p]) for p, n in items.items() if _is_dora(n)}
            return {p: op(n, ws[p]) for p, n in items.items()}, out
        return {p: op(n, ws[p], norms[p]) if _is_dora(n) else op(n, ws[p]) for p, n in items.items()}, {}

    return jax.jit(run, donate_argnums=(0,) if donate else ())


def _merge_like(params: Any, lora: Any, op: Callable, donate: bool, norms: Any = None) -> tuple[Any, dict]:
    check = (lambda n, w: op(n, w, n.magnitude)) if op is _remove_op else op  # shapes only: any norms will do
    jax.eval_shape(lambda p, lo: _transform(p, lo, lambda n, w: check(n, w) if _is_dora(n) else op(n, w)), params, lora)
    flat = flatten_with_paths(params)
    if _is_tracing((params, lora)):
        donate = False
    merged, out_norms = _jitted(op, donate)({p: flat[p] for p in lowered_items(lora)}, lora, norms or {})
    return map_with_paths(lambda p, w: merged.get(p, w), params), out_norms


def _check_norms(lora: Any, norms: Any) -> dict:
    """The ``norms`` given to ``unmerge``: one array of shape ``(*batch, *out)`` per DoRA path, or a clear error."""
    dora = {p: low for p, low in lowered_items(lora).items() if _is_dora(low)}
    if not dora:
        return {}
    if norms is None:
        first = next(iter(dora))
        others = f" (and {len(dora) - 1} other kernel(s))" if len(dora) > 1 else ""
        raise ValueError(
            f"unmerge(norms=None) at {first}: this is a DoRA adapter{others}, which cannot be unmerged "
            f"from the merged weights alone: merging scaled each output unit by m / n, where n is the norm of "
            f"the ORIGINAL W + s·A·B, which the merged weights no longer determine. Merge with "
            f"merged, norms = merge(params, lora, return_norms=True) and unmerge with "
            f"unmerge(merged, lora, norms=norms), or keep the original params (merge is functional)."
        )
    if not isinstance(norms, dict):
        raise TypeError(
            expected(
                "unmerge(norms=...)", "a dict {path: norms}", norms, "Pass what merge(..., return_norms=True) returned"
            )
        )
    for p, low in dora.items():
        want = tuple(low.magnitude.shape)
        got = norms.get(p)
        if got is None or tuple(getattr(got, "shape", ())) != want:
            found = "no entry" if got is None else f"shape {tuple(getattr(got, 'shape', ()))}"
            raise ValueError(
                expected(
                    f"unmerge(norms=...) at {p}",
                    f"DoRA's norms of shape {want}",
                    found,
                    "Pass the norms merge(params, lora, return_norms=True) returned for this adapter",
                    found_is_text=True,
                )
            )
    return {p: norms[p] for p in dora}


def merge(
    params: Any,
    lora: Any,
    *,
    donate: bool = False,
    safe: bool = False,
    return_norms: bool = False,
    quantized: str | None = None,
) -> Any:
    """Fold the adapter into the base weights for inference: ``W + scale * A @ B``.

    Numerically the same as :func:`apply_lora` (float32 update, one cast), with
    two options for real deployments. A DoRA kernel (:class:`lora_jax.DoraWeights`)
    merges to ``(m / n) * (W + scale * A @ B)``, computed in float32; undoing that
    needs the norms ``n`` of the original weights: ask for them with
    ``return_norms=True`` and give them to :func:`unmerge`.

    Args:
      params: the base parameter pytree.
      lora: an adapter tree from :func:`init_lora`.
      donate: donate the adapted base buffers to the merge, so the merged
        kernels reuse their memory (the donated arrays in ``params`` become
        unusable). Ignored under tracing.
      safe: first check that no merged leaf would hold NaN or inf and raise,
        naming the leaves, before anything is donated. Not usable under ``jit``.
      return_norms: also return DoRA's norms ``{path: n}`` (see
        :func:`lora_jax.dora_norms`), which :func:`unmerge` needs for DoRA
        kernels (``{}`` when the adapter has none).
      quantized: required when an adapted kernel is quantized
        (:func:`lora_jax.quantize`): ``"float"`` returns it as a float kernel
        (as :func:`apply_lora` computes it); ``"requantize"`` quantizes the
        float32 merge again in the kernel's format and also returns a report
        ``{path: {"max_error": ..., "max_delta": ...}}``: the largest rounding
        error next to the largest change the adapter made (see
        :mod:`lora_jax.transforms._quantized_merge`).

    Returns:
      The merged parameter pytree; ``(merged, norms)`` with ``return_norms=True``;
      ``(merged, report)`` or ``(merged, norms, report)`` with ``quantized="requantize"``.

    Raises:
      ValueError: on path/shape mismatches, with ``safe=True`` on NaN/inf, or
        when an adapted kernel is quantized and ``quantized`` is not given.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lora_jax import LoraSpec, init_lora
      >>> params = {"dense": {"kernel": jnp.zeros((4, 3))}}
      >>> lora = init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["dense"], init="random"))
      >>> merged = merge(params, lora, safe=True)
      >>> bool(jnp.allclose(unmerge(merged, lora)["dense"]["kernel"], 0.0, atol=1e-6))
      True
    """
    check_entry("merge", params, lora)
    found = check_quantized_choice("merge", params, lora, quantized)
    if safe:
        if _is_tracing((params, lora)):
            raise ValueError("merge(safe=True) checks values on the host and cannot run under jit; use safe=False.")
        _check_finite(params, lora)
    if quantized == "requantize":
        again, report = requantized(lora, found)  # before _merge_like, which may donate the codes
        merged, norms = _merge_like(params, lora, _apply_op, donate)
        merged = map_with_paths(lambda p, w: again.get(p, w), merged)
        return (merged, norms, report) if return_norms else (merged, report)
    merged, norms = _merge_like(params, lora, _apply_op, donate)
    return (merged, norms) if return_norms else merged


def unmerge(
    params: Any, lora: Any, *, donate: bool = False, norms: dict[str, Any] | None = None, quantized: str | None = None
) -> Any:
    """Undo :func:`merge`: ``W - scale * A @ B`` (exact up to rounding in the base dtype).

    A DoRA kernel is unmerged as ``W' * (n / m) - scale * A @ B``, with ``n``
    from ``norms`` (the merged weights do not determine it).

    Args:
      params: merged parameters.
      lora: the adapter tree that was merged.
      donate: donate the merged buffers (see :func:`merge`).
      norms: DoRA's norms from ``merge(..., return_norms=True)`` (or
        :func:`lora_jax.dora_norms` of the original params); required when
        ``lora`` holds DoRA nodes.
      quantized: required when an adapted kernel of ``params`` is quantized,
        as for :func:`merge` (``"requantize"`` also returns the report).

    Returns:
      The unmerged parameter pytree, or ``(unmerged, report)`` with ``quantized="requantize"``.

    Raises:
      ValueError: on path/shape mismatches, when ``lora`` holds leaves
        trained in full (their original value is not kept), or DoRA nodes and
        ``norms`` is missing or does not fit them.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lora_jax import LoraSpec, init_lora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> lora = init_lora(jax.random.key(1), params, LoraSpec(rank=2, targets=["dense"], init="random"))
      >>> back = unmerge(merge(params, lora), lora)
      >>> bool(jnp.allclose(back["dense"]["kernel"], 1.0, atol=1e-6))
      True
    """
    check_entry("unmerge", params, lora)
    found = check_quantized_choice("unmerge", params, lora, quantized)
    norms = _check_norms(lora, norms)
    if quantized == "requantize":
        again, report = requantized(lora, found, norms, remove=True)
        unmerged = _merge_like(params, lora, _remove_op, donate, norms)[0]
        return map_with_paths(lambda p, w: again.get(p, w), unmerged), report
    return _merge_like(params, lora, _remove_op, donate, norms)[0]
