"""Kernel layouts: which axes of a kernel are input, output or stacked-layer axes.

A layout is a string with one letter per kernel axis:

* ``"i"`` an input (contracting) axis, covered by A;
* ``"o"`` an output axis, covered by B;
* ``"b"`` a batch axis (the layer axis of ``nn.scan``/vmap-stacked layers),
  carried by both A and B.

Examples: a ``Dense`` kernel ``(in, out)`` is ``"io"``; a linen ``Conv`` kernel
``(kh, kw, in, out)`` is ``"iiio"`` (A over ``(kh, kw, in)``, B over ``out``,
as PEFT's Conv2d LoRA); an attention query ``DenseGeneral`` kernel
``(d_model, heads, head_dim)`` is ``"ioo"``; the output projection
``(heads, head_dim, d_model)`` is ``"iio"``; a scanned Dense kernel
``(layers, in, out)`` is ``"bio"``. A is stored as ``(*batch, *in, r)`` and B as
``(*batch, r, *out)``, so flattening the input and output axes gives PEFT's 2-D
view ``lora_A: (r, in)``, ``lora_B: (out, r)`` (transposed).
"""

from __future__ import annotations

import math
import string

LAYOUT_LETTERS = frozenset("bio")


def check_layout(layout: str, shape: tuple[int, ...], path: str) -> None:
    """Raise ``ValueError`` unless ``layout`` is a valid layout for ``shape``."""
    if not isinstance(layout, str) or set(layout) - LAYOUT_LETTERS:
        raise ValueError(
            f"{path}: kernel layout {layout!r} is not valid; expected a string of the letters "
            f"'b' (stacked-layer axis), 'i' (input axis) and 'o' (output axis), one per kernel axis, "
            f"e.g. 'io' for Dense, 'iiio' for Conv2D, 'ioo' for a (d_model, heads, head_dim) projection."
        )
    if len(layout) != len(shape):
        raise ValueError(
            f"{path}: kernel layout {layout!r} has {len(layout)} letters but the kernel has shape "
            f"{tuple(shape)} ({len(shape)} axes); give one letter per axis in LoraSpec(axes=...)."
        )
    if "i" not in layout or "o" not in layout:
        raise ValueError(f"{path}: kernel layout {layout!r} needs at least one input axis 'i' and one output axis 'o'.")


def axes_of(layout: str, letter: str) -> tuple[int, ...]:
    """The kernel axes that carry ``letter`` in ``layout``."""
    return tuple(k for k, c in enumerate(layout) if c == letter)


def dims_of(layout: str, shape: tuple[int, ...], letter: str) -> tuple[int, ...]:
    """The sizes of the kernel axes that carry ``letter``."""
    return tuple(shape[k] for k in axes_of(layout, letter))


def fan_in(layout: str, shape: tuple[int, ...]) -> int:
    """Product of the input-axis sizes (PEFT's ``in_features``)."""
    return math.prod(dims_of(layout, shape, "i"))


def fan_out(layout: str, shape: tuple[int, ...]) -> int:
    """Product of the output-axis sizes (PEFT's ``out_features``)."""
    return math.prod(dims_of(layout, shape, "o"))


def max_rank(layout: str, shape: tuple[int, ...]) -> int:
    """The largest useful rank: ``min(fan_in, fan_out)``."""
    return min(fan_in(layout, shape), fan_out(layout, shape))


def a_shape(layout: str, shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """Shape of A: ``(*batch, *in, rank)``."""
    return (*dims_of(layout, shape, "b"), *dims_of(layout, shape, "i"), rank)


def b_shape(layout: str, shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """Shape of B: ``(*batch, rank, *out)``."""
    return (*dims_of(layout, shape, "b"), rank, *dims_of(layout, shape, "o"))


def kernel_shape(layout: str, a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """The kernel shape implied by A's and B's shapes (inverse of ``a_shape``/``b_shape``)."""
    nb, ni = layout.count("b"), layout.count("i")
    batch, ins, outs = list(a[:nb]), list(a[nb : nb + ni]), list(b[nb + 1 :])
    out = []
    for c in layout:
        out.append({"b": batch, "i": ins, "o": outs}[c].pop(0))
    return tuple(out)


def delta_equation(layout: str) -> str:
    """The einsum equation ``A, B -> delta`` that puts delta in the kernel's axis order."""
    letters = iter(string.ascii_letters.replace("z", ""))
    names = [next(letters) for _ in layout]
    batch = "".join(n for n, c in zip(names, layout, strict=True) if c == "b")
    ins = "".join(n for n, c in zip(names, layout, strict=True) if c == "i")
    outs = "".join(n for n, c in zip(names, layout, strict=True) if c == "o")
    return f"{batch}{ins}z,{batch}z{outs}->{''.join(names)}"
