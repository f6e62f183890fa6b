"""The bad-input checks of :func:`lora_jax.combine_adapters`: each names the argument, what was expected,
what was found, and the fix."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from lora_jax.adapters._lowered import LowRank, Replace
from lora_jax.adapters._registry import lower
from lora_jax.adapters._tree import items_of, shared_section
from lora_jax.errors._checks import check_key
from lora_jax.errors._messages import describe, expected

WHERE = "combine_adapters"
EXACT = ("cat", "svd")
ON_FACTORS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
ON_DELTAS = ("ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = EXACT + ON_FACTORS + ON_DELTAS
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
DARE = ("dare_linear", "dare_ties")


def rule_of(method: str) -> str:
    """The task-tensor rule a method applies (``"svd"`` is the linear sum; ``"ties_svd"`` is ``"ties"``)."""
    return "linear" if method == "svd" else method.removesuffix("_svd")


def check_method(method: Any) -> str:
    if method not in METHODS:
        raise ValueError(
            expected(
                f"{WHERE}(method=...)",
                "one of " + ", ".join(repr(m) for m in METHODS),
                method,
                "'cat' is exact; 'svd' is its truncation to a given rank",
            )
        )
    return method


def lowered_adapters(adapters: Any) -> list[dict[str, LowRank]]:
    """Each adapter's lowered forms by path, after checking they are LoRA-like and fit the same params."""
    if isinstance(adapters, Mapping) or not isinstance(adapters, Sequence) or not adapters:
        raise TypeError(
            expected(
                f"{WHERE}(adapters=...)",
                "a non-empty list of adapter trees",
                adapters,
                "Pass a list, e.g. combine_adapters([lora_a, lora_b], [0.5, 0.5], method='cat')",
            )
        )
    out = []
    for i, lora in enumerate(adapters):
        shared = shared_section(lora)
        items = items_of(lora, WHERE, "combine_adapters(adapters, weights, *, method, ...)")
        out.append({path: _low_rank(lower(node, shared, path), i, path) for path, node in items.items()})
    _check_same_params(out)
    return out


def _low_rank(low: Any, i: int, path: str) -> LowRank:
    where = f"{WHERE}(adapters[{i}]) at {path}"
    if isinstance(low, Replace):
        raise ValueError(
            expected(
                where,
                "a low-rank adapter",
                "a leaf trained in full (LoraSpec(trainable=...))",
                "Full-rank leaves have no factors to combine; leave them out of the adapters "
                "(PEFT refuses them too) and pick one adapter's value",
                found_is_text=True,
            )
        )
    if low.magnitude is not None:
        raise ValueError(
            expected(
                where,
                "a low-rank adapter without a magnitude",
                "a DoRA adapter (it lowers with a magnitude m)",
                "A DoRA update (m / ||W + delta||) * (W + delta) is not linear in its factors, so weighted sums "
                "of DoRA adapters are not defined; merge each into the params, or combine plain LoRA "
                "adapters",
                found_is_text=True,
            )
        )
    return low


def _check_same_params(lowered: list[dict[str, LowRank]]) -> None:
    first = lowered[0]
    for i, items in enumerate(lowered[1:], start=1):
        missing, extra = sorted(set(first) - set(items)), sorted(set(items) - set(first))
        if missing or extra:
            found = "; ".join(
                part
                for part in (
                    f"no adapter at {', '.join(missing)}" if missing else "",
                    f"an adapter at {', '.join(extra)} that adapters[0] lacks" if extra else "",
                )
                if part
            )
            raise ValueError(
                expected(
                    f"{WHERE}(adapters[{i}])",
                    f"adapters of the same params as adapters[0] ({len(first)} paths)",
                    found,
                    "Combine adapters made for the same targets (init_lora with the same targets)",
                    found_is_text=True,
                )
            )
        for path, low in items.items():
            ref = first[path]
            got, want = (low.kernel_shape, low.layout, low.kind), (ref.kernel_shape, ref.layout, ref.kind)
            if got != want:
                raise ValueError(
                    expected(
                        f"{WHERE}(adapters[{i}]) at {path}",
                        f"kernel shape {want[0]}, layout {want[1]!r}, kind {want[2]!r} (as adapters[0])",
                        f"kernel shape {got[0]}, layout {got[1]!r}, kind {got[2]!r}",
                        "The adapters were made for different params",
                        found_is_text=True,
                    )
                )


def check_weights(weights: Any, n: int) -> jnp.ndarray:
    shape = getattr(weights, "shape", None)
    if shape is not None:
        ok = len(shape) == 1 and shape[0] == n
    else:
        ok = isinstance(weights, Sequence) and not isinstance(weights, str) and len(weights) == n
        ok = ok and all(isinstance(w, (int, float)) or getattr(w, "shape", None) == () for w in weights)
    if not ok:
        raise ValueError(
            expected(
                f"{WHERE}(weights=...)",
                f"{n} numbers, one per adapter",
                weights,
                "Give one weight per adapter, e.g. [1.0, -1.0] for a difference",
            )
        )
    return jnp.asarray(weights)


