"""The lazy kernel: a targeted kernel ``W + scale * A @ B`` that is never summed.

:func:`lora_jax.factored` evaluates a model with every adapted kernel replaced
by a :class:`LazyKernel`. It carries the base value ``w`` (after the same
reshapes, transposes, casts and broadcasts the model applied to the kernel) and
the factors ``a`` and ``b``, kept in a canonical form so that each kernel axis
maps to factor axes without bookkeeping:

* every kernel axis has a *kind*: ``"a"`` (an axis of A only: an input axis),
  ``"b"`` (of B only: an output axis), ``"s"`` (shared by A and B: a stacked
  layer axis) or ``"n"`` (of neither: an axis the model broadcast the kernel
  along, or a size-1 axis it added);
* ``a`` has the kernel axes of kind ``"a"``/``"s"`` in kernel order, then the
  rank axis; ``b`` has the rank axis, then the kernel axes of kind
  ``"b"``/``"s"`` in kernel order.

A reshape that merges or splits axes is followed when each merged group lies
within one factor; anything else raises :class:`FactoredError`.

DoRA: ``g = m / n`` multiplies the output axes (the kernel is ``g ∘ (w + s·a⊗b)``).
``g`` is stored like ``b`` with a rank axis of size 1, so every layout
transform mirrors it exactly as it mirrors ``b``. ``n`` is computed by
:func:`dora_norm` from ``‖W‖²``, ``Wᵀ·A`` and ``(Aᵀ·A, B)``: ``W + s·A·B`` is not
formed.

A cast of the kernel to a narrower float dtype is deferred: ``w`` keeps its
stored dtype and ``cast`` records the dtype the model computes the kernel in
(:meth:`LazyKernel.base` applies it at each use, the factors are cast to it
there too). Keeping the stored ``w`` is what lets :func:`materialize` form
exactly the reference kernel, ``cast(round_w.dtype(W + s·A·B))``, when a later
operation (a cast back up, ``reduce_precision``) needs the rounded sum.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.adapters import _lowered
from lora_jax.factored._quantized import DeferredBase, dequantized
from lora_jax.targets import _layout

RANK_LETTER = "z"
LETTERS = string.ascii_letters.replace(RANK_LETTER, "")


class FactoredError(ValueError):
    """A targeted kernel reached an operation that cannot be factored."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LazyKernel:
    """A kernel value ``w + scale * (a ⊗ b)`` in canonical factor form (see module docstring)."""

    w: jax.Array
    a: jax.Array
    b: jax.Array
    kinds: tuple[str, ...] = dataclasses.field(metadata={"static": True})
    scale: float = dataclasses.field(metadata={"static": True})
    path: str = dataclasses.field(metadata={"static": True})
    cast: Any = dataclasses.field(default=None, metadata={"static": True})  # a narrower dtype, applied at use
    dropout: float = dataclasses.field(default=0.0, metadata={"static": True})  # the adapter's LoRA dropout rate
    g: jax.Array | None = None  # DoRA's m / n, shaped like b with a rank axis of size 1; None for plain LoRA

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)

    @property
    def dtype(self) -> Any:
        """The dtype the model sees: the last cast, else the stored dtype of ``w``."""
        return self.w.dtype if self.cast is None else jnp.dtype(self.cast)

    def base(self) -> jax.Array:
        """``w`` in the kernel's dtype (the deferred cast applied; a quantized ``w`` dequantized, no residual)."""
        w = dequantized(self.w)
        return w if self.cast is None else w.astype(self.cast)

    @property
    def quantized(self) -> bool:
        """Whether ``w`` is a quantized base (:class:`~lora_jax.factored._quantized.DeferredBase`)."""
        return isinstance(self.w, DeferredBase)

    def a_axes(self) -> list[int]:
        """Kernel axes carried by ``a`` (in ``a``'s order)."""
        return [k for k, c in enumerate(self.kinds) if c in "as"]

    def b_axes(self) -> list[int]:
        """Kernel axes carried by ``b`` (in ``b``'s order, after the rank axis)."""
        return [k for k, c in enumerate(self.kinds) if c in "bs"]

    def letters(self, kernel_letters: str) -> tuple[str, str]:
        """Einsum subscripts of ``a`` and ``b`` given one letter per kernel axis."""
        a = "".join(kernel_letters[k] for k in self.a_axes()) + RANK_LETTER
        b = RANK_LETTER + "".join(kernel_letters[k] for k in self.b_axes())
        return a, b

    def replace(self, **changes: Any) -> LazyKernel:
        return dataclasses.replace(self, **changes)


