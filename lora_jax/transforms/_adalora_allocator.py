"""AdaLoRA's rank allocator as an optax transform: PEFT's importance scores, budget schedule and masking.

:func:`adalora_allocator` wraps an optimizer. Each update, with ``p`` the
adapter after the inner optimizer's step and ``g`` the gradient (PEFT calls
``update_and_allocate`` after ``optimizer.step()``):

* sensitivity ``I = |p·g|`` per entry of ``a``, ``e`` and ``b``, smoothed
  ``Ī ← β₁Ī + (1-β₁)I`` and uncertainty ``Ū ← β₂Ū + (1-β₂)|I - Ī|`` (while
  ``step < total_step - tfinal``);
* the score of triplet ``k``: ``s_e[k] + mean_in s_a[:, k] + mean_out s_b[k, :]``
  with ``s = Ī·Ū``;
* the budget: ``init_bgt = Σ r`` up to ``tinit``, then
  ``int((init_bgt - target_bgt)·(1 - (step - tinit)/(total_step - tfinal - tinit))³ + target_bgt)``
  (masking every ``deltaT`` steps), ``target_bgt = target_r·(#targets)`` after;
  the ``init_bgt - budget`` triplets with the lowest scores (ties at the
  threshold too, as ``torch.kthvalue``) are pruned: their ``e`` is set to 0 by
  this update, and ``state.mask`` records the kept ones. At
  ``step == total_step - tfinal`` the mask is final and applied every step after.

The budget table is computed on the host in float64 (as PEFT's Python ints and
floats), indexed by the step count in the state: masking is data, no retrace.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax.adapters._adalora import AdaLoraWeights
from lora_jax.adapters._tree import adapter_items
from lora_jax.targets._paths import nest


class AdaLoraState(NamedTuple):
    """The allocator's state: ``count`` (steps done), the inner optimizer's state, the smoothed sensitivity
    and uncertainty ``{path: (a, e, b)}``, and ``mask`` ``{path: bool (*batch, r)}``, the kept triplets.

    Example:
      >>> import jax.numpy as jnp
      >>> AdaLoraState(jnp.zeros((), int), (), {}, {}, {"k": jnp.ones(2, bool)}).mask["k"].shape
      (2,)
    """

    count: jax.Array
    inner: Any
    ipt: dict
    unc: dict
    mask: dict


def budget_schedule(step: int, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total_step: int, delta_t: int):
    """PEFT's ``(budget, mask_ind)`` at ``step``.

    >>> budget_schedule(0, 8, 4, 1, 1, 10, 1), budget_schedule(9, 8, 4, 1, 1, 10, 1)
    ((8, False), (4, True))
    """
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul**3) + target_bgt), step % delta_t == 0


def _adalora_nodes(lora: Any) -> dict[str, AdaLoraWeights]:
    items = {p: n for p, n in adapter_items(lora).items() if type(n) is AdaLoraWeights}
    if not items:
        raise ValueError("adalora_allocator: the adapter tree has no AdaLoraWeights node; use LoraSpec(adalora=True).")
    return items


def _fields(node: AdaLoraWeights) -> tuple:
    return (node.a, node.e, node.b)


def _scores(node: AdaLoraWeights, ipt: tuple, unc: tuple) -> jax.Array:
    """The triplet scores ``(*batch, r)``."""
    sa, se, sb = (i * u for i, u in zip(ipt, unc, strict=True))
    nb = node.layout.count("b")
    ni, no = node.layout.count("i"), node.layout.count("o")
    ma = jnp.mean(sa, axis=tuple(range(nb, nb + ni)))  # (*batch, r)
    mb = jnp.mean(sb, axis=tuple(range(nb + 1, nb + 1 + no)))
    return se + ma + mb


def adalora_allocator(
    inner: optax.GradientTransformation,
    *,
    target_r: int,
    total_step: int,
    tinit: int = 0,
    tfinal: int = 0,
    deltaT: int = 1,
    beta1: float = 0.85,
    beta2: float = 0.85,
) -> optax.GradientTransformation:
    """``inner`` followed by AdaLoRA's rank allocation (PEFT's ``RankAllocator``; see the module docstring).

    ``update(grads, state, params)`` needs ``params`` (the adapter tree).
    The mask is ``state.mask``; :func:`kept_ranks` gives PEFT's ``rank_pattern`` counts.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_jax
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> lora = lora_jax.init_lora(jax.random.key(0), params, lora_jax.LoraSpec(rank=2, targets=["dense"], adalora=True))
      >>> tx = adalora_allocator(optax.sgd(0.1), target_r=1, total_step=4)
      >>> state = tx.init(lora)
      >>> bool(state.mask["dense/kernel"].all())
      True
    """
    if not 0 < beta1 < 1 or not 0 < beta2 < 1:
        raise ValueError(f"adalora_allocator: beta1 and beta2 must be in (0, 1); found {beta1}, {beta2}.")
    if total_step - tfinal - tinit <= 0:
        raise ValueError(
            f"adalora_allocator: total_step - tfinal - tinit must be positive (the budget's cubic phase); found "
            f"total_step={total_step}, tinit={tinit}, tfinal={tfinal}."
        )

    def init(params):
        nodes = _adalora_nodes(params)
        zeros = {p: tuple(jnp.zeros_like(x) for x in _fields(n)) for p, n in nodes.items()}
        mask = {p: jnp.ones(n.e.shape, bool) for p, n in nodes.items()}
        return AdaLoraState(jnp.zeros((), jnp.int32), inner.init(params), zeros, zeros, mask)

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("adalora_allocator: update(grads, state, params) needs params (the adapter tree).")
        nodes = _adalora_nodes(params)
        init_bgt = sum(int(np.prod(n.e.shape)) for n in nodes.values())
        target_bgt = target_r * sum(int(np.prod(n.e.shape[:-1])) for n in nodes.values())
        table = [
            budget_schedule(s, init_bgt, target_bgt, tinit, tfinal, total_step, deltaT) for s in range(total_step + 1)
        ]
        budgets = jnp.asarray([b for b, _ in table], jnp.int32)
        marks = jnp.asarray([m for _, m in table], bool)
        updates, inner_state = inner.update(grads, state.inner, params)
        new = optax.apply_updates(params, updates)
        new_nodes, grad_nodes = _adalora_nodes(new), adapter_items(grads)
        step = state.count
        final = total_step - tfinal
        learning = step < final
        ipt, unc = {}, {}
        for p in nodes:
            out_i, out_u = [], []
            for x, g, i0, u0 in zip(
                _fields(new_nodes[p]), _fields(grad_nodes[p]), state.ipt[p], state.unc[p], strict=True
            ):
                sens = jnp.abs(x * g)
                i1 = beta1 * i0 + (1 - beta1) * sens
                u1 = beta2 * u0 + (1 - beta2) * jnp.abs(sens - i1)
                out_i.append(jnp.where(learning, i1, i0))
                out_u.append(jnp.where(learning, u1, u0))
            ipt[p], unc[p] = tuple(out_i), tuple(out_u)
        idx = jnp.minimum(step, total_step)
        budget = budgets[idx]
        remask = (step <= final) & (marks[idx] | (step == final))
        scores = {p: _scores(nodes[p], ipt[p], unc[p]) for p in nodes}
        flat = jnp.sort(jnp.concatenate([s.reshape(-1) for s in scores.values()]))
        k = init_bgt - budget
        threshold = jnp.where(k > 0, flat[jnp.clip(k - 1, 0, flat.size - 1)], -jnp.inf)
        mask = {p: jnp.where(remask, ~(scores[p] <= threshold), state.mask[p]) for p in nodes}
        apply = remask | (step > final)
        out = dict(adapter_items(updates))
        for p, node in nodes.items():
            e_new = new_nodes[p].e
            zeroed = jnp.where(apply & ~mask[p], jnp.zeros_like(e_new), e_new)
            out[p] = AdaLoraWeights(
                out[p].a,
                zeroed - node.e,
                out[p].b,
                scale=node.scale,
                layout=node.layout,
                kind=node.kind,
                dropout=node.dropout,
            )
        rest = {k_: v for k_, v in updates.items() if k_ == "__shared__"} if isinstance(updates, dict) else {}
        updates = {**nest(out), **rest}
        return updates, AdaLoraState(step + 1, inner_state, ipt, unc, mask)

    return optax.GradientTransformation(init, update)


def kept_ranks(state: AdaLoraState) -> dict[str, Any]:
    """The kept rank per adapted kernel (per layer of a stacked one): the count of ``True`` in ``state.mask``.

    Example:
      >>> import jax.numpy as jnp
      >>> kept_ranks(AdaLoraState(jnp.zeros((), int), (), {}, {}, {"k": jnp.array([True, False, True])}))
      {'k': np.int64(2)}
    """
    return {p: np.asarray(m).sum(axis=-1) for p, m in state.mask.items()}


def rank_pattern(state: AdaLoraState) -> dict[str, list[bool]]:
    """PEFT's ``rank_pattern`` form of the mask: ``{path: [kept, ...]}`` (2-D kernels)."""
    return {p: np.asarray(m).reshape(-1).tolist() for p, m in state.mask.items()}


def orthogonal_regularizer(lora: Any) -> jax.Array:
    """PEFT's AdaLoRA orthogonality penalty: the mean over factors of ``‖AᵀA - I‖_F`` and ``‖BBᵀ - I‖_F``.

    Add ``orth_reg_weight * orthogonal_regularizer(lora)`` to the loss (PEFT's default weight is 0.5).

    Example:
      >>> import jax.numpy as jnp
      >>> node = AdaLoraWeights(jnp.eye(3, 2), jnp.zeros(2), jnp.eye(2, 4))
      >>> float(orthogonal_regularizer({"k": node}))
      0.0
    """
    terms = []
    for node in _adalora_nodes(lora).values():
        nb = node.layout.count("b")
        r = node.rank
        a = node.a.reshape(*node.a.shape[:nb], -1, r)
        b = node.b.reshape(*node.b.shape[: nb + 1], -1)
        eye = jnp.eye(r, dtype=a.dtype)
        for cov in (jnp.einsum("...ir,...is->...rs", a, a), jnp.einsum("...ro,...so->...rs", b, b)):
            terms.append(jnp.sqrt(jnp.sum(jnp.square(cov - eye), axis=(-2, -1))).reshape(-1))
    return jnp.mean(jnp.concatenate(terms))
