"""Shardings of a bank: each array's the adapters' derived sharding, with the leading ``K`` axis unsharded."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from lora_jax.adapters._tree import adapter_items
from lora_jax.multi._bank import AdapterBank, check_bank, select
from lora_jax.parallel._sharding import adapter_shardings


def _with_slot_axis(s: Any) -> Any:
    if s is None:
        return None
    if isinstance(s, NamedSharding):
        return NamedSharding(s.mesh, PartitionSpec(None, *s.spec))
    if isinstance(s, PartitionSpec):
        return PartitionSpec(None, *s)
    return s  # a fully replicated sharding that names no axes stays as it is


def bank_shardings(shardings: Any, bank: AdapterBank, *, mesh: jax.sharding.Mesh | None = None) -> AdapterBank:
    """The bank's shardings: :func:`lora_jax.adapter_shardings` of one slot, the slot axis ``K`` unsharded.

    ``A`` of every slot follows ``W``'s batch and input axes, ``B`` (and DoRA's
    ``m``) its batch and output axes, as for one adapter; the leading ``K`` axis
    is replicated, so every device holds all of its shards' adapters and a
    mixed batch gathers locally.

    Args:
      shardings: the base params' shardings (see :func:`lora_jax.adapter_shardings`).
      bank: from :func:`lora_jax.stack` (real or abstract).
      mesh: wraps ``PartitionSpec`` results in ``NamedSharding(mesh, ...)``.

    Returns:
      An :class:`AdapterBank` of shardings (for ``jax.device_put`` or ``jax.jit(..., in_shardings=...)``).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax
      >>> from jax.sharding import PartitionSpec as P
      >>> params = {"up": {"kernel": jnp.ones((8, 32))}}
      >>> lora = lora_jax.init_lora(jax.random.key(0), params, lora_jax.LoraSpec(rank=2))
      >>> sh = lora_jax.bank_shardings({"up": {"kernel": P(None, "model")}}, lora_jax.stack([lora, lora]))
      >>> sh.a["up/kernel"], sh.b["up/kernel"]
      (P(None,), P(None, None, 'model'))
    """
    bank = check_bank(bank, "bank_shardings")
    one = jax.eval_shape(lambda b: select(b, 0), bank)
    nodes = adapter_items(adapter_shardings(shardings, one, mesh=mesh))
    a = {p: _with_slot_axis(nodes[p].a) for p in bank.a}
    b = {p: _with_slot_axis(nodes[p].b) for p in bank.b}
    m = {p: _with_slot_axis(nodes[p].m) for p in bank.m}
    return AdapterBank(a, b, m, bank.forms)