def from_weights(w: jax.Array, node: Any, path: str) -> LazyKernel:
    """The lazy kernel of base ``w`` and a lowered adapter ``node`` (a ``LowRank``)."""
    layout = node.layout
    kinds = tuple({"b": "s", "i": "a", "o": "b"}[c] for c in layout)
    batch, ins, outs = (_layout.axes_of(layout, c) for c in "bio")
    a_src = [*batch, *ins]
    a_perm = [a_src.index(k) for k in sorted(a_src)] + [len(a_src)]
    b_src = [*batch, None, *outs]
    b_perm = [b_src.index(None)] + [b_src.index(k) for k in sorted([*batch, *outs])]
    a = jnp.transpose(node.a, a_perm)
    b = jnp.transpose(node.b, b_perm)
    w = w if isinstance(w, DeferredBase) else jax.lax.stop_gradient(w)  # a quantized base: never differentiated
    lk = LazyKernel(w, a, b, kinds, float(node.scale), path, dropout=float(node.dropout))
    if getattr(node, "magnitude", None) is None:
        return lk
    m_src = [*batch, *outs]
    m = jnp.transpose(node.magnitude, [m_src.index(k) for k in sorted(m_src)])
    n = dora_norm(lk)
    g = _lowered.safe_divide(m.astype(n.dtype), n)
    return lk.replace(g=g[None])


def dora_norm(lk: LazyKernel) -> jax.Array:
    """DoRA's ``n = ‖w + s·a⊗b‖`` over the ``"a"`` axes, in ``b``'s axis order without the rank axis; no gradient.

    ``n² = ‖W‖² + 2s·Σ_r (Wᵀ·A)∘B + s²·Σ_{r,q} (Aᵀ·A)_{rq} B_r B_q``: the products are of sizes
    ``(r, *out)`` and ``(r, r)``, never the kernel's (the only kernel-sized work is reading ``W``).
    """
    dtype = _lowered.compute_dtype(lk.w.dtype)
    w = dequantized(lk.w, dtype)
    a, b = jax.lax.stop_gradient(lk.a).astype(dtype), jax.lax.stop_gradient(lk.b).astype(dtype)
    names = LETTERS[: len(lk.kinds)]
    sa, sb = lk.letters(names)
    outs = sb[1:]
    shared = "".join(names[k] for k, c in enumerate(lk.kinds) if c == "s")
    hi = jax.lax.Precision.HIGHEST
    w2 = jnp.einsum(f"{names},{names}->{outs}", w, w, precision=hi)  # ‖W‖², a contraction: no W²-sized value
    wa = jnp.einsum(f"{names},{sa}->{sb}", w, a, precision=hi)  # Wᵀ·A, (r, *out)
    cross = jnp.sum(wa * b, axis=0)
    q = "y" if "y" not in names else next(c for c in LETTERS if c not in names)
    sa_q = sa.replace(RANK_LETTER, q)
    gram = jnp.einsum(f"{sa},{sa_q}->{shared}{RANK_LETTER}{q}", a, a, precision=hi)  # Aᵀ·A, (*shared, r, r)
    quad = jnp.einsum(f"{shared}{RANK_LETTER}{q},{sb},{sb.replace(RANK_LETTER, q)}->{outs}", gram, b, b, precision=hi)
    s = jnp.asarray(lk.scale, dtype)
    n2 = w2 + 2 * s * cross + s * s * quad
    return jax.lax.stop_gradient(jnp.sqrt(jnp.maximum(n2, 0)))


def out_multiplier(lk: LazyKernel) -> jax.Array:
    """DoRA's ``g`` broadcastable against the kernel (size-1 axes where it has none)."""
    return jnp.expand_dims(lk.g[0], [k for k, c in enumerate(lk.kinds) if c not in "bs"])


