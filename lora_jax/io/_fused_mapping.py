"""``fused_key_mapping``: a loader's fusing step (several torch weights stacked into one kernel) as key-mapping data.

Some loaders build one JAX kernel from several torch tensors in code (tunix's Gemma stacks ``k_proj`` and
``v_proj`` into ``kv_einsum.w``), so their key mapping names temporary keys instead of the kernel. This rewrites
those entries as component entries ``kernel[c]`` (with the loader's transpose as a third transform element),
which :func:`lora_jax.io._key_mapping.resolve` reads like any other entry.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from lora_jax.errors._messages import expected
from lora_jax.io._key_mapping import _HINT, _check_mapping


def fused_key_mapping(key_mapping: Any, fused: Mapping[str, tuple[Any, Any]]) -> dict[str, tuple[str, Any]]:
    r"""A key mapping with the loader's fusing step written in, for :func:`lora_jax.export_peft`.

    Some loaders map torch weights to temporary keys and then, in code, stack (and transpose) them into one
    kernel. tunix's Gemma maps ``k_proj`` and ``v_proj`` to ``tmp.layers.N.attn.k`` / ``.v`` ``(D, K, H)``, then
    sets ``kv_einsum.w = stack([k.transpose(1, 0, 2), v.transpose(1, 0, 2)])`` ``(2, K, D, H)``. ``fused`` says
    that as data, ``{kernel jax key: (source jax keys, permute)}``: each source's entry gets the jax key
    ``kernel[c]`` (``c`` its place in the list: component ``c`` of the kernel's first axis; a single string
    instead of a list: the whole kernel, renamed) and ``permute`` as its transform's third element (the
    transpose after the reshape; None: none).

    For tunix's Gemma (``gemma.params_safetensors._get_key_and_transform_mapping(config)``)::

        fused_key_mapping(mapping, {
            r"layers.\1.attn.q_einsum.w": (r"tmp.layers.\1.attn.q", (1, 0, 2)),
            r"layers.\1.attn.kv_einsum.w": ([r"tmp.layers.\1.attn.k", r"tmp.layers.\1.attn.v"], (1, 0, 2)),
        })

    and with ``num_heads == num_kv_heads``, one ``qkv_einsum.w`` from ``[q, k, v]`` (the same permute).

    Args:
      key_mapping: the loader's ``{hf_key_regex: (jax_key, transform)}``.
      fused: ``{kernel jax key template: (source jax key template or a list of them, permute or None)}``; the
        sources are jax keys of ``key_mapping``'s entries, written as there.

    Returns:
      A new mapping: the sources' entries rewritten, every other entry as it was.

    Raises:
      TypeError: ``key_mapping`` or ``fused`` is not such a dict.
      ValueError: a source is no entry's jax key, or is named twice, or its entry has a transform of three
        elements already.

    Example:
      >>> mapping = {
      ...     r"model\.k_proj\.weight": (r"tmp.k", ((1, 0), (4, 2, 3))),
      ...     r"model\.v_proj\.weight": (r"tmp.v", ((1, 0), (4, 2, 3))),
      ... }
      >>> out = fused_key_mapping(mapping, {r"kv_einsum.w": ([r"tmp.k", r"tmp.v"], (1, 0, 2))})
      >>> out[r"model\.v_proj\.weight"]
      ('kv_einsum.w[1]', ((1, 0), (4, 2, 3), (1, 0, 2)))
    """
    where = "fused_key_mapping"
    mapping = _check_mapping(key_mapping, f"{where}(key_mapping=...)")
    if not isinstance(fused, Mapping) or not fused:
        raise TypeError(
            expected(
                f"{where}(fused=...)",
                "a non-empty dict {kernel_jax_key: (source jax key or [source jax keys], permute or None)}",
                fused,
                r"e.g. {r'layers.\1.attn.kv_einsum.w': ([r'tmp.layers.\1.attn.k', r'tmp.layers.\1.attn.v'], (1, 0, 2))}",
            )
        )
    by_template: dict[str, list[str]] = {}
    for hf, (jax_key, _) in mapping.items():
        by_template.setdefault(jax_key, []).append(hf)
    out, used = dict(mapping), {}
    for kernel, value in fused.items():
        at = f"{where}(fused=...) at {kernel!r}"
        ok = isinstance(kernel, str) and isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
        if not ok:
            raise TypeError(
                expected(at, "a value (source jax key or [source jax keys], permute or None)", value, _HINT)
            )
        sources, permute = value
        single = isinstance(sources, str)
        sources = [sources] if single else list(sources)
        if not sources or not all(isinstance(x, str) for x in sources):
            raise TypeError(expected(at, "a source jax key or a non-empty list of them", value[0], _HINT))
        if permute is not None and not (isinstance(permute, Sequence) and sorted(permute) == list(range(len(permute)))):
            raise ValueError(expected(at, "a permute (a tuple of the axes 0..n-1) or None", permute, _HINT))
        for c, source in enumerate(sources):
            if source in used:
                raise ValueError(f"{at}: the source {source!r} is already a source of {used[source]!r}.")
            used[source] = kernel
            hfs = by_template.get(source, [])
            if len(hfs) != 1:
                near = difflib.get_close_matches(source, list(by_template), n=3, cutoff=0.0)
                raise ValueError(
                    expected(
                        at,
                        f"one entry of key_mapping whose jax key is {source!r} (nearest: {', '.join(near)})",
                        f"{len(hfs)} entries",
                        "name the sources as the loader's mapping writes its jax keys, with the same \\1 groups",
                        found_is_text=True,
                    )
                )
            transform = mapping[hfs[0]][1]
            parts = (None, None) if transform is None else tuple(transform)
            if len(parts) != 2:
                raise ValueError(
                    expected(at, f"the entry of {source!r} with a transform (permute, reshape)", transform, _HINT)
                )
            name = kernel if single else f"{kernel}[{c}]"
            out[hfs[0]] = (name, (*parts, None if permute is None else tuple(int(k) for k in permute)))
    return out
