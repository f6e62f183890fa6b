"""Per-primitive rules of :func:`lora_jax.factored` for a :class:`LazyKernel` operand.

Two families:

* *layout rules* follow a reshape, transpose, cast to a narrower float dtype,
  broadcast, squeeze or static slice of the kernel: the primitive is applied to
  the base ``w`` and mirrored on the factors (no kernel-sized work beyond what
  the model already does to ``W``);
* *use rules* consume the kernel: ``dot_general`` (Dense, DenseGeneral, einsum,
  ``x @ E.T``), ``conv_general_dilated`` and ``gather`` (embedding lookups,
  ``take``). Each computes the base result with ``w`` unchanged and adds the
  adapter branch through the rank-``r`` bottleneck, e.g.
  ``x·W + s·(x·A)·B``; which factor meets ``x`` first is chosen by the size
  of the intermediate, so ``x @ E.T`` with an embedding adapter is factored too.

Every rule returns ``None`` when it cannot factor the use; the interpreter then
raises (or materializes the leaf, if the caller opted in).

Rounding: the reference ``fn(apply_lora(params, lora))`` rounds the effective
kernel ``W + s·A·B``; factored can only round ``W`` and the factors. A cast to a
narrower float dtype is followed (the model then computes in that dtype, and
rounding the terms instead of their sum differs only at that dtype's own
precision). ``reduce_precision``, a cast back to a wider dtype (a round trip,
or a kernel stored narrower than it is computed in) and casts that are not
float-to-narrower-float are not: their result would differ from the reference
by the narrow dtype's rounding in a wider computation, so they raise (see
:func:`rounding_note`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax.factored import _dora
from lora_jax.factored import _lazy as lz
from lora_jax.factored._dense import dense_use
from lora_jax.factored._lazy import RANK_LETTER, LazyKernel
from lora_jax.factored._quantized import DeferredBase, quantized_use

Dropout = Callable[[jax.Array], jax.Array]


class Pending:
    """A use rule's result ``base + delta`` with the sum not yet formed.

    The interpreter adds the next ``add`` operand (the layer's bias) to ``base``
    first and the adapter branch last: ``(x·W + bias) + delta``. XLA fuses that
    order better than ``(x·W + delta) + bias`` (measured: one activation-sized
    temporary less per adapted layer, ~5% faster steps on the benchmark GPT).
    """

    def __init__(self, base: jax.Array, delta: jax.Array):
        self.base, self.delta = base, delta

    def resolve(self) -> jax.Array:
        return self.base + self.delta


# --------------------------------------------------------------------------- layout rules


def on_base(prim: Any, w: Any, rest: list[Any], params: dict[str, Any]) -> Any:
    """``prim(w, *rest)``; recorded, not run, on a quantized base (dequantized only at its use)."""
    if isinstance(w, DeferredBase):
        return w.then(prim, rest, params)
    return prim.bind(w, *rest, **params)


def base_use(prim: Any, params: dict[str, Any], x: jax.Array, lk: LazyKernel, kernel_first: bool) -> jax.Array:
    """The base product ``prim(x, W)`` of a use; a quantized ``W`` dequantized inside it (codes as the residual)."""
    if lk.quantized:
        return quantized_use(prim, params, x, lk.w, lk.dtype, kernel_first)
    return prim.bind(*((lk.base(), x) if kernel_first else (x, lk.base())), **params)


def layout_rule(prim: Any, lk: LazyKernel, rest: list[Any], params: dict[str, Any]) -> LazyKernel | None:
    """Apply a layout primitive to ``lk``; ``None`` if ``prim`` is not one (or not followable)."""
    name = prim.name
    if name == "convert_element_type":
        new = jnp.dtype(params["new_dtype"])
        if new == lk.dtype:
            return lk
        return lk.replace(cast=new) if _narrower(new, lk.dtype) else None
    if name in ("copy", "copy_p", "sharding_constraint"):
        return lk.replace(w=on_base(prim, lk.w, [], params))
    if name == "transpose":
        return lz.transpose(lk, tuple(params["permutation"]), on_base(prim, lk.w, [], params))
    if name == "reshape":
        if params.get("dimensions") is not None:
            return None
        return lz.reshape(lk, tuple(params["new_sizes"]), on_base(prim, lk.w, [], params), name)
    if name == "squeeze":
        return lz.squeeze(lk, tuple(params["dimensions"]), on_base(prim, lk.w, [], params))
    if name == "broadcast_in_dim":
        if rest:  # dynamic shapes
            return None
        new_w = on_base(prim, lk.w, [], params)
        return lz.broadcast_in_dim(lk, tuple(params["shape"]), tuple(params["broadcast_dimensions"]), new_w)
    if name == "slice":
        strides = params.get("strides")
        if strides is not None and any(s != 1 for s in strides):
            return None
        starts = list(params["start_indices"])
        sizes = [hi - lo for lo, hi in zip(params["start_indices"], params["limit_indices"], strict=True)]
        return lz.slice_axes(lk, starts, sizes, on_base(prim, lk.w, [], params))
    if name == "dynamic_slice":
        if any(isinstance(r, LazyKernel) for r in rest):
            return None
        new_w = on_base(prim, lk.w, rest, params)
        # clamp like dynamic_slice does, so the factors are sliced at the same offsets
        starts = [jnp.clip(s, 0, n - size) for s, n, size in zip(rest, lk.shape, params["slice_sizes"], strict=True)]
        return lz.slice_axes(lk, starts, list(params["slice_sizes"]), new_w)
    return None


def _narrower(new: Any, old: Any) -> bool:
    """Whether float dtype ``new`` holds a subset of ``old``'s values (bfloat16 from float32, not from float16)."""
    floats = jnp.issubdtype(new, jnp.floating) and jnp.issubdtype(old, jnp.floating)
    with jax.numpy_dtype_promotion("standard"):  # promote_types raises under "strict" (bfloat16 with float32)
        return bool(floats) and jnp.promote_types(new, old) == jnp.dtype(old)


def rounding_note(name: str, lk: LazyKernel, params: dict[str, Any]) -> str | None:
    """Why a rounding primitive cannot be factored, for the error message; ``None`` if ``name`` is not one."""
    same = "fn(apply_lora(params, lora)) rounds the effective kernel W + s·A·B, factored() could only round W"
    if name == "reduce_precision":
        bits = f"exponent_bits={params['exponent_bits']}, mantissa_bits={params['mantissa_bits']}"
        return f"reduce_precision ({bits}): {same}"
    if name != "convert_element_type":
        return None
    new, old = jnp.dtype(params["new_dtype"]), lk.dtype
    if not (jnp.issubdtype(new, jnp.floating) and jnp.issubdtype(old, jnp.floating)):
        return f"convert_element_type from {old} to {new} (only casts to a narrower float dtype are factored)"
    why = "a cast to a wider dtype" if _narrower(old, new) else "a cast that changes both precision and range"
    return (
        f"convert_element_type from {old} to {new} ({why}, after the kernel was rounded to {old} by its "
        f"stored dtype or an earlier cast: {same}, and would differ by {old}'s rounding in a {new} computation)"
    )


# --------------------------------------------------------------------------- use rules


def _spec(lk: LazyKernel) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(lk.shape, lk.dtype)


def _fresh(n: int, used: set[str]) -> list[str]:
    out = []
    for c in lz.LETTERS:
        if len(out) == n:
            break
        if c not in used:
            out.append(c)
            used.add(c)
    if len(out) < n:
        raise lz.FactoredError("factored(): too many axes for an einsum (more than 51).")
    return out


def factored_product(
    x: jax.Array,
    xs: str,
    lk: LazyKernel,
    ks: str,
    out: str,
    *,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``scale * einsum(x, a ⊗ b)`` computed as two einsums through the rank axis.

    ``xs``/``ks``/``out`` name the axes of ``x``, of the kernel and of the
    result; kernel axes of kind ``"n"`` that appear only in ``out`` are
    broadcast at the end.
    """
    first, second, _ = factor_stages(
        x.shape, x.dtype, xs, lk, ks, out, precision=precision, preferred_element_type=preferred_element_type
    )
    return second(first(x, lk.a, lk.b), lk.a, lk.b)


def factor_stages(
    x_shape: tuple[int, ...],
    x_dtype: Any,
    xs: str,
    lk: LazyKernel,
    ks: str,
    out: str,
    *,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> tuple[Callable, Callable, Callable | None]:
    """:func:`factored_product`'s two einsums as ``first(x, a, b) -> t`` and ``second(t, a, b) -> y``.

    The third is ``second`` as an elementwise sum of rank-1 terms (``None`` where ``second`` sums more than
    the rank axis): XLA fuses it into each consumer instead of keeping a materialized product.
    """
    sa, sb = lk.letters(ks)
    sizes = {**dict(zip(xs, x_shape, strict=True)), **dict(zip(sa, lk.a.shape, strict=True))}
    sizes.update(zip(sb, lk.b.shape, strict=True))
    known = "".join(c for c in out if c in xs or c in sa or c in sb)

    def inter(p: str, q: str) -> str:
        keep = set(q) | set(known)
        return "".join(dict.fromkeys(c for c in xs + p if c in keep))

    options = [(sa, sb, True), (sb, sa, False)]
    ps, qs, a_first = min(options, key=lambda o: math.prod(sizes[c] for c in inter(o[0], o[1])))
    ts = inter(ps, qs)
    if preferred_element_type is not None and jnp.dtype(preferred_element_type) == jnp.dtype(x_dtype) == lk.dtype:
        preferred_element_type = None  # the default already; keeps the einsum the same as a hand-written one
    kw = {"precision": precision, "preferred_element_type": preferred_element_type}
    dtype, scale = lk.dtype, lk.scale
    k_sizes = dict(zip(ks, lk.shape, strict=True))

    def first(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.einsum(f"{xs},{ps}->{ts}", x, (a if a_first else b).astype(dtype), **kw)

    def second(t: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        qv = (b if a_first else a).astype(dtype)
        # the scale goes on the small factor, not on the (tokens x out) result: one less pass over activations
        y = jnp.einsum(f"{ts},{qs}->{known}", t, (qv * jnp.asarray(scale, qv.dtype)).astype(t.dtype), **kw)
        if known != out:
            y = jnp.expand_dims(y, [i for i, c in enumerate(out) if c not in known])
            y = jnp.broadcast_to(y, tuple(sizes.get(c, k_sizes.get(c)) for c in out))
        return y

    def second_ew(t: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        """``second`` as a sum of rank-1 terms (elementwise: XLA fuses it into consumers, keeping only ``t``)."""
        qv = (b if a_first else a).astype(dtype)
        qv = (qv * jnp.asarray(scale, qv.dtype)).astype(t.dtype)
        acc = jnp.float32 if jnp.finfo(t.dtype).bits < 32 else t.dtype  # summed in float32 at least
        t, qv = t.astype(acc), qv.astype(acc)
        r = RANK_LETTER
        tl, ql = ts.replace(r, ""), qs.replace(r, "")

        def align(v: jax.Array, letters: str) -> jax.Array:
            order = [c for c in known if c in letters]
            v = jnp.transpose(v, [letters.index(c) for c in order])
            return jnp.expand_dims(v, [i for i, c in enumerate(known) if c not in letters])

        y = None
        for k in range(t.shape[ts.index(r)]):
            term = align(jnp.take(t, k, axis=ts.index(r)), tl) * align(jnp.take(qv, k, axis=qs.index(r)), ql)
            y = term if y is None else y + term
        y = jnp.broadcast_to(y, tuple(sizes.get(c, k_sizes.get(c)) for c in known))
        if known != out:
            y = jnp.expand_dims(y, [i for i, c in enumerate(out) if c not in known])
            y = jnp.broadcast_to(y, tuple(sizes.get(c, k_sizes.get(c)) for c in out))
        return y

    elementwise = (set(ts) | set(qs)) - set(known) == {RANK_LETTER}  # only the rank axis is summed
    return first, second, (second_ew if elementwise else None)


def times_g(y: jax.Array, ys: str, lk: LazyKernel, ks: str, g: jax.Array | None = None) -> jax.Array:
    """``y ∘ g``: DoRA's ``g = m / n`` over the axes of ``y`` that carry its letters.

    ``ks`` names the kernel's axes; ``g``'s axes are the kernel's output (and stacked) axes, which must all appear
    in ``ys``.
    """
    g0 = (lk.g if g is None else g)[0]
    gs = "".join(ks[k] for k in lk.b_axes())
    order = [c for c in ys if c in gs]
    g0 = jnp.transpose(g0, [gs.index(c) for c in order])
    g0 = jnp.expand_dims(g0, [i for i, c in enumerate(ys) if c not in gs])
    return y * g0.astype(y.dtype)


def _dora_use(
    base: Callable, branch: Callable, x: jax.Array, dropout: Dropout, scale: Callable, recompute: bool
) -> Any:
    """DoRA's use: ``g∘(x·W + s·(x·A)·B)``; with LoRA dropout PEFT's
    ``x·W + (g - 1)∘(drop(x)·W) + g∘s·(drop(x)·A)·B``, computed as ``(x·W - x̃·W) + g∘(x̃·W + s·(x̃·A)·B)``.

    Used for ``conv_general_dilated``, for a ``dot_general`` with dropout, on a quantized base or with
    ``recompute``; a plain ``dot_general`` use runs as one custom_vjp instead (:func:`_dora_pending`).
    The gradient of ``m`` needs the unscaled output ``u = x̃·W + s·(x̃·A)·B`` (``dm = Σ dy∘u / n``). With
    ``recompute`` the scaled sum runs under ``jax.checkpoint``: the backward pass recomputes ``u`` from ``x̃`` (one
    more base product) instead of keeping an activation-sized ``u`` per DoRA use, which keeps peak memory at
    LoRA's; else autodiff keeps ``u`` (faster, more memory).
    """
    xd = dropout(x)
    if recompute:
        scaled = jax.checkpoint(lambda x_: scale(base(x_) + branch(x_)))
        return scaled(x) if xd is x else Pending(base(x) - base(xd), scaled(xd))
    if xd is x:  # no dropout at this use
        return scale(base(x) + branch(x))
    base_d = base(xd)
    return Pending(base(x) - base_d, scale(base_d + branch(xd)))


def _dora_pending(
    x: jax.Array,
    xl: list[str],
    lk: LazyKernel,
    kl: list[str],
    out: str,
    params: dict[str, Any],
    kernel_rhs: bool,
    out_dtype: Any,
    contracted: list[int],
) -> _dora.DoraPending:
    """A DoRA ``dot_general`` use as one custom_vjp (:mod:`lora_jax.factored._dora`), run when its consumer is known."""
    xs, ks = "".join(xl), "".join(kl)
    kw = {"precision": params.get("precision"), "preferred_element_type": params.get("preferred_element_type")}
    first, second, ew = factor_stages(x.shape, x.dtype, xs, lk, ks, out, **kw)
    ew = ew if lk.a.shape[-1] <= _dora.EW_MAX_RANK else None

    def base_fn(x_: jax.Array, w_: jax.Array) -> jax.Array:
        return lax.dot_general_p.bind(*((x_, w_) if kernel_rhs else (w_, x_)), **params)

    def cast(f: Callable) -> Callable:
        return lambda t, a, b: f(t, a, b).astype(out_dtype)

    w, g_axes = lk.base(), {out.index(kl[k]) for k in lk.b_axes()}
    d_in = math.prod(lk.shape[k] for k in contracted)
    d_out = math.prod(n for k, n in enumerate(lk.shape) if lk.kinds[k] == "b")

    def run(bias: Any, recompute: bool) -> jax.Array:
        return _dora.dora_use(
            x, w, lk.a, lk.b, lk.g, bias, base_fn, first, cast(second), lambda y, g: times_g(y, out, lk, ks, g),
            recompute, None if ew is None else cast(ew),
        )  # fmt: skip

    shape = tuple(jax.eval_shape(base_fn, x, w).shape)
    return _dora.DoraPending(run, shape, g_axes, cheap=d_in <= d_out)


def dot_general(
    invals: list[Any], params: dict[str, Any], dropout: Dropout, dense: bool = False, recompute: bool = False
) -> Any:
    """``x·W + s·(x·A)·B`` for ``dot_general`` with the kernel on either side (``dense``: see ``_dense``)."""
    lhs, rhs = invals
    if isinstance(lhs, LazyKernel) and isinstance(rhs, LazyKernel):
        return None
    kernel_rhs = isinstance(rhs, LazyKernel)
    lk, x = (rhs, lhs) if kernel_rhs else (lhs, rhs)
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    (kc, xc), (kb, xb) = ((rc, lc), (rb, lb)) if kernel_rhs else ((lc, rc), (lb, rb))
    used: set[str] = set(RANK_LETTER)
    xl = _fresh(x.ndim, used)
    kl: list[str | None] = [None] * len(lk.shape)
    for i, k in zip(xc, kc, strict=True):
        kl[k] = xl[i]
    for i, k in zip(xb, kb, strict=True):
        kl[k] = xl[i]
    free = iter(_fresh(sum(v is None for v in kl), used))
    kl = [v if v is not None else next(free) for v in kl]
    batch = [xl[i] for i in xb]
    x_free = [c for i, c in enumerate(xl) if i not in xc and i not in xb]
    k_free = [c for k, c in enumerate(kl) if k not in kc and k not in kb]
    out = "".join(batch + (x_free + k_free if kernel_rhs else k_free + x_free))
    out_dtype = jax.eval_shape(
        lambda k: lax.dot_general_p.bind(*((x, k) if kernel_rhs else (k, x)), **params), _spec(lk)
    ).dtype

    def branch(x_: jax.Array, k: LazyKernel) -> jax.Array:
        kw = {"precision": params.get("precision"), "preferred_element_type": params.get("preferred_element_type")}
        return factored_product(x_, "".join(xl), k, "".join(kl), out, **kw).astype(out_dtype)

    if dense:
        return dense_use(lax.dot_general_p, params, x, lk, not kernel_rhs, branch)

    def bind(x_: jax.Array) -> jax.Array:
        return base_use(lax.dot_general_p, params, x_, lk, not kernel_rhs)

    if lk.g is not None:  # DoRA: g = m / n on the output axes
        ks, xs = "".join(kl), "".join(xl)
        gs = {kl[k] for k in lk.b_axes()}
        if gs <= set(out) and dropout(x) is x and not recompute and not lk.quantized:
            return _dora_pending(x, xl, lk, kl, out, params, kernel_rhs, out_dtype, list(kc))
        if gs <= set(out):
            return _dora_use(bind, lambda x_: branch(x_, lk), x, dropout, lambda y: times_g(y, out, lk, ks), recompute)
        if gs <= {xl[i] for i in xc} and dropout(x) is x:  # g on contracted axes (x @ E.T): scale x instead
            xg = times_g(x, xs, lk, ks)
            return Pending(bind(xg), branch(xg, lk))
        return None  # g runs over output axes that this use partly contracts
    return Pending(bind(x), branch(dropout(x), lk))


def conv_general_dilated(
    invals: list[Any], params: dict[str, Any], dropout: Dropout, dense: bool = False, recompute: bool = False
) -> Any:
    """A conv of ``x`` with A (``(*window, in) -> r``), then a 1x1 map ``r -> out`` with B."""
    x, lk = invals
    if isinstance(x, LazyKernel) or not isinstance(lk, LazyKernel):
        return None
    if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
        return None
    dn = params["dimension_numbers"]
    out_feat = dn.rhs_spec[0]
    if lk.kinds[out_feat] != "b" or any(c != "a" for k, c in enumerate(lk.kinds) if k != out_feat):
        return None
    out_dtype = jax.eval_shape(lambda k: lax.conv_general_dilated_p.bind(x, k, **params), _spec(lk)).dtype

    def branch(x_: jax.Array, k: LazyKernel) -> jax.Array:
        a_kernel = jnp.moveaxis(k.a.astype(k.dtype), -1, out_feat)
        t = lax.conv_general_dilated_p.bind(x_, a_kernel, **params)
        feat = dn.out_spec[1]
        t = jnp.moveaxis(t, feat, -1)
        b = (k.b * jnp.asarray(k.scale, k.b.dtype)).astype(t.dtype)
        y = jnp.moveaxis(jnp.einsum("...z,zo->...o", t, b, precision=params.get("precision")), -1, feat)
        return y.astype(out_dtype)

    if dense:
        return dense_use(lax.conv_general_dilated_p, params, x, lk, False, branch)

    def bind(x_: jax.Array) -> jax.Array:
        return base_use(lax.conv_general_dilated_p, params, x_, lk, False)

    if lk.g is not None:  # DoRA: g = m / n on the output feature axis
        feat = dn.out_spec[1]

        def scale(y: jax.Array) -> jax.Array:
            return y * jnp.expand_dims(lk.g.reshape(-1), [i for i in range(y.ndim) if i != feat]).astype(y.dtype)

        return _dora_use(bind, lambda x_: branch(x_, lk), x, dropout, scale, recompute)
    return Pending(bind(x), branch(dropout(x), lk))


def gather(invals: list[Any], params: dict[str, Any]) -> jax.Array | None:
    """Gather rows of W and of the factor that owns the indexed axes, then map through the rank axis."""
    lk, indices = invals
    if not isinstance(lk, LazyKernel) or isinstance(indices, LazyKernel):
        return None
    dn = params["dimension_numbers"]
    if dn.operand_batching_dims:
        return None
    slice_sizes = tuple(params["slice_sizes"])
    indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims)
    kinds = {lk.kinds[k] for k in indexed}
    if kinds not in ({"a"}, {"b"}):
        return None
    p_kind = kinds.pop()
    if any(slice_sizes[k] != n for k, n in enumerate(lk.shape) if k not in indexed):
        return None
    if lk.g is not None and p_kind != "a":  # DoRA's g on the indexed (output) axes: not followed
        return None
    base = lax.gather_p.bind(lk.base(), indices, **params)
    used: set[str] = set(RANK_LETTER)
    kl = _fresh(len(lk.shape), used)
    ks = "".join(kl)
    sa, sb = lk.letters(ks)
    ps, pv, qs, qv = (sa, lk.a, sb, lk.b) if p_kind == "a" else (sb, lk.b, sa, lk.a)
    p_kernel_axes = lk.a_axes() if p_kind == "a" else lk.b_axes()
    p_axis = {k: i for i, k in enumerate(p_kernel_axes)}
    if p_kind == "b":
        p_axis = {k: i + 1 for k, i in p_axis.items()}
    r_axis = pv.ndim - 1 if p_kind == "a" else 0
    p_sizes = [0] * pv.ndim
    for k, i in p_axis.items():
        p_sizes[i] = slice_sizes[k]
    p_sizes[r_axis] = pv.shape[r_axis]
    collapsed = tuple(sorted(p_axis[k] for k in dn.collapsed_slice_dims))
    n_out = base.ndim
    n_batch = n_out - len(dn.offset_dims)
    n_offset = pv.ndim - len(collapsed)
    p_dn = lax.GatherDimensionNumbers(
        offset_dims=tuple(range(n_batch, n_batch + n_offset)),
        collapsed_slice_dims=collapsed,
        start_index_map=tuple(p_axis[k] for k in dn.start_index_map),
        operand_batching_dims=(),
        start_indices_batching_dims=(),
    )
    t = lax.gather_p.bind(
        pv.astype(lk.dtype), indices, **{**params, "dimension_numbers": p_dn, "slice_sizes": tuple(p_sizes)}
    )
    batch_letters = _fresh(n_batch, used)
    kept_kernel = [kl[k] for k in range(len(kl)) if k not in dn.collapsed_slice_dims]
    out, bi, oi = [], iter(batch_letters), iter(kept_kernel)
    for d in range(n_out):
        out.append(next(oi) if d in dn.offset_dims else next(bi))
    p_letters = [c for i, c in enumerate(ps) if i not in collapsed]
    ts = "".join(batch_letters) + "".join(p_letters)
    known = "".join(c for c in out if c in ts or c in qs)
    y = jnp.einsum(f"{ts},{qs}->{known}", t, (qv * jnp.asarray(lk.scale, qv.dtype)).astype(t.dtype))
    if known != "".join(out):
        y = jnp.expand_dims(y, [i for i, c in enumerate(out) if c not in known])
        y = jnp.broadcast_to(y, base.shape)
    y = y.astype(base.dtype)
    if lk.g is not None:  # DoRA: the gathered rows scaled by g = m / n on the output axes
        return times_g(base + y, "".join(out), lk, ks)
    return Pending(base, y)