def delta(lk: LazyKernel) -> jax.Array:
    """``scale * a ⊗ b`` in float32 (float64 for a float64 kernel), broadcast to the kernel's shape (materializes!)."""
    names = LETTERS[: len(lk.kinds)]
    sa, sb = lk.letters(names)
    kept = "".join(n for n, c in zip(names, lk.kinds, strict=True) if c != "n")
    d = _lowered.product(f"{sa},{sb}->{kept}", lk.a, lk.b, lk.w.dtype)
    d = jnp.expand_dims(d, [k for k, c in enumerate(lk.kinds) if c == "n"])
    return lk.scale * jnp.broadcast_to(d, lk.shape)


def materialize(lk: LazyKernel) -> jax.Array:
    """``w + delta`` added in float32 (float64 for a float64 kernel), cast to ``w.dtype`` once (as ``apply_lora``),
    then to the model's cast."""
    v = dequantized(lk.w, _lowered.compute_dtype(lk.w.dtype)) + delta(lk)
    if lk.g is not None:
        v = out_multiplier(lk).astype(v.dtype) * v
    return v.astype(lk.w.dtype).astype(lk.dtype)


# ---------------------------------------------------------------------------
# Structural transforms: each returns a new LazyKernel; ``w`` is transformed by
# the caller-supplied ``new_w`` (the original primitive applied to the base).


def transpose(lk: LazyKernel, perm: tuple[int, ...], new_w: jax.Array) -> LazyKernel:
    kinds = tuple(lk.kinds[p] for p in perm)
    a_pos = {k: i for i, k in enumerate(lk.a_axes())}
    b_pos = {k: i + 1 for i, k in enumerate(lk.b_axes())}
    a_perm = [a_pos[p] for p in perm if lk.kinds[p] in "as"] + [len(a_pos)]
    b_perm = [0] + [b_pos[p] for p in perm if lk.kinds[p] in "bs"]
    g = None if lk.g is None else jnp.transpose(lk.g, b_perm)
    return lk.replace(w=new_w, a=jnp.transpose(lk.a, a_perm), b=jnp.transpose(lk.b, b_perm), kinds=kinds, g=g)


def drop_axes(lk: LazyKernel, axes: list[int]) -> LazyKernel:
    """Remove size-1 kernel axes from the factors and the kinds (``w`` unchanged)."""
    a_pos = {k: i for i, k in enumerate(lk.a_axes())}
    b_pos = {k: i + 1 for i, k in enumerate(lk.b_axes())}
    a_drop = tuple(a_pos[k] for k in axes if k in a_pos)
    b_drop = tuple(b_pos[k] for k in axes if k in b_pos)
    kinds = tuple(c for k, c in enumerate(lk.kinds) if k not in set(axes))
    g = None if lk.g is None else jnp.squeeze(lk.g, b_drop)
    return lk.replace(a=jnp.squeeze(lk.a, a_drop), b=jnp.squeeze(lk.b, b_drop), kinds=kinds, g=g)


def to_broadcast_axis(lk: LazyKernel, k: int) -> LazyKernel:
    """Turn a size-1 kernel axis into a factor-free (``"n"``) axis."""
    dropped = drop_axes(lk, [k])
    return dropped.replace(kinds=(*dropped.kinds[:k], "n", *dropped.kinds[k:]))


def squeeze(lk: LazyKernel, dims: tuple[int, ...], new_w: jax.Array) -> LazyKernel:
    return drop_axes(lk, sorted(d % len(lk.kinds) for d in dims)).replace(w=new_w)


def broadcast_in_dim(lk: LazyKernel, shape: tuple[int, ...], dims: tuple[int, ...], new_w: jax.Array) -> LazyKernel:
    for k, d in enumerate(dims):
        if lk.shape[k] == 1 and shape[d] != 1 and lk.kinds[k] != "n":
            lk = to_broadcast_axis(lk, k)
    kinds = ["n"] * len(shape)
    for k, d in enumerate(dims):
        kinds[d] = lk.kinds[k]
    return lk.replace(w=new_w, kinds=tuple(kinds))


