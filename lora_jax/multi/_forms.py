"""Reading the adapters of a bank: their lowered forms by path, checked to fit one base and one another.

Adapters share a bank when, at every path two of them target, they fit the
same kernel (shape and layout) and are of the same kind; a path only some
target is the identity in the others. Only low-rank forms can be banked: a leaf
trained in full (``Trainable``) would store one kernel per adapter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lora_jax.adapters._lowered import LowRank
from lora_jax.adapters._tree import adapter_items, lowered_items
from lora_jax.errors._messages import expected
from lora_jax.multi._slots import Form
from lora_jax.targets._paths import flatten_with_paths, is_base_leaf


def check_adapter_list(adapters: Any, where: str) -> list[Any]:
    """``adapters`` as a list of adapter trees: a non-empty list or tuple, not one tree."""
    if isinstance(adapters, Mapping) or not isinstance(adapters, Sequence) or isinstance(adapters, str):
        raise TypeError(
            expected(
                f"{where}(adapters=...)",
                "a list of adapter trees (each as init_lora, load_adapter or import_peft returns)",
                adapters,
                "For one adapter write stack([lora])",
            )
        )
    if not adapters:
        raise ValueError(
            expected(f"{where}(adapters=...)", "at least one adapter tree", "an empty list", found_is_text=True)
        )
    return list(adapters)


def lowered_adapter(lora: Any, k: int | None, where: str) -> dict[str, LowRank]:
    """The lowered forms of one adapter by path; a leaf trained in full or a non-tree raises."""
    label = f"{where}: adapter {k}" if k is not None else f"{where}: the adapter"
    if not isinstance(lora, Mapping):
        raise TypeError(
            expected(
                label, "an adapter tree (a dict of LoraWeights / DoraWeights nodes)", lora, "Pass init_lora's tree"
            )
        )
    nodes = adapter_items(lora)
    out: dict[str, LowRank] = {}
    for path, low in lowered_items(lora).items():
        if not isinstance(low, LowRank):
            raise TypeError(
                expected(
                    f"{label} at {path}",
                    "a low-rank adapter node (LoraWeights, DoraWeights, VeraWeights, AdaLoraWeights)",
                    f"{type(nodes[path]).__name__}, a leaf trained in full",
                    "a bank stores low-rank factors; a leaf trained in full would be one whole kernel per adapter. "
                    "Leave it out of the adapters (lora_jax.partition / LoraSpec(trainable=None)) before stacking",
                    found_is_text=True,
                )
            )
        out[path] = low
    return out


def base_leaves(params: Any) -> dict[str, Any] | None:
    """The base params by path (None when not given)."""
    if params is None:
        return None
    return flatten_with_paths(params, is_leaf=is_base_leaf)


def _base_shape(leaf: Any) -> tuple[int, ...]:
    return tuple(getattr(leaf, "shape", ()))


def check_fits_base(path: str, low: LowRank, bases: dict[str, Any] | None, label: str) -> None:
    """The adapter's kernel shape is the base leaf's (when params are given)."""
    if bases is None:
        return
    if path not in bases:
        raise ValueError(
            expected(
                f"{label} at {path}",
                "a path of the params",
                "a path the params lack",
                "every adapter of a bank must be made for the same params",
                found_is_text=True,
            )
        )
    if _base_shape(bases[path]) != tuple(low.kernel_shape):
        raise ValueError(
            expected(
                f"{label} at {path}",
                f"factors for the base kernel of shape {_base_shape(bases[path])}",
                f"factors for a kernel of shape {tuple(low.kernel_shape)} (A {tuple(low.a.shape)}, "
                f"B {tuple(low.b.shape)})",
                "every adapter of a bank must be made for the same params",
                found_is_text=True,
            )
        )


def forms_of(lowered: list[dict[str, LowRank]], bases: dict[str, Any] | None, where: str) -> dict[str, Form]:
    """The bank's form at every path any adapter targets, in first-seen order; adapters that disagree raise."""
    first: dict[str, tuple[int, LowRank]] = {}
    ranks: dict[str, int] = {}
    dora: dict[str, bool] = {}
    for k, lows in enumerate(lowered):
        for path, low in lows.items():
            check_fits_base(path, low, bases, f"{where}: adapter {k}")
            if path not in first:
                first[path], ranks[path], dora[path] = (k, low), low.rank, low.magnitude is not None
                continue
            j, ref = first[path]
            for what, mine, theirs in (
                ("kernel shape", tuple(low.kernel_shape), tuple(ref.kernel_shape)),
                ("layout", low.layout, ref.layout),
                ("kind", low.kind, ref.kind),
            ):
                if mine != theirs:
                    raise ValueError(
                        expected(
                            f"{where}: adapter {k} at {path}",
                            f"the {what} of adapter {j} there, {theirs!r}",
                            f"{mine!r}",
                            "the adapters of a bank must be made for the same params (same paths, kernel shapes "
                            "and layouts, LoraSpec(axes=...))",
                            found_is_text=True,
                        )
                    )
            ranks[path] = max(ranks[path], low.rank)
            dora[path] = dora[path] or low.magnitude is not None
    return {
        path: Form(path, ref.layout, ref.kind, ranks[path], tuple(ref.kernel_shape), dora[path])
        for path, (_, ref) in first.items()
    }
