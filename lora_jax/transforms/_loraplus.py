"""LoRA+ (Hayou et al., 2024): B learns ``ratio`` times faster than A: ``loraplus``.

The grouping is PEFT's ``create_loraplus_optimizer`` (``peft/optimizers/loraplus.py``), read on the adapter tree:

* ``"embedding"``: the factors of an adapter on an embedding table (a node with ``kind="embed"``; PEFT's
  ``lora_embedding_A``/``lora_embedding_B``), at ``embedding_lr``, with weight decay;
* ``"groupB"``: B (field ``b``), DoRA's magnitude (field ``m``, whatever its axes, an embedding's too: PEFT's is
  1-D per layer; PEFT puts a Conv's ``(1, out, 1, 1)`` magnitude in groupA, this puts it here) and every other
  1-D trainable array (a trained bias or norm scale), at ``learning_rate * ratio``, with weight decay;
* ``"groupB_no_decay"``: those of them that PEFT does not decay: a path containing ``"bias"`` (PEFT tests the
  parameter's name for it), or a 1-D leaf named ``scale`` (flax's norm layers; PEFT leaves out
  ``nn.LayerNorm`` parameters), at ``learning_rate * ratio``, with no weight decay;
* ``"groupA"``: every other trainable array (A, a kernel trained in full), at ``learning_rate``, with weight decay.

Frozen arrays (LoRA-FA's A, the ``"__shared__"`` section) and leaves outside adapter nodes are labelled as
:func:`lora_jax.only_adapters` labels them: a zero update and no optimizer state.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from lora_jax.adapters._registry import is_node_like
from lora_jax.errors._messages import describe, expected
from lora_jax.targets._paths import path_str
from lora_jax.transforms._optim import _FREEZE, _TRAIN, _adapter_labels

GROUP_A, GROUP_B, GROUP_B_NO_DECAY, EMBEDDING = "groupA", "groupB", "groupB_no_decay", "embedding"
GROUPS = (GROUP_A, EMBEDDING, GROUP_B, GROUP_B_NO_DECAY)  # PEFT's order of param groups

#: PEFT's keyword -> ours, for a PEFT-style call that lands in ``**optimizer_kwargs``.
_PEFT_NAMES = {
    "lr": "learning_rate",
    "loraplus_lr_ratio": "ratio",
    "loraplus_lr_embedding": "embedding_lr",
    "loraplus_weight_decay": "weight_decay",
}

_WHERE = "loraplus"


def _leaf_group(node_path: str, kp: tuple, x: Any, embed: bool) -> str:
    """PEFT's group of one trainable array of an adapter node (``kp``: its path inside the node)."""
    ndim = len(np.shape(x))
    if kp and getattr(kp[0], "name", None) == "m":  # DoRA's magnitude: PEFT's 1-D lora_magnitude_vector of a layer
        return GROUP_B  # whatever our axes ((heads, head_dim), a stacked layer axis); an embedding's too, as PEFT
    if embed and ndim != 1:
        return EMBEDDING
    if (kp and getattr(kp[0], "name", None) == "b") or ndim == 1:
        name = f"{node_path}/{path_str(kp)}"
        norm_scale = ndim == 1 and node_path.rpartition("/")[2] == "scale"
        return GROUP_B_NO_DECAY if "bias" in name or norm_scale else GROUP_B
    return GROUP_A


def _node_groups(kp: tuple, x: Any) -> Any:
    if not is_node_like(x):
        return _FREEZE
    embed, node_path = getattr(x, "kind", None) == "embed", path_str(kp)
    return jax.tree_util.tree_map_with_path(lambda k, leaf: _leaf_group(node_path, k, leaf, embed), x)


def group_labels(tree: Any) -> Any:
    """The LoRA+ group of every leaf of ``tree`` (see the module docstring), ``"freeze"`` for what does not train.

    Raises:
      ValueError: if nothing in ``tree`` trains (the params given instead of the adapters).
    """
    train = _adapter_labels(tree)  # only_adapters' labels: frozen fields, the shared section, non-adapter leaves
    groups = jax.tree_util.tree_map_with_path(_node_groups, tree, is_leaf=is_node_like)
    out = jax.tree_util.tree_map(lambda t, g: g if t == _TRAIN else _FREEZE, train, groups)
    n = len(jax.tree_util.tree_leaves(tree))
    if n and all(lab == _FREEZE for lab in jax.tree_util.tree_leaves(out)):
        raise ValueError(
            expected(
                f"{_WHERE}(...).init(params)",
                "a tree holding trainable adapter arrays (the adapter tree from init_lora, split(lora)[0], or "
                "(params, lora))",
                f"{describe(tree).split(' ')[0]} with no trainable adapter array among its {n} leaves, so every "
                f"update would be zero",
                "Initialize the optimizer on the adapter tree, e.g. tx.init(lora), not on the base params",
                found_is_text=True,
            )
        )
    return out


