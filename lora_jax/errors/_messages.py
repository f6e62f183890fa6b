"""One shape for every bad-input message: where, what was expected, what was found, and the fix.

Every public function validates its inputs where they enter (spec
construction, file reading, the first lines of a public function), never in a
node's ``__post_init__`` (JAX rebuilds nodes holding tracers, ``None`` or
sharding placeholders), and raises with :func:`expected`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def describe(value: Any) -> str:
    """A short description of a found value: its type, and its shape and dtype for an array."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"{type(value).__name__} of shape {tuple(shape)} and dtype {dtype}"
    if isinstance(value, Mapping) and len(repr(value)) > 60:  # a big tree: its keys, not every array's repr
        keys = list(value)
        shown = ", ".join(repr(k) for k in keys[:4]) + (", ..." if len(keys) > 4 else "")
        return f"{type(value).__name__} with keys {shown}" if keys else f"empty {type(value).__name__}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def expected(where: str, what: str, found: Any, hint: str = "", *, found_is_text: bool = False) -> str:
    """``"WHERE: expected WHAT, found FOUND. HINT"``: the message of every bad-input error.

    Args:
      where: the argument or parameter path, e.g. ``"LoraSpec(rslora=...)"`` or ``"dense/kernel"``.
      what: what was expected.
      found: the value found (described with :func:`describe`), or a description of it with ``found_is_text``.
      hint: how to fix it.
      found_is_text: ``found`` is already a description.

    Example:
      >>> expected("LoraSpec(rslora=...)", "True or False", "false", "write rslora=False")
      "LoraSpec(rslora=...): expected True or False, found str 'false'. write rslora=False."
    """
    shown = found if found_is_text else describe(found)
    message = f"{where}: expected {what}, found {shown}."
    if hint:
        message += f" {hint.rstrip('.')}."
    return message
