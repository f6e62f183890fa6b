"""qwix's LoRA factor shapes for a kernel, and the exact reshapes between them and lora_jax's.

qwix (``qwix.LoraProvider``) makes a pair ``<weight>_lora_a`` / ``<weight>_lora_b``
next to each weight, shaped by the op that uses it (``qwix/_src/providers/lora.py``):

* ``dot_general`` (``nnx.Linear``, ``nnx.LinearGeneral``): A ``(*batch, prod(contract), r)``,
  B ``(*batch, r, prod(remain))``: the input and output axes flattened, the batch
  axes on both, as lora_jax's ``"b"`` axes;
* ``einsum`` (``nnx.Einsum``) and ``conv_general_dilated``: A ``(*shared, r)`` over
  the kernel axes the activations also carry (contracting and batch axes, in the
  kernel's order), B ``(r, *remaining)``: a batch axis is on A only, B is shared
  across it.

lora_jax stores A ``(*batch, *in, r)`` and B ``(*batch, r, *out)`` for a kernel
layout (:mod:`lora_jax.targets._layout`). Both directions are reshapes and
transposes, exact for any values, except lora_jax -> qwix's einsum form for a
layout with ``"b"`` axes, which needs B equal across them. The dot_general form
assumes the contracting axes are used in the kernel's order (as every flax layer
does).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp

from lora_jax.errors._messages import expected
from lora_jax.targets import _layout

DOT, EINSUM = "dot_general", "einsum"


def qwix_shapes(layout: str, shape: tuple[int, ...], rank: int) -> dict[str, tuple[tuple, tuple]]:
    """The ``(A, B)`` shapes qwix gives a kernel of this layout and shape, per form.

    >>> qwix_shapes("ioo", (6, 2, 3), 4)
    {'dot_general': ((6, 4), (4, 6)), 'einsum': ((6, 4), (4, 2, 3))}
    """
    batch = _layout.dims_of(layout, shape, "b")
    ins, outs = _layout.dims_of(layout, shape, "i"), _layout.dims_of(layout, shape, "o")
    shared = tuple(s for s, c in zip(shape, layout, strict=True) if c != "o")
    return {
        DOT: ((*batch, math.prod(ins), rank), (*batch, rank, math.prod(outs))),
        EINSUM: ((*shared, rank), (rank, *outs)),
    }


def _same_in_both(layout: str) -> bool:
    """The two forms hold the same arrays: no batch axis, one input and one output axis."""
    return "b" not in layout and layout.count("i") == 1 and layout.count("o") == 1


def form_of(path: str, layout: str, shape: tuple[int, ...], a_shape: tuple, b_shape: tuple) -> str | None:
    """Which qwix form the factor shapes are for this kernel layout: ``"dot_general"``, ``"einsum"`` or None.

    Raises:
      ValueError: when both forms fit with different meanings (batch axes whose size equals the rank).

    >>> form_of("k", "iio", (2, 3, 6), (2, 3, 4), (4, 6)), form_of("k", "iio", (2, 3, 6), (6, 4), (4, 6))
    ('einsum', 'dot_general')
    """
    if len(a_shape) < 2 or len(b_shape) < 2:
        return None
    fits = [f for f, (sa, sb) in qwix_shapes(layout, shape, a_shape[-1]).items() if (sa, sb) == (a_shape, b_shape)]
    if len(fits) == 2 and not _same_in_both(layout):
        raise ValueError(
            expected(
                f"{path}: qwix LoRA A {a_shape} and B {b_shape} for the kernel {shape} with layout {layout!r}",
                "shapes that tell qwix's dot_general form from its einsum form",
                "shapes that fit both, with different meanings",
                "qwix's dot_general form carries the batch axes on B too, its einsum form on A only; for an "
                "einsum, give the layout with 'i' in place of 'b' (the same update)",
                found_is_text=True,
            )
        )
    return fits[0] if fits else None


def layouts_fitting(shape: tuple[int, ...], a_shape: tuple, b_shape: tuple) -> list[str]:
    """Every layout of the kernel that qwix's A and B fit.

    An einsum batch axis is on A only, so it reads as ``"i"`` (the same update);
    ``"b"`` axes are read where both factors carry them (the dot_general form).

    >>> layouts_fitting((6, 2, 3), (6, 4), (4, 2, 3)), layouts_fitting((2, 3, 6), (2, 3, 4), (4, 6))
    (['ioo'], ['iio'])
    >>> layouts_fitting((2, 4, 5), (2, 4, 3), (2, 3, 5))  # nnx.LinearGeneral(4, 5, batch_axis={0: 2})
    ['bio']
    """
    out = []
    for letters in itertools.product("bio", repeat=len(shape)):
        layout = "".join(letters)
        if "i" not in layout or "o" not in layout:
            continue
        try:
            form = form_of("", layout, shape, a_shape, b_shape)
        except ValueError:  # both forms fit: the layout fits, the form is ambiguous (raised again when converting)
            form = DOT
        if form == DOT or (form == EINSUM and "b" not in layout):
            out.append(layout)
    return out


def _einsum_perm(layout: str) -> list[int]:
    """Axes of qwix's einsum A, reordered to lora_jax's ``(*batch, *in, r)``."""
    shared = [c for c in layout if c != "o"]
    batch = [k for k, c in enumerate(shared) if c == "b"]
    ins = [k for k, c in enumerate(shared) if c == "i"]
    return [*batch, *ins, len(shared)]


def from_qwix_factors(form: str, layout: str, shape: tuple[int, ...], qa: jax.Array, qb: jax.Array) -> tuple:
    """lora_jax's ``(a, b)`` from qwix's A and B (of the given form); exact.

    >>> a, b = from_qwix_factors("dot_general", "ioo", (6, 2, 3), jnp.ones((6, 4)), jnp.ones((4, 6)))
    >>> a.shape, b.shape
    ((6, 4), (4, 2, 3))
    """
    rank = qa.shape[-1]
    batch = _layout.dims_of(layout, shape, "b")
    ins, outs = _layout.dims_of(layout, shape, "i"), _layout.dims_of(layout, shape, "o")
    if form == DOT:
        return jnp.reshape(qa, (*batch, *ins, rank)), jnp.reshape(qb, (*batch, rank, *outs))
    a = jnp.transpose(qa, _einsum_perm(layout))
    return a, jnp.broadcast_to(qb, (*batch, rank, *outs))


def to_qwix_factors(path: str, form: str, layout: str, a: jax.Array, b: jax.Array) -> tuple:
    """qwix's ``(A, B)`` in the given form from lora_jax's ``a`` and ``b``; exact.

    Raises:
      ValueError: for the einsum form of a layout with ``"b"`` axes when ``b``
        differs across them (qwix's einsum LoRA shares B across batch axes).

    >>> qa, qb = to_qwix_factors("k", "einsum", "iio", jnp.ones((2, 3, 4)), jnp.ones((4, 6)))
    >>> qa.shape, qb.shape
    ((2, 3, 4), (4, 6))
    """
    nb, rank = layout.count("b"), a.shape[-1]
    if form == DOT:
        batch = a.shape[:nb]
        return jnp.reshape(a, (*batch, -1, rank)), jnp.reshape(b, (*batch, rank, -1))
    perm = _einsum_perm(layout)
    qa = jnp.transpose(a, sorted(range(len(perm)), key=perm.__getitem__))
    first = b[(0,) * nb]
    if nb and not bool(jnp.all(b == first)):
        raise ValueError(
            expected(
                f"{path}: lora_jax B of shape {tuple(b.shape)} (layout {layout!r})",
                "the same B for every index of the 'b' axes: qwix's einsum LoRA has one B shared across "
                "the batch axes, its A carries them",
                "a B that differs across them",
                "qwix cannot hold this adapter exactly; train it with B tied across the batch axes",
                found_is_text=True,
            )
        )
    return qa, first
