"""How a traced value relates to a kernel's axes, for :func:`lora_jax.infer_axes`: views, resizes, reshapes."""

from __future__ import annotations

import math
from typing import NamedTuple

# An axis of a traced value is a tuple of units (kernel axis, size): () for an axis the kernel does not
# have (a broadcast), one unit for a kernel axis (or a piece of it), several for kernel axes merged by a reshape.
Unit = tuple[int, int]


class View(NamedTuple):
    """A traced value that is (a rearrangement of) kernel ``kid``."""

    kid: int
    axes: tuple[tuple[Unit, ...], ...]
    fixed: tuple[tuple[int, str], ...] = ()  # letters read on the way: ("b" for a scanned or indexed-away axis)


def resized(view: View, shape: tuple[int, ...]) -> View | None:
    """The view with axis sizes ``shape`` (after a slice or pad); None if a merged axis changed size."""
    axes = []
    for units, size in zip(view.axes, shape, strict=True):
        if len(units) > 1 and math.prod(s for _, s in units) != size:
            return None
        axes.append(((units[0][0], size),) if len(units) == 1 else units)
    return view._replace(axes=tuple(axes))


def reshaped(view: View, old: tuple[int, ...], new: tuple[int, ...]) -> View | None:
    """The view after ``reshape(old -> new)``; None when which kernel axes land where is ambiguous."""
    units: list[list] = []  # [kernel axis or None, size]
    for axis, size in zip(view.axes, old, strict=True):
        if not axis:
            units.append([None, size])
        elif len(axis) == 1:
            units.append([axis[0][0], size])
        else:
            units += [[k, s] for k, s in axis]
    axes: list[tuple[Unit, ...]] = []
    for size in new:
        got: list[Unit] = []
        prod = 1
        while units and (prod < size or units[0][1] == 1):
            k, u = units[0]
            if size % (prod * u) == 0:
                units.pop(0)
                prod *= u
                got.append((k, u))
            elif u % (size // prod) == 0 and size % prod == 0:  # split a kernel axis into pieces
                piece = size // prod
                units[0][1] = u // piece
                prod *= piece
                got.append((k, piece))
            else:
                return None
        if prod != size:
            return None
        axes.append(tuple((k, s) for k, s in got if k is not None))
    return view._replace(axes=tuple(axes)) if not units else None