def check_options(method: str, lowered: list[dict[str, LowRank]], rank, density, majority_sign, key, masks) -> None:
    """The keyword arguments a method uses, and only those."""
    svd_like = method == "svd" or method in ON_DELTAS
    if rank is not None and not svd_like:
        raise ValueError(
            expected(
                f"{WHERE}(rank=...)",
                f"None with method={method!r}",
                rank,
                "rank is the truncation rank of 'svd' and the '*_svd' methods",
            )
        )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(expected(f"{WHERE}(rank=...)", "a positive int or None", rank))
    rule = rule_of(method)
    if rule in PRUNING:
        low = 0.0 if rule in ("ties", "magnitude_prune") else None
        if (
            isinstance(density, bool)
            or not isinstance(density, (int, float))
            or not ((density > 0 if low is None else density >= 0) and density <= 1)
        ):
            bounds = "0 <= density <= 1" if low is not None else "0 < density <= 1 (DARE rescales by 1 / density)"
            raise ValueError(
                expected(
                    f"{WHERE}(density=...)",
                    f"a number with {bounds} for method={method!r}",
                    density,
                    "density is the fraction of entries kept",
                )
            )
    elif density is not None:
        raise ValueError(
            expected(
                f"{WHERE}(density=...)",
                f"None with method={method!r}",
                density,
                "density is for the pruning methods (ties, dare_*, magnitude_prune and their *_svd forms)",
            )
        )
    if majority_sign not in ("total", "frequency"):
        raise ValueError(expected(f"{WHERE}(majority_sign=...)", "'total' or 'frequency'", majority_sign))
    if majority_sign != "total" and rule not in ("ties", "dare_ties"):
        raise ValueError(
            expected(
                f"{WHERE}(majority_sign=...)",
                f"'total' with method={method!r}",
                majority_sign,
                "the sign election is for the TIES methods",
            )
        )
    if rule in DARE:
        if masks is None:
            check_key(WHERE, key)
        elif key is not None:
            raise ValueError(
                expected(
                    f"{WHERE}(key=...)", "None when masks are given", key, "Pass either key (random masks) or masks"
                )
            )
    else:
        for name, value in (("key", key), ("masks", masks)):
            if value is not None:
                raise ValueError(
                    expected(
                        f"{WHERE}({name}=...)",
                        f"None with method={method!r}",
                        value,
                        f"{name} is for DARE's random masks (the dare_* methods)",
                    )
                )
    if method in ON_FACTORS:
        _check_equal_ranks(method, lowered)


def _check_equal_ranks(method: str, lowered: list[dict[str, LowRank]]) -> None:
    for path in lowered[0]:
        ranks = [items[path].rank for items in lowered]
        if len(set(ranks)) > 1:
            raise ValueError(
                expected(
                    f"{WHERE}(method={method!r}) at {path}",
                    "adapters of equal rank (it sums A's and B's)",
                    f"ranks {ranks}",
                    "Use method='cat' (exact), 'svd', or a '*_svd' form for unequal ranks",
                    found_is_text=True,
                )
            )


def check_rank(method: str, rank: int, path: str, ranks: list[int], fan_in: int, fan_out: int) -> None:
    """The truncation rank fits the combined rank (``svd``) and the kernel."""
    if method == "svd" and rank > sum(ranks):
        raise ValueError(
            expected(
                f"{WHERE}(rank=...) at {path}",
                f"at most the combined rank {sum(ranks)} (ranks {ranks})",
                rank,
                "A sum of adapters has at most the sum of their ranks; method='cat' is the exact combination",
            )
        )
    if rank > min(fan_in, fan_out):
        raise ValueError(
            expected(
                f"{WHERE}(rank=...) at {path}",
                f"at most min(fan_in, fan_out) = {min(fan_in, fan_out)}",
                rank,
                "Lower the rank",
            )
        )


def mask_for(masks: Any, i: int, path: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Adapter ``i``'s given DARE masks at ``path``: ``{"a": ..., "b": ...}`` or ``{"delta": ...}``."""
    hint = (
        "masks[i] mirrors adapters[i]: at each adapted path a dict {'a': mask, 'b': mask} shaped like the "
        "factors (dare_linear, dare_ties), or one kernel-shaped mask (the *_svd forms)"
    )
    if not isinstance(masks, Sequence) or isinstance(masks, Mapping) or i >= len(masks):
        raise ValueError(expected(f"{WHERE}(masks=...)", "a list with one mask tree per adapter", masks, hint))
    node: Any = masks[i]
    for k in path.split("/"):
        if not isinstance(node, Mapping) or k not in node:
            raise ValueError(expected(f"{WHERE}(masks[{i}]) at {path}", "a mask", "none", hint, found_is_text=True))
        node = node[k]
    got = {"delta": node} if "delta" in shapes else node
    if not isinstance(got, Mapping) or set(got) != set(shapes):
        raise ValueError(
            expected(
                f"{WHERE}(masks[{i}]) at {path}",
                f"masks for {sorted(shapes)}",
                describe(node),
                hint,
                found_is_text=True,
            )
        )
    for name, want in shapes.items():
        if tuple(getattr(got[name], "shape", ())) != tuple(want):
            raise ValueError(
                expected(f"{WHERE}(masks[{i}]) at {path}", f"a {name} mask of shape {tuple(want)}", got[name], hint)
            )
    return dict(got)
