"""A mixed batch over a sharded base, run in a subprocess with 8 simulated CPU devices.

``tests/test_multi_adapter.py`` runs it as

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded/multi_adapter_checks.py

The base is Megatron-sharded over ``"model"`` (4), the batch over ``"data"`` (2); the bank's arrays follow
the adapters' derived shardings with the slot axis unsharded (``lora_jax.bank_shardings``). Prints
``PASSED multi_adapter`` or, after a traceback, ``FAIL multi_adapter``. Importing it has no side effects.
"""

from __future__ import annotations

import dataclasses
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from sharded_checks import ATOL, RTOL, auto_mesh, base_specs, config, init_params, shard

import lora_jax
from lora_jax.models.gpt import ATTENTION, GPT, MLP, lora_axes


def adapters(cfg, params):
    axes = lora_axes(cfg)
    spec = lambda **kw: lora_jax.LoraSpec(axes=axes, **kw)  # noqa: E731
    inits = [
        spec(rank=2, alpha=4.0, targets=list(ATTENTION + MLP)),
        spec(rank=4, alpha=16.0, rslora=True, targets=["query", "value"]),
        spec(rank=2, dora=True, targets=["mlp_in", "mlp_out", "query"]),
    ]
    rng = np.random.default_rng(0)
    fill = lambda x: jnp.asarray(rng.normal(0.0, 0.2, x.shape).astype(x.dtype))  # noqa: E731 - no XLA init to compile
    return [
        jax.tree_util.tree_map(fill, jax.eval_shape(lambda p, s=s: lora_jax.init_lora(jax.random.key(0), p, s), params))
        for s in inits
    ]


def check_multi_adapter() -> None:
    cfg = dataclasses.replace(config(), layers=1)
    params = init_params(cfg)
    bank = lora_jax.stack(adapters(cfg, params), params=params)
    model = GPT(cfg)
    forward = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    run = jax.jit(lora_jax.mixed_batch(forward))
    x = np.asarray(jax.random.randint(jax.random.key(3), (8, cfg.max_len), 0, cfg.vocab))
    ids = np.array([2, 0, -1, 1, 2, 1, 0, -1], np.int32)
    want = run(params, bank, jnp.asarray(ids), jnp.asarray(x))

    mesh = auto_mesh((2, 4), ("data", "model"))
    specs = base_specs(params)
    bank_sh = lora_jax.bank_shardings(specs, bank, mesh=mesh)
    one = lora_jax.adapter_shardings(specs, jax.eval_shape(lambda b: lora_jax.select(b, 0), bank), mesh=mesh)
    for path in bank.a:
        node = lora_jax.adapter_items(one)[path]
        assert bank_sh.a[path].spec == P(None, *node.a.spec) and bank_sh.b[path].spec == P(None, *node.b.spec), path
    q = "layers_0/query/kernel"
    assert bank_sh.b[q].spec == P(None, None, "model"), bank_sh.b[q].spec  # (K, r, heads, head_dim): heads sharded
    assert bank_sh.m["layers_0/mlp_in/kernel"].spec == P(None, "model")
    print("OK bank shardings follow the adapters' derived shardings, slot axis unsharded", flush=True)

    p_sh = shard(params, mesh, specs)
    b_sh = jax.device_put(bank, bank_sh)
    ids_sh = jax.device_put(ids, NamedSharding(mesh, P("data")))
    x_sh = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    got = run(p_sh, b_sh, ids_sh, x_sh)
    assert len(b_sh.a[q].sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=RTOL, atol=ATOL)
    print("OK sharded mixed batch equals unsharded", flush=True)


def main() -> None:
    if jax.device_count() != 8:
        raise SystemExit(f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8); found {jax.devices()}")
    try:
        check_multi_adapter()
    except Exception:
        traceback.print_exc()
        print("FAIL multi_adapter", flush=True)
        sys.exit(1)
    print("PASSED multi_adapter", flush=True)


if __name__ == "__main__":
    main()
