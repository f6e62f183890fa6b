"""A module's state in two parts: its ``nnx.Param`` variables (what adapters change) and the rest (passed through).

Every function here reads a module and never writes to it; checks raise with the module's class and the path.
"""

from __future__ import annotations

import difflib
from typing import Any

from flax import nnx

from lora_jax.adapters._tree import items_of, lowered_items
from lora_jax.errors._messages import expected
from lora_jax.targets._paths import flatten_with_paths

#: What the rest holds, for messages: every variable that is not an ``nnx.Param``.
REST = "rng, cache, batch-stat and other non-Param variables"


def _module_hint(where: str) -> str:
    name = where.split(".")[-1]
    if name in ("init_lora", "apply_lora"):
        return f"Pass the module itself; for an nnx.State or a params pytree use lora_jax.{name}"
    return "Pass the module itself; nnx.merge(graphdef, state) rebuilds one from its split state"


def check_module(where: str, module: Any) -> None:
    """Raise ``TypeError`` unless ``module`` is an ``nnx.Module``; the hint names the State-level function."""
    if not isinstance(module, nnx.Module):
        raise TypeError(
            expected(
                f"{where}(module=...)",
                "an nnx.Module",
                module,
                _module_hint(where),
            )
        )


def split_params(module: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``nnx.split(module, nnx.Param, ...)``: the graph, the Param state and everything else (rngs, caches, stats)."""
    return nnx.split(module, nnx.Param, ...)


def variable_types(state: nnx.State) -> dict[str, str]:
    """The class name of every variable of ``state`` (``"BatchStat"``, ``"RngCount"``...), keyed by path."""
    return {"/".join(str(k) for k in path): type(v).__name__ for path, v in nnx.to_flat_state(state)}


def check_fits(where: str, module: nnx.Module, params: nnx.State, rest: nnx.State, lora: Any) -> None:
    """Raise unless every adapter of ``lora`` sits on one of ``module``'s ``nnx.Param`` kernels, of its shape.

    Raises:
      TypeError: ``lora`` is not an adapter tree.
      ValueError: an adapter path is a non-Param variable of the module, or no variable at all, or the kernel's
        shape differs; the message names the path, the module's class and the nearest Param paths.
    """
    name = type(module).__name__
    items = items_of(lora, where, f"{where}(module, lora)")
    flat = flatten_with_paths(params)
    others = variable_types(rest)
    hint = "The adapter was made for another module; create it with lora_jax.nnx.init_lora(key, module, spec)"
    for path in items:
        if path in flat:
            continue
        if path in others:
            raise ValueError(
                expected(
                    f"{where}(lora=...) at {path}",
                    f"an nnx.Param of the {name}",
                    f"a {others[path]} variable, which adapters never change (they pass {REST} through)",
                    hint,
                    found_is_text=True,
                )
            )
        near = difflib.get_close_matches(path, list(flat), n=3, cutoff=0.0)
        raise ValueError(
            expected(
                f"{where}(lora=...) at {path}",
                f"an nnx.Param path of the {name} (nearest: {', '.join(near) or 'the module has no Param'})",
                "no variable there",
                hint,
                found_is_text=True,
            )
        )
    for path, low in lowered_items(lora).items():
        shape = tuple(getattr(flat[path], "shape", ()))
        if tuple(low.kernel_shape) != shape:
            raise ValueError(
                expected(
                    f"{where}(lora=...) at {path}",
                    f"an adapter for the {name}'s Param of shape {shape}",
                    f"one made for a kernel of shape {tuple(low.kernel_shape)}",
                    hint,
                    found_is_text=True,
                )
            )