def _is_scalar(x: Any) -> bool:
    """A real number, or a 0-d real array (a tracer too: ``optax.inject_hyperparams`` passes those)."""
    if isinstance(x, (bool, np.bool_)):
        return False
    if isinstance(x, (int, float, np.integer, np.floating)):
        return True
    dtype = getattr(x, "dtype", None)
    return dtype is not None and np.shape(x) == () and np.issubdtype(np.dtype(dtype), np.number)


def _check_rate(name: str, value: Any, *, positive: bool, schedule: bool = True) -> None:
    """A number (finite, and > 0 or >= 0 as asked) or, where optax takes one, a schedule ``count -> value``."""
    if schedule and callable(value):
        return
    bound = "positive" if positive else "non-negative"
    what = f"a {bound} finite number" + (" or an optax schedule (a callable count -> value)" if schedule else "")
    ok = _is_scalar(value)
    if ok and not isinstance(value, jax.core.Tracer):
        v = float(value)
        ok = math.isfinite(v) and (v > 0 if positive else v >= 0)
    if not ok:
        hint = {
            "ratio": "LoRA+ trains B at learning_rate * ratio; the paper suggests ratio=16",
            "learning_rate": "E.g. learning_rate=2e-4, or optax.cosine_decay_schedule(2e-4, 1000)",
            "embedding_lr": "PEFT's default is 1e-6",
            "weight_decay": "E.g. weight_decay=0.01; 0.0 (PEFT's default) turns it off",
        }[name]
        raise ValueError(expected(f"{_WHERE}({name}=...)", what, value, hint))


