"""``export_peft(..., initial=...)``: a PiSSA/OLoRA adapter as a plain LoRA for the original base.

PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``
(``LoraModel.subtract_mutated_init``): training started from ``W = W_res +
s·B₀A₀`` and reached ``W_res + s·BA``, so on the original ``W`` the update is
``s·(BA - B₀A₀) = s·[B, -B₀]·[A; A₀]``, a plain LoRA of rank 2r with the same
scale. PEFT writes it with ``r`` and every ``rank_pattern`` value doubled and
``lora_alpha`` (and ``alpha_pattern``) doubled, or multiplied by ``sqrt(2)``
with rsLoRA, so that the scale stays ``s``; ``init_lora_weights`` becomes
``True``. In lora_jax's layout ``A (*batch, *in, r)`` and ``B (*batch, r,
*out)`` are concatenated along their rank axes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from lora_jax.adapters._nodes import LoraWeights
from lora_jax.adapters._tree import adapter_items, lowered_items
from lora_jax.errors._messages import expected

_WHAT = "the adapter this one was trained from (the lora init_lora_and_base returned)"


def initial_nodes(lora: Any, initial: Any) -> dict[str, LoraWeights]:
    """The initial adapter's LoRA nodes by path, each checked against the trained node at its path.

    Raises:
      TypeError: if ``initial`` is not an adapter tree, or holds another node type where ``lora`` has LoRA.
      ValueError: if its LoRA paths differ from ``lora``'s, or a node's shapes, layout or scale differ.
    """
    where = "export_peft(initial=...)"
    if not isinstance(initial, Mapping):
        raise TypeError(expected(where, f"an adapter tree: {_WHAT}", initial, "E.g. initial=lora0"))
    lowered_items(initial)  # every node whole and consistent
    trained = {p: n for p, n in adapter_items(lora).items() if type(n) is LoraWeights}
    first = {p: n for p, n in adapter_items(initial).items() if type(n) is LoraWeights}
    missing, extra = sorted(set(trained) - set(first)), sorted(set(first) - set(trained))
    if missing or extra:
        found = "; ".join(
            f"{what} {', '.join(paths[:4])}{', ...' if len(paths) > 4 else ''}"
            for what, paths in (("no LoRA node at", missing), ("a LoRA node the adapter lacks at", extra))
            if paths
        )
        raise ValueError(expected(where, f"{_WHAT}, with LoRA nodes at the adapter's paths", found, found_is_text=True))
    for p, node in trained.items():
        node0 = first[p]
        checks = [
            ("A's shape", tuple(node.a.shape), tuple(node0.a.shape)),
            ("B's shape", tuple(node.b.shape), tuple(node0.b.shape)),
            ("layout", node.layout, node0.layout),
            ("kind", node.kind, node0.kind),
            ("scale", node.scale, node0.scale),
        ]
        for name, have, given in checks:
            same = math.isclose(have, given, rel_tol=1e-9) if name == "scale" else have == given
            if not same:
                raise ValueError(
                    expected(
                        f"{where} at {p}",
                        f"the adapter's {name} {have!r} ({_WHAT})",
                        f"{given!r}",
                        "pass the initial adapter of this training run, made with the same spec",
                        found_is_text=True,
                    )
                )
    return first


def concatenated(a: np.ndarray, b: np.ndarray, a0: np.ndarray, b0: np.ndarray, batch: int) -> tuple:
    """``([A, A₀], [B; -B₀])`` along the rank axes: the rank-2r LoRA ``s·(A·B - A₀·B₀)``.

    >>> import numpy as np
    >>> a, b = concatenated(np.ones((3, 1)), np.ones((1, 2)), np.ones((3, 1)), np.ones((1, 2)), 0)
    >>> a.shape, b.shape, float(np.abs(a @ b).max())
    ((3, 2), (2, 2), 0.0)
    """
    dtype = np.result_type(a.dtype, a0.dtype, b.dtype, b0.dtype)
    a = np.concatenate([a.astype(dtype), a0.astype(dtype)], axis=-1)
    b = np.concatenate([b.astype(dtype), -b0.astype(dtype)], axis=batch)
    return a, b


def doubled_config(rank: int, alpha: float, *, rslora: bool) -> tuple[int, float]:
    """PEFT's ``r`` and ``lora_alpha`` of the converted adapter: the rank doubled, the scale kept.

    >>> doubled_config(4, 8.0, rslora=False), doubled_config(4, 8.0, rslora=True)
    ((8, 16.0), (8, 11.313708499))
    """
    return 2 * rank, float(f"{alpha * (math.sqrt(2.0) if rslora else 2.0):.12g}")
