"""PEFT names: pytree paths <-> torch module names, and PEFT's key formats.

The default ``name_map`` drops the leaf key (``kernel``, ``embedding``,
``bias``, ...) and joins the remaining keys with ``"."``:
``"encoder/layers/0/attn/q_proj/kernel"`` -> ``"encoder.layers.0.attn.q_proj"``
(nnx lists give numeric keys, which is how torch ``ModuleList`` names read).
A dict maps a leaf path or its module path to a module name; a callable gets
the leaf path. For a kernel with stacked-layer axes (layout ``"b..."``) the
name must place the layer index: ``"layers.{i}.attn.q_proj"`` (``{i}``,
``{j}``, ``{k}`` for the first, second, third stacked axis).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Mapping
from typing import Any, Union

NameMap = Union[Callable[[str], str], Mapping[str, str], None]

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's two files
LORA_A, LORA_B = "lora_A.weight", "lora_B.weight"
EMBED_A, EMBED_B = "lora_embedding_A", "lora_embedding_B"
MAGNITUDE = "lora_magnitude_vector"  # DoRA's m: (out,) for Linear/Embedding, (1, out, 1, ...) for ConvNd
LORA_PARTS = (LORA_A, LORA_B, EMBED_A, EMBED_B, MAGNITUDE)
INDEX_FIELDS = ("i", "j", "k")


def default_name_map(path: str) -> str:
    """The torch module name of a parameter path: drop the leaf key, join with ``"."``.

    Example:
      >>> default_name_map("encoder/layers/0/attn/q_proj/kernel")
      'encoder.layers.0.attn.q_proj'
    """
    if not isinstance(path, str):
        from lora_jax.errors._messages import expected

        raise TypeError(
            expected("default_name_map(path=...)", "a parameter path such as 'encoder/layers/0/q_proj/kernel'", path)
        )
    module = path.rpartition("/")[0]
    if not module:
        raise ValueError(
            f"{path}: a top-level leaf has no module name under the default name_map; pass "
            f"name_map={{{path!r}: 'torch.module.name'}}."
        )
    return module.replace("/", ".")


def module_name(name_map: NameMap, path: str) -> str:
    """The torch module name of the leaf at ``path`` under ``name_map``."""
    if name_map is None:
        return default_name_map(path)
    if isinstance(name_map, Mapping):
        module = path.rpartition("/")[0]
        for key in (path, module):
            if key in name_map:
                return _check_name(name_map[key], path)
        raise ValueError(
            f"{path}: name_map has no entry for this path or its module path {module!r}; add "
            f"name_map[{module!r}] = 'torch.module.name' (keys seen: {', '.join(list(name_map)[:5])})."
        )
    if callable(name_map):
        return _check_name(name_map(path), path)
    from lora_jax.errors._messages import expected

    raise TypeError(
        expected("name_map", "None, a dict {parameter path: torch module name} or a callable path -> name", name_map)
    )


def _check_name(name: Any, path: str) -> str:
    if not isinstance(name, str) or not name or name.startswith(".") or name.endswith("."):
        raise ValueError(f"{path}: name_map gave {name!r}; expected a torch module name such as 'layers.0.q_proj'.")
    return name


def index_fields(name: str) -> set[str]:
    """The format fields (``{i}``, ``{j}``, ...) in a module name template."""
    return {f for _, f, _, _ in string.Formatter().parse(name) if f is not None}


def expand(name: str, path: str, layout: str, batch: tuple[int, ...]) -> dict[tuple[int, ...], str]:
    """One module name per stacked-layer index: ``{(i,): "layers.i.q"}``; ``{(): name}`` without stacking."""
    n = layout.count("b")
    want = set(INDEX_FIELDS[:n])
    try:
        fields = index_fields(name)
    except ValueError as e:
        raise ValueError(f"{path}: name_map gave {name!r}, not a valid name template ({e}).") from None
    if fields != want:
        if n:
            raise ValueError(
                f"{path}: this kernel has {n} stacked-layer axis(es) (layout {layout!r}, {batch}) and PEFT stores "
                f"one module per layer, so its name must place the layer index as "
                f"{', '.join('{' + f + '}' for f in sorted(want))}; name_map gave {name!r}. For example "
                f"name_map={{{path!r}: 'model.layers.{{i}}.self_attn.q_proj'}}."
            )
        raise ValueError(f"{path}: name_map gave {name!r}, which has format fields {sorted(fields)}; "
                         f"only kernels with stacked-layer axes take {{i}}.")  # fmt: skip
    import numpy as np

    return {idx: name.format(**dict(zip(INDEX_FIELDS, idx, strict=False))) for idx in np.ndindex(*batch)}


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The first ``rank_pattern``/``alpha_pattern`` key that PEFT matches to ``module``.

    PEFT matches a key as the regex ``(.*\\.)?(key)$`` against the module name.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def export_pattern_key(name: str, names: list[str]) -> str:
    """A PEFT pattern key that selects module ``name`` and none of the other ``names``.

    The plain name (PEFT's own style) when it is unambiguous, else the name
    anchored with ``^`` so PEFT's suffix rule cannot pick another module.

    Example:
      >>> export_pattern_key("fc1", ["fc1", "block.fc1"])
      '^fc1'
      >>> export_pattern_key("block.fc1", ["fc1", "block.fc1"])
      'block.fc1'
    """
    others = [m for m in names if m != name]
    if any(re.match(rf"(.*\.)?({name})$", m) for m in others):
        return "^" + re.escape(name)
    return name