def _groups(old: list[int], new: list[int]) -> list[tuple[int, int, int, int]] | None:
    """Contiguous groups ``(i0, i1, j0, j1)`` with equal size products, or None."""
    out, i, j = [], 0, 0
    while i < len(old) and j < len(new):
        i0, j0, po, pn = i, j, old[i], new[j]
        i, j = i + 1, j + 1
        while po != pn:
            if po < pn:
                if i == len(old):
                    return None
                po, i = po * old[i], i + 1
            else:
                if j == len(new):
                    return None
                pn, j = pn * new[j], j + 1
        out.append((i0, i, j0, j))
    return out if i == len(old) and j == len(new) else None


def reshape(lk: LazyKernel, new_sizes: tuple[int, ...], new_w: jax.Array, primitive: str) -> LazyKernel:
    """Follow a reshape when every merged/split group of axes lies within one factor."""
    old = [n for n in lk.shape if n != 1]
    lk = drop_axes(lk, [k for k, n in enumerate(lk.shape) if n == 1])
    new_big = [n for n in new_sizes if n != 1]
    groups = _groups(old, new_big)
    if groups is None:
        raise _reshape_error(lk, old, new_sizes, primitive)
    kinds_big: list[str] = []
    a_shape: list[int] = []
    b_shape: list[int] = []
    for i0, i1, j0, j1 in groups:
        group = set(lk.kinds[i0:i1])
        if i1 - i0 == 1 and j1 - j0 == 1:
            kind = lk.kinds[i0]
        elif len(group) == 1 and group <= {"a", "b", "s"} and not (group == {"s"} and j1 - j0 != i1 - i0):
            kind = group.pop()
        else:
            raise _reshape_error(lk, old, new_sizes, primitive)
        kinds_big += [kind] * (j1 - j0)
        if kind in "as":
            a_shape += new_big[j0:j1]
        if kind in "bs":
            b_shape += new_big[j0:j1]
    a = lk.a.reshape((*a_shape, lk.a.shape[-1]))
    b = lk.b.reshape((lk.b.shape[0], *b_shape))
    g = None if lk.g is None else lk.g.reshape((1, *b_shape))
    it = iter(kinds_big)
    kinds = tuple("n" if n == 1 else next(it) for n in new_sizes)
    return lk.replace(w=new_w, a=a, b=b, kinds=kinds, g=g)


def _reshape_error(lk: LazyKernel, old: Any, new_sizes: tuple[int, ...], primitive: str) -> FactoredError:
    return FactoredError(
        f"{lk.path}: factored() cannot follow `{primitive}` of the kernel from shape {tuple(old)} to "
        f"{tuple(new_sizes)}: it mixes input and output axes (axis kinds {''.join(lk.kinds)}; "
        f"a = input, b = output, s = stacked, n = broadcast). Expected a reshape that merges or splits "
        f"axes within the input axes or within the output axes. Pass factored(fn, materialize=[{lk.path!r}]) "
        f"to form W + BA for this leaf only."
    )


def slice_axes(lk: LazyKernel, starts: list[Any], sizes: list[int], new_w: jax.Array) -> LazyKernel:
    """Slice kernel axis ``k`` to ``[starts[k], starts[k] + sizes[k])`` in the factors too."""
    a, b, g = lk.a, lk.b, lk.g
    a_pos = {k: i for i, k in enumerate(lk.a_axes())}
    b_pos = {k: i + 1 for i, k in enumerate(lk.b_axes())}
    for k, (start, size) in enumerate(zip(starts, sizes, strict=True)):
        if size == lk.shape[k]:
            continue
        if k in a_pos:
            a = jax.lax.dynamic_slice_in_dim(a, start, size, a_pos[k])
        if k in b_pos:
            b = jax.lax.dynamic_slice_in_dim(b, start, size, b_pos[k])
            if g is not None:
                g = jax.lax.dynamic_slice_in_dim(g, start, size, b_pos[k])
    return lk.replace(w=new_w, a=a, b=b, g=g)
