"""``import_peft(key_mapping=...)``: a PEFT adapter for the Hugging Face model, read for the JAX model it loads into.

The inverse of :class:`lora_jax.io._key_mapping.HfTarget`: which kernel each PEFT module adapts (the mapping's
jax key), and A, B and DoRA's ``m`` moved from the torch weight's element order back to the kernel's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lora_jax.io._key_mapping import HfTarget, _check_mapping, _hf_keys, _split_component, _template_regex, resolve
from lora_jax.io._peft_names import EMBED_A
from lora_jax.targets._select import _first


def mapped_targets(
    key_mapping: Any, flat: Mapping[str, Any], axes: Any, lora_parts: Mapping[str, Any], full_parts: Mapping[str, Any]
) -> dict[str, HfTarget]:
    """``{path: HfTarget}`` for every parameter whose mapped torch module is in the file.

    Raises:
      ValueError: a multi-axis kernel the file adapts has no layout in ``axes`` (which of its axes are inputs is
        not in the mapping), or the mapping cannot be inverted for it (see :func:`resolve`).
    """
    mapping = _check_mapping(key_mapping)
    templates = [_template_regex(_split_component(t)[0]) for t, _ in mapping.values()]
    out = {}
    for p, leaf in flat.items():
        shape = tuple(leaf.shape)
        dotted = p.replace("/", ".")
        if not any(t.fullmatch(dotted) for t in templates):
            continue  # the mapping does not load this parameter from the checkpoint
        entries = _hf_keys(p, mapping)
        modules = [key[: -len(".weight")] for key, *_ in entries if key.endswith(".weight")]
        present = [m for m in modules if m in lora_parts or m in full_parts]
        if not present:
            continue
        if len(entries) > 1:  # a fused kernel: one torch module per component
            raise ValueError(
                f"{p}: the PEFT adapter adapts {', '.join(present)}, components of this fused kernel {shape}; "
                f"import_peft(key_mapping=...) reads one torch module per kernel, and combining per-component "
                f"modules into one fused adapter is not supported. Read it without the fused entries (name_map=) "
                f"or adapt the components as separate kernels."
            )
        module = present[0]
        if len(shape) == 1:
            (out[p],) = resolve(mapping, {p: (shape, "o", None)})[p]
            continue
        layout = _first(axes, p, "io" if len(shape) == 2 else None)
        if layout is None:
            raise ValueError(
                f"{p}: the PEFT adapter adapts {module!r}, this {len(shape)}-axis kernel {shape}; which of its axes "
                f"are inputs is not in the key mapping. Pass its layout, e.g. import_peft(..., axes={{{p!r}: 'ioo'}})."
            )
        kind = ("embed" if EMBED_A in lora_parts[module] else "linear") if module in lora_parts else None
        (out[p],) = resolve(mapping, {p: (shape, layout, kind)})[p]
    return out


def from_torch_order(target: HfTarget, a: np.ndarray, b: np.ndarray, kind: str, m: np.ndarray | None) -> tuple:
    """A ``(*in, r)``, B ``(r, *out)`` and ``m`` read as if C-ordered, moved to the kernel's element order.

    >>> t = HfTarget("m", "m.weight", False, np.array([1, 0]), np.array([0]), np.zeros((1, 2), int))
    >>> from_torch_order(t, np.array([[2.0], [1.0]]), np.array([[3.0]]), "linear", None)[0].ravel().tolist()
    [1.0, 2.0]
    """
    r = a.shape[-1]
    a = a.reshape(-1, r)[np.argsort(target.in_order)].reshape(a.shape)
    b = b.reshape(r, -1)[:, np.argsort(target.out_order)].reshape(b.shape)
    if m is not None:
        m = m.reshape(-1)[np.argsort(target.out_order)].reshape(m.shape)
    return a, b, kind, m


def kernel_from_torch(target: HfTarget, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A torch weight trained in full (``modules_to_save``) as the kernel of ``shape``."""
    if value.size != int(np.prod(shape)):
        raise ValueError(
            f"{target.module}: the PEFT file's weight has shape {tuple(value.shape)}, which does not fit the kernel "
            f"{shape} the key mapping loads it into."
        )
    flat = np.empty(value.size, value.dtype)
    flat[target.gather.reshape(-1)] = value.reshape(-1)
    return flat.reshape(shape)
