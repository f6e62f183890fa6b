"""Restricting optax to adapters: ``only_adapters``."""

from __future__ import annotations

from typing import Any

import jax
import optax

from lora_jax.adapters._nodes import is_adapter
from lora_jax.targets._select import TRAINABLE

_TRAIN, _FREEZE = "train", "freeze"


def _labels(tree: Any, labels: Any) -> Any:
    def node_labels(x: Any) -> Any:
        if is_adapter(x):
            return jax.tree_util.tree_map(lambda _: _TRAIN, x)
        return _FREEZE

    out = jax.tree_util.tree_map(node_labels, tree, is_leaf=is_adapter)
    if labels is None:
        return out

    def relabel(sub_out: Any, sub_labels: Any) -> Any:
        return jax.tree_util.tree_map(
            lambda lab, given: _TRAIN if lab == _TRAIN or given == TRAINABLE else _FREEZE,
            sub_out,
            sub_labels,
            is_leaf=lambda x: isinstance(x, str),
        )

    structure = jax.tree_util.tree_structure(labels)
    if jax.tree_util.tree_structure(tree, is_leaf=is_adapter) == structure:
        return relabel(out, labels)
    # A container such as (params, lora): the labels apply to the element with the params' structure.
    if isinstance(tree, (tuple, list)):
        matches = [
            k for k, sub in enumerate(tree) if jax.tree_util.tree_structure(sub, is_leaf=is_adapter) == structure
        ]
        if matches:
            parts = list(out)
            for k in matches:
                parts[k] = relabel(out[k], labels)
            return type(out)(parts) if isinstance(out, list) else tuple(parts)
    raise ValueError(
        "only_adapters(labels=...): the labels (from partition(params, spec)) have the structure of params, "
        "but the optimized tree is neither params nor a tuple/list holding params (e.g. (params, lora)). "
        "Pass labels=None when optimizing the adapter tree alone."
    )


def only_adapters(tx: optax.GradientTransformation, *, labels: Any = None) -> optax.GradientTransformation:
    """Wrap ``tx`` so it updates adapter leaves only, with no state for the rest.

    Leaves inside adapter nodes (:class:`LoraWeights`, :class:`Trainable`) are
    updated by ``tx``; every other leaf gets a zero update and no optimizer state
    (``optax.multi_transform`` stores ``optax.MaskedNode`` for it). Use it when
    the optimized tree mixes base and adapter leaves, e.g. ``(params, lora)``.
    With ``labels=partition(params, spec)`` it also trains the base leaves
    labelled ``"trainable"``. On the adapter tree alone it is ``tx`` itself.

    Args:
      tx: any optax transformation, e.g. ``optax.adamw(1e-3)``.
      labels: optional label tree (from :func:`partition`) for plain leaves.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from lora_jax import LoraSpec, init_lora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
      >>> lora = init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["dense"]))
      >>> tx = only_adapters(optax.adam(1e-3))
      >>> state = tx.init((params, lora))
      >>> sum(x.size for x in jax.tree_util.tree_leaves(state))  # adam's mu and nu for A and B, + count
      29
    """
    return optax.multi_transform({_TRAIN: tx, _FREEZE: optax.set_to_zero()}, lambda tree: _labels(tree, labels))
