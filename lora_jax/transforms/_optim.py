"""Restricting optax to adapters: ``only_adapters``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

from lora_jax.adapters._lowered import Replace
from lora_jax.adapters._registry import SHARED, frozen_fields, is_adapter, is_node_like, lowered_shape, node_type
from lora_jax.adapters._tree import adapter_items, shared_section
from lora_jax.errors._messages import describe, expected
from lora_jax.targets._paths import map_with_paths, path_str
from lora_jax.targets._select import TRAINABLE

_TRAIN, _FREEZE = "train", "freeze"


def _node_labels(node: Any) -> Any:
    """The node with each array field labelled: train, or freeze for its frozen fields."""
    frozen = set(frozen_fields(node))
    return jax.tree_util.tree_map_with_path(lambda kp, _: _FREEZE if kp[0].name in frozen else _TRAIN, node)


def _adapter_labels(tree: Any) -> Any:
    def one(kp: tuple, x: Any) -> Any:
        if is_node_like(x):
            node_type(x, path_str(kp))  # a subclass of a node type raises here, rather than being frozen silently
            return _node_labels(x)
        return _FREEZE

    out = jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_node_like)
    if isinstance(tree, Mapping) and SHARED in tree:  # the shared section is frozen by definition
        out = {**out, SHARED: jax.tree_util.tree_map(lambda _: _FREEZE, tree[SHARED])}
    return out


def _has_copy(lora: Any) -> set[str]:
    """Paths that an adapter tree trains as a full copy (nodes that lower to :class:`Replace`)."""
    if not _holds_nodes(lora):
        return set()
    shared = shared_section(lora)
    return {p for p, node in adapter_items(lora).items() if isinstance(lowered_shape(node, shared, p), Replace)}


def _holds_nodes(tree: Any) -> bool:
    return any(is_node_like(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_node_like))


def _labels(tree: Any, labels: Any) -> Any:
    return _check_some_train(tree, _relabelled(tree, labels))


def _check_some_train(tree: Any, out: Any) -> Any:
    """Refuse a tree of which nothing trains (params given instead of the adapters): every update would be zero."""
    n = len(jax.tree_util.tree_leaves(tree))
    if n and _TRAIN not in jax.tree_util.tree_leaves(out):
        raise ValueError(
            expected(
                "only_adapters(tx).init(tree)",
                "a tree holding adapter nodes (the adapter tree, or (params, lora))",
                f"{describe(tree).split(' ')[0]} with no adapter node among its {n} leaves, so every update would "
                f"be zero",
                "Optimize the adapter tree from init_lora (or (params, lora)); to train base leaves, pass "
                "only_adapters(tx, labels=partition(params, spec))",
                found_is_text=True,
            )
        )
    return out


def _relabelled(tree: Any, labels: Any) -> Any:
    out = _adapter_labels(tree)
    if labels is None:
        return out

    def relabel(sub_out: Any, sub_labels: Any, copies: set[str]) -> Any:
        # a base leaf labelled "trainable" whose trained copy (a Trainable node) is optimized too stays frozen:
        # the copy is what apply_lora uses, and training both would also decay the unused base leaf
        paths = map_with_paths(lambda p, _: p, sub_labels, is_leaf=lambda x: isinstance(x, str))
        return jax.tree_util.tree_map(
            lambda lab, given, path: (
                _TRAIN if lab == _TRAIN or (given == TRAINABLE and path not in copies) else _FREEZE
            ),
            sub_out,
            sub_labels,
            paths,
            is_leaf=lambda x: isinstance(x, str),
        )

    structure = jax.tree_util.tree_structure(labels)
    if jax.tree_util.tree_structure(tree, is_leaf=is_adapter) == structure:
        return relabel(out, labels, set())
    # A container such as (params, lora): the labels apply to the element with the params' structure.
    if isinstance(tree, (tuple, list)):
        matches = [  # the params element: the labels' structure, and no adapter nodes
            k
            for k, sub in enumerate(tree)
            if not _holds_nodes(sub) and jax.tree_util.tree_structure(sub, is_leaf=is_adapter) == structure
        ]
        if matches:
            copies = set().union(*(_has_copy(sub) for k, sub in enumerate(tree) if k not in matches))
            parts = list(out)
            for k in matches:
                parts[k] = relabel(out[k], labels, copies)
            return type(out)(parts) if isinstance(out, list) else tuple(parts)
    raise ValueError(
        "only_adapters(labels=...): the labels (from partition(params, spec)) have the structure of params, "
        "but the optimized tree is neither params nor a tuple/list holding params (e.g. (params, lora)). "
        "Pass labels=None when optimizing the adapter tree alone."
    )


def only_adapters(tx: optax.GradientTransformation, *, labels: Any = None) -> optax.GradientTransformation:
    """Wrap ``tx`` so it updates trainable adapter arrays only, with no state for the rest.

    Arrays inside adapter nodes (:class:`LoraWeights`, :class:`Trainable`, or a
    registered variant) are updated by ``tx``, except the node's frozen arrays
    (LoRA-FA's A) and the shared section; every other leaf gets a zero update
    and no optimizer state (``optax.multi_transform`` stores
    ``optax.MaskedNode`` for it), so weight decay never reaches a frozen array.
    Use it when the optimized tree mixes base and adapter leaves, e.g.
    ``(params, lora)``, or holds frozen arrays. With
    ``labels=partition(params, spec)`` it also trains the base leaves labelled
    ``"trainable"``, except those whose trained copy (a :class:`Trainable`)
    is in the optimized tree: the copy trains, the base leaf stays as it is.

    Args:
      tx: any optax transformation, e.g. ``optax.adamw(1e-3)``.
      labels: optional label tree (from :func:`partition`) for plain leaves.

    Returns:
      An ``optax.GradientTransformation``. Its ``init`` raises ``ValueError`` on a tree of which nothing
      trains (the params given instead of the adapters: every update would be zero).

    Raises:
      TypeError: if ``tx`` is not a gradient transformation (``optax.adam`` instead of ``optax.adam(1e-3)``).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from lora_jax import LoraSpec, init_lora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
      >>> lora = init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["dense"]))
      >>> tx = only_adapters(optax.adam(1e-3))
      >>> state = tx.init((params, lora))
      >>> sum(x.size for x in jax.tree_util.tree_leaves(state))  # adam's mu and nu for A and B, + count
      29
      >>> fa = init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["dense"], freeze_a=True))
      >>> sum(x.size for x in jax.tree_util.tree_leaves(tx.init(fa)))  # mu and nu for B only, + count
      13
    """
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        hint = (
            f"Call the optimizer factory: e.g. only_adapters(optax.{tx.__name__}(1e-3))"
            if callable(tx) and hasattr(tx, "__name__")
            else "E.g. only_adapters(optax.adamw(1e-3))"
        )
        raise TypeError(expected("only_adapters(tx=...)", "an optax.GradientTransformation", tx, hint))
    return optax.multi_transform({_TRAIN: tx, _FREEZE: optax.set_to_zero()}, lambda tree: _labels(tree, labels))