def _parameters(fn: Callable[..., Any]) -> tuple[set[str], bool] | None:
    """The keyword names ``fn`` takes and whether it takes ``**kwargs``; None if its signature cannot be read."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _check_optimizer(optimizer: Any, weight_decay: Any, optimizer_kwargs: dict[str, Any]) -> bool:
    """Check the factory and its keywords; return whether it is given ``weight_decay``."""
    if not callable(optimizer):
        is_tx = callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))
        hint = (
            "Pass the factory itself, which loraplus calls once per group: loraplus(optax.adamw, 1e-3, ratio=16), "
            "not optax.adamw(1e-3)"
            if is_tx
            else "E.g. loraplus(optax.adamw, 1e-3, ratio=16)"
        )
        raise TypeError(
            expected(f"{_WHERE}(optimizer=...)", "an optax optimizer factory such as optax.adamw", optimizer, hint)
        )
    for key in optimizer_kwargs:
        if key in _PEFT_NAMES:
            raise TypeError(
                expected(
                    f"{_WHERE}({key}=...)",
                    "loraplus's own keyword",
                    f"PEFT's name {key!r}",
                    f"Write {_PEFT_NAMES[key]}=... (loraplus(optimizer, learning_rate, *, ratio, embedding_lr, "
                    f"weight_decay, **optimizer_kwargs))",
                    found_is_text=True,
                )
            )
    sig = _parameters(optimizer)
    if sig is None:  # a signature Python cannot read: pass everything, as PEFT does
        return True
    names, var_kw = sig
    name = getattr(optimizer, "__name__", type(optimizer).__name__)
    if "learning_rate" not in names and not var_kw:
        raise TypeError(
            expected(
                f"{_WHERE}(optimizer=...)",
                "an optax optimizer factory taking learning_rate= (e.g. optax.adamw)",
                f"{name}({', '.join(inspect.signature(optimizer).parameters)})",
                "loraplus calls optimizer(learning_rate=..., weight_decay=..., **optimizer_kwargs) once per group; "
                "torch optimizers (which take lr=) do not fit",
                found_is_text=True,
            )
        )
    unknown = sorted(k for k in optimizer_kwargs if k not in names) if not var_kw else []
    if unknown:
        raise TypeError(
            expected(
                f"{_WHERE}(**optimizer_kwargs)",
                f"keywords that {name} takes ({', '.join(sorted(names - {'learning_rate', 'weight_decay'}))})",
                ", ".join(unknown),
                "They are passed to the optimizer factory of every group",
                found_is_text=True,
            )
        )
    takes_decay = "weight_decay" in names or var_kw
    off = not callable(weight_decay) and not isinstance(weight_decay, jax.core.Tracer) and float(weight_decay) == 0.0
    if not takes_decay and not off:
        raise TypeError(
            expected(
                f"{_WHERE}(weight_decay=...)",
                "an optimizer factory that takes weight_decay= (e.g. optax.adamw)",
                f"{name}, which does not, with weight_decay={weight_decay!r}",
                "Use optax.adamw (or another factory with weight_decay), or weight_decay=0.0",
                found_is_text=True,
            )
        )
    return bool(takes_decay)


def _scaled(rate: optax.ScalarOrSchedule, factor: Any) -> optax.ScalarOrSchedule:
    if callable(rate):
        return lambda count: rate(count) * factor
    return rate * factor


def loraplus(
    optimizer: Callable[..., optax.GradientTransformation],
    learning_rate: optax.ScalarOrSchedule,
    *,
    ratio: float,
    embedding_lr: optax.ScalarOrSchedule = 1e-6,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    **optimizer_kwargs: Any,
) -> optax.GradientTransformation:
    """LoRA+: an optax optimizer for the adapter tree that trains B ``ratio`` times faster than A.

    The parameter groups of PEFT's ``create_loraplus_optimizer``, each its
    own ``optimizer(learning_rate=..., weight_decay=..., **optimizer_kwargs)``
    under ``optax.multi_transform``:

    * ``"groupA"``: A and other trainable arrays of 2 or more axes (a kernel
      trained in full, :class:`Trainable`), at ``learning_rate``;
    * ``"groupB"``: B and 1-D trainable arrays, at ``learning_rate * ratio``;
    * ``"groupB_no_decay"``: the 1-D arrays PEFT does not decay (a path
      containing ``"bias"``, a norm's ``scale``), at ``learning_rate * ratio``
      with ``weight_decay=0``;
    * ``"embedding"``: A and B of adapters on embedding tables (``kind="embed"``), at ``embedding_lr``.

    As in PEFT, ``weight_decay`` replaces the factory's default (optax.adamw's
    1e-4) in every group but ``"groupB_no_decay"``. Frozen arrays (LoRA-FA's A,
    the ``"__shared__"`` section) and leaves outside adapter nodes get a zero
    update and no optimizer state, as with :func:`only_adapters`. Works on the
    adapter tree, on ``split(lora)[0]`` and on ``(params, lora)``.

    Args:
      optimizer: an optax optimizer factory, e.g. ``optax.adamw`` (not ``optax.adamw(1e-3)``); a factory without
        ``weight_decay=`` (``optax.adam``, ``optax.sgd``) needs ``weight_decay=0``.
      learning_rate: A's learning rate (PEFT's ``lr``): a number or an optax schedule.
      ratio: B's learning rate over A's (PEFT's ``loraplus_lr_ratio``; the paper suggests 16), a positive number.
      embedding_lr: the learning rate of adapters on embedding tables (PEFT's ``loraplus_lr_embedding``): a number
        or a schedule.
      weight_decay: PEFT's ``loraplus_weight_decay``: a non-negative number, or a schedule where the factory takes
        one.
      **optimizer_kwargs: passed to ``optimizer`` for every group (``b1``, ``eps``, ...).

    Returns:
      An ``optax.GradientTransformation``; its state is a ``MultiTransformState`` with one inner state per group
      (and ``"freeze"``). Its ``init`` raises ``ValueError`` on a tree with no trainable adapter array.

    Raises:
      TypeError: if ``optimizer`` is not a factory taking ``learning_rate=`` (or ``weight_decay=`` when it is not
        0), or ``optimizer_kwargs`` holds keywords it does not take (or PEFT's names for loraplus's own).
      ValueError: if ``ratio`` is not a positive number, ``learning_rate`` or ``embedding_lr`` not a positive
        number or schedule, or ``weight_decay`` a negative one.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from lora_jax import LoraSpec, init_lora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> lora = init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["dense"]))
      >>> tx = loraplus(optax.adamw, 1e-3, ratio=16.0)
      >>> state = tx.init(lora)
      >>> grads = jax.tree.map(jnp.ones_like, lora)
      >>> updates, state = tx.update(grads, state, lora)
      >>> node = updates["dense"]["kernel"]  # Adam's first step is -lr * sign(g): B's lr is 16 times A's
      >>> round(float(node.a[0, 0]), 6), round(float(node.b[0, 0]), 6)
      (-0.001, -0.016)
    """
    _check_rate("ratio", ratio, positive=True, schedule=False)
    _check_rate("learning_rate", learning_rate, positive=True)
    _check_rate("embedding_lr", embedding_lr, positive=True)
    _check_rate("weight_decay", weight_decay, positive=False)
    takes_decay = _check_optimizer(optimizer, weight_decay, optimizer_kwargs)
    rates = {
        GROUP_A: learning_rate,
        EMBEDDING: embedding_lr,
        GROUP_B: _scaled(learning_rate, ratio),
        GROUP_B_NO_DECAY: _scaled(learning_rate, ratio),
    }
    transforms: dict[str, optax.GradientTransformation] = {}
    for group, rate in rates.items():
        decay = {"weight_decay": 0.0 if group == GROUP_B_NO_DECAY else weight_decay} if takes_decay else {}
        tx = optimizer(learning_rate=rate, **decay, **optimizer_kwargs)
        if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
            raise TypeError(
                expected(
                    f"{_WHERE}(optimizer=...)",
                    "a factory that returns an optax.GradientTransformation",
                    f"one that returned {describe(tx)}",
                    "E.g. optax.adamw",
                    found_is_text=True,
                )
            )
        transforms[group] = tx
    transforms[_FREEZE] = optax.set_to_zero()
    return optax.multi_transform(transforms, group_labels)
